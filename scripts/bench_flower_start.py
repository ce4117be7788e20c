"""Time to the end of round 1 of ``runtime=flower`` against the number of
nodes N at a fixed number m of sampled clients (issue #34), and peak memory.

    python scripts/bench_flower_start.py [--n 10 1000 10000] [--m 10] [--repeat 1] \
        [--root DIR] [--out results/scale/flower_start.md]

Each case is a fresh ``regtopk-fl`` process (linear regression, RegTop-k
S = 0.6, 1 round, no checkpoint): ``runtime=flower task=linreg
num_workers=N participation.clients_per_round=m rounds=1``. Measured from
the moment this script starts the process to the moment the run records
round 1's row (the child notes the time when ``RunRecorder.add`` gets it),
so it holds the interpreter's start, the imports, building the task, Ray
and the N simulated nodes, and round 1 itself. The N values run one after
another, repetitions outermost, so a ratio is taken between neighbours.

Memory: the peak resident set of the driver process up to the end of
round 1 (its ``ru_maxrss``; it holds the ServerApp, Flower's node table and
the task)
and the peak of the summed resident sets of its whole process tree (Ray's
processes and the ClientApp actors included; sampled every 0.2 s from
/proc, pages shared between processes counted in each).

``--root DIR``: run the suite in another checkout (e.g. a git worktree of an
older commit, for a before/after in one session); the venv is this one.
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

CHILD = """
import json, os, resource, sys, time
out = sys.argv[1]
from regtopk_fl import results
add = results.RunRecorder.add
def noting_add(self, row):
    got = add(self, row)
    if int(row.get("round", -1)) == 1 and not os.path.exists(out):
        with open(out, "w") as fh:
            json.dump({"round1_at": time.time(), "driver_peak_kb":
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, fh)
    return got
results.RunRecorder.add = noting_add
sys.argv = ["regtopk-fl"] + sys.argv[2:]
from regtopk_fl.launcher import main
main()
"""


def overrides(n: int, m: int, run_dir: Path) -> list:
    return ["runtime=flower", "task=linreg", f"num_workers={n}",
            f"participation.clients_per_round={m}", "rounds=1", "sparsifier=regtopk",
            "sparsifier.sparsity=0.6", "sparsifier.mu=4", "checkpoint.every=0",
            "progress=false", f"hydra.run.dir={run_dir}"]


def _tree_rss_kb(root_pid: int) -> int:
    """Summed VmRSS (kB) of root_pid and all its descendants."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parent[int(entry)] = int(fields[1])
        rss[int(entry)] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    tree, todo = set(), [root_pid]
    children: dict = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return sum(rss.get(p, 0) for p in tree)


def _crashed(run_dir: Path) -> bool:
    try:
        return "Simulation Runtime crashed" in (run_dir / "launcher.log").read_text()
    except OSError:
        return False


def _tree(root_pid: int) -> list:
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(p for p, pp in parent.items() if pp == pid)
    return out


def one(n: int, m: int, root: Path, tmp: Path, tag: str, timeout_s: float = 1800.0,
        tries: int = 3) -> dict:
    """One case; retried (up to ``tries``) when the process fails, as Ray's
    start does on an overloaded machine (its raylet must register within a
    hard-coded 30 s); the failures are counted in the row."""
    for attempt in range(tries):
        try:
            row = _one(n, m, root, tmp, f"{tag}-{attempt}", timeout_s)
            row["failed_tries"] = attempt
            return row
        except RuntimeError as exc:
            print(f"N={n}: try {attempt + 1} failed: {exc}", flush=True)
    raise SystemExit(f"N={n}: {tries} tries failed")


def _one(n: int, m: int, root: Path, tmp: Path, tag: str, timeout_s: float) -> dict:
    run_dir = tmp / f"{tag}-N{n}"
    mark = tmp / f"{tag}-N{n}.json"
    cmd = [sys.executable, "-c", CHILD, str(mark)] + overrides(n, m, run_dir)
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak_tree = 0
    while proc.poll() is None:
        try:
            peak_tree = max(peak_tree, _tree_rss_kb(proc.pid))
        except OSError:
            pass
        if time.time() - t0 > timeout_s or _crashed(run_dir) or (
                mark.exists() and time.time() - mark.stat().st_mtime > 180):
            break  # hung: a crashed Simulation Runtime does not end the process
        time.sleep(0.2)
    if proc.poll() is None:
        for pid in reversed(_tree(proc.pid)):  # this script's child and its Ray processes
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        proc.wait()
        if not mark.exists():
            raise RuntimeError(f"no round 1 within {timeout_s:.0f} s or the process hung")
    total = time.time() - t0
    if not mark.exists():
        out = proc.stdout.read()
        raise RuntimeError(f"exit {proc.returncode}: {out[-1500:]}")
    noted = json.loads(mark.read_text())
    round1 = noted["round1_at"] - t0
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except OSError:
        summary = {"status": "killed after round 1 (teardown hung)"}
    return {"N": n, "m": m, "tag": tag, "round1_s": round1, "process_s": total,
            "driver_peak_mb": noted["driver_peak_kb"] / 1024.0,
            "peak_tree_mb": peak_tree / 1024.0, "status": summary.get("status"),
            "identify_lines": sum("new node" in line for line in
                                  (run_dir / "launcher.log").read_text().splitlines()),
            "per_node_lines": sum("patched from model_0, which" in line for line in
                                  (run_dir / "launcher.log").read_text().splitlines())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--root", default=str(ROOT), help="the checkout to run (default: this one)")
    ap.add_argument("--tag", default=None, help="label of the checkout in the table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    tag = args.tag or ("this checkout" if root == ROOT else root.name)
    rows = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="flower-start-") as tmp:
        for rep in range(args.repeat):
            for n in args.n:
                row = one(n, args.m, root, Path(tmp), f"{rep}")
                row["load"] = os.getloadavg()[0]
                load.append(row["load"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # a report after every case: a cut run keeps what it measured
                    emit(report(rows, args, argv, load, tag), args.out)
    emit(report(rows, args, argv, load, tag), args.out)
    return 0


def report(rows, args, argv, load, tag) -> list:
    lines = [f"# Flower: time to the end of round 1 against N (`python scripts/"
             f"bench_flower_start.py {' '.join(sys.argv[1:] if argv is None else argv)}`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}); {time.strftime('%Y-%m-%d %H:%M')}"
             f"; 1-min load average {min(load):.1f}-{max(load):.1f} during the runs; "
             f"checkout: {tag}.", "",
             f"Linear regression (J = 100, 500 points per client), RegTop-k S = 0.6, m = {args.m}, "
             "1 round, `runtime.client_cpus=1`.", "",
             "| N | time to end of round 1 (s, median) | runs | ÷ first N | driver peak RSS (MB) "
             "| process tree peak RSS (MB) | identify INFO lines | per-node INFO lines "
             "| load at the end | failed starts |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = None
    for n in args.n:
        mine = [r for r in rows if r["N"] == n]
        if not mine:
            continue
        t = statistics.median(r["round1_s"] for r in mine)
        base = t if base is None else base
        runs = ", ".join(f"{r['round1_s']:.1f}" for r in mine)
        lines.append(f"| {n} | {t:.1f} | {runs} | {t / base:.2f} | "
                     f"{statistics.median(r['driver_peak_mb'] for r in mine):.0f} | "
                     f"{statistics.median(r['peak_tree_mb'] for r in mine):.0f} | "
                     f"{mine[0]['identify_lines']} | {mine[0]['per_node_lines']} | "
                     f"{', '.join(format(r['load'], '.1f') for r in mine)} | "
                     f"{sum(r['failed_tries'] for r in mine)} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
