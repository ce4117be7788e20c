"""Where a ``regtopk-fl`` process spends its first seconds (issue #34): the
start-up and teardown of an in-process run, and its imports.

    python scripts/bench_startup.py [--repeat 5] [--before DIR] [--cases linreg cifar] \
        [--out results/startup.md]

Start-up and teardown = the process's wall time (from this script starting
it to its exit) minus the run's own ``wall_time_s`` (summary.json: the
rounds and their evaluations). So it holds the interpreter, the imports,
Hydra's config, building the task (the data) and writing the results.

Cases (``runtime=inprocess``):

* ``linreg``: the default linear regression, N = 4, 2 rounds: the framework
  alone;
* ``cifar``: the workload of issue #34: ResNet-18 with the CIFAR stem at
  width 16 on CIFAR-10 images, N = 100 clients of 50 images, m = 10,
  ``sparsifier=dense``, batch 20, 2 threads, 2 rounds (the decoded images
  cached in a temp folder by a warm-up run that is not counted; each case
  has one).

``--before DIR``: a checkout of an older commit (a git worktree) run with
the same venv, interleaved with this one (before, after, before, ...), so
the two are compared under the same load. The median and the spread
(min-max) of each are reported, and the pairwise ratio.

The imports: one ``python -X importtime`` run of the linreg case per
checkout, summed by top package (cumulative microseconds of the first
import of each), and which heavy modules an in-process run loads at all.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from _report import cpu_name, emit  # noqa: E402  (scripts/_report.py)

CASES = {
    "linreg": ["task=linreg", "num_workers=4", "rounds=2"],
    "cifar": ["task=cifar10", "task.width=16", "task.subset_per_class=500",
              "task.test_subset=100", "task.partition=iid", "num_workers=100",
              "participation.clients_per_round=10", "sparsifier=dense", "lr=0.01",
              "task.batch_size=20", "threads=2", "rounds=2", "eval_every=2",
              f"task.data_path={ROOT.parent / 'shared/data/cifar10-jpeg.tar.gz'}",
              f"task.cache_dir={Path(tempfile.gettempdir()) / 'regtopk-startup-cache'}"],
}
COMMON = ["runtime=inprocess", "checkpoint.every=0", "progress=false"]
HEAVY = ("flwr", "ray", "torch._dynamo", "torch._inductor", "sympy", "torchvision")


def one(root: Path, case: str, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "regtopk_fl", *CASES[case], *COMMON, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{case} in {root}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    run_s = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    return {"case": case, "root": str(root), "process_s": wall, "run_s": run_s,
            "startup_s": wall - run_s, "load": os.getloadavg()[0]}


def imports(root: Path, run_dir: Path) -> dict:
    """{top package: cumulative seconds} of one linreg run, and the heavy
    modules it loaded."""
    cmd = [sys.executable, "-X", "importtime", "-m", "regtopk_fl", *CASES["linreg"], *COMMON,
           f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(root))
    err = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True).stderr
    total, by_top, loaded = 0, {}, set()
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _cum, name = line[len("import time:"):].split("|", 2)
        name = name.strip()
        total += int(own)
        for heavy in HEAVY:
            if name == heavy or name.startswith(heavy + "."):
                loaded.add(heavy)
                by_top[heavy] = by_top.get(heavy, 0) + int(own)
        top = name.split(".")[0]
        if top in ("torch", "hydra", "omegaconf", "numpy", "regtopk_fl", "numba"):
            by_top[top] = by_top.get(top, 0) + int(own)
    return {"total_s": total / 1e6, "by_top_s": {k: v / 1e6 for k, v in sorted(by_top.items())},
            "heavy_loaded": sorted(loaded)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", default=None, help="an older checkout to compare with")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    roots = ([("before", Path(args.before).resolve())] if args.before else []) + [("after", ROOT)]
    rows, imp = [], {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for label, root in roots:
            imp[label] = imports(root, Path(tmp) / f"imp-{label}")
            print(label, json.dumps(imp[label]), flush=True)
        for case in args.cases:  # a warm-up (data cache, page cache), not counted
            one(roots[-1][1], case, Path(tmp) / f"{case}-warm")
        for rep in range(args.repeat):
            for case in args.cases:
                for label, root in roots:
                    row = one(root, case, Path(tmp) / f"{case}-{label}-{rep}")
                    row["label"] = label
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    loads = [r["load"] for r in rows]
    lines = [f"# Start-up of an in-process run (`python scripts/bench_startup.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}); {time.strftime('%Y-%m-%d %H:%M')}; "
             f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs.", "",
             "| case | checkout | start-up and teardown (s): median | min-max | runs |",
             "| --- | --- | ---: | ---: | ---: |"]
    for case in args.cases:
        for label, _ in roots:
            s = [r["startup_s"] for r in rows if r["case"] == case and r["label"] == label]
            lines.append(f"| {case} | {label} | {statistics.median(s):.2f} | "
                         f"{min(s):.2f}-{max(s):.2f} | {len(s)} |")
        if args.before:
            b = [r["startup_s"] for r in rows if r["case"] == case and r["label"] == "before"]
            a = [r["startup_s"] for r in rows if r["case"] == case and r["label"] == "after"]
            ratios = [y / x for x, y in zip(b, a)]
            lines.append(f"| {case} | after ÷ before (pairwise) | {statistics.median(ratios):.2f} | "
                         f"{min(ratios):.2f}-{max(ratios):.2f} | {len(ratios)} |")
    lines += ["", "Imports of one linreg run (`python -X importtime`), seconds of import "
              "(own time summed over each package's modules):", "",
              "| checkout | all imports | torch (all) | " + " | ".join(
                  k for k in ("torch._dynamo", "torch._inductor", "sympy", "flwr", "ray",
                              "hydra", "numpy")) + " | heavy modules loaded |",
              "| --- | ---: | " + " | ".join(["---:"] * 8) + " | --- |"]
    for label, _ in roots:
        d = imp[label]
        cells = [f"{d['by_top_s'].get(k, 0.0):.2f}" for k in (
            "torch", "torch._dynamo", "torch._inductor", "sympy", "flwr", "ray", "hydra", "numpy")]
        lines.append(f"| {label} | {d['total_s']:.2f} | " + " | ".join(cells) +
                     f" | {', '.join(d['heavy_loaded']) or 'none'} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
