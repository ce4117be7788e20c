"""Seconds per round of runtime=flower vs runtime=inprocess, same machine,
same run, plus the wall time of the paper's linear regression (N=20, 2500
rounds) in-process.

    python scripts/bench_runtimes.py [--out results/bench_runtimes.md] [--quick]
    python scripts/bench_runtimes.py --scale 10 100 1000 [--m 10] [--out results/scale/flower_vs_n.md]

Per-round time is the median of the differences of metrics.csv's wall_s,
leaving out round 1 (start-up: Ray, actors, data loading).

``--scale``: s/round of runtime=flower against the number of nodes N at a
fixed number m of sampled clients per round (linear regression, RegTop-k
S = 0.6), with as many Ray actors as ``runtime.client_cpus`` allows (one per
core at client_cpus=1), next to in-process at the same N and m.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _report import cpu_name, emit  # noqa: E402  (scripts/_report.py)


def _cfg(overrides):
    from conftest import compose_cfg  # the launcher's config, composed by Hydra

    return compose_cfg(overrides)


def per_round(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as fh:
        wall = [float(r["wall_s"]) for r in csv.DictReader(fh)]
    steps = [b - a for a, b in zip(wall[1:], wall[2:])]  # rounds 2.. (round 1 = start-up)
    return statistics.median(steps)


def bench(cases, tmp: Path, flower_only_keys=()):
    from regtopk_fl.runner import run_experiment

    rows = []
    for name, overrides in cases:
        for runtime in ("inprocess", "flower"):
            ov = [o for o in overrides
                  if runtime == "flower" or not o.startswith(tuple(flower_only_keys))]
            t0 = time.perf_counter()
            summary = run_experiment(_cfg([f"runtime={runtime}"] + ov), tmp / f"{name}-{runtime}")
            total = time.perf_counter() - t0
            rows.append({"case": name, "runtime": runtime, "rounds": summary["rounds"],
                         "s_per_round": per_round(tmp / f"{name}-{runtime}"), "total_s": total})
            print(rows[-1], flush=True)
    return rows


def _machine() -> str:
    import torch

    cpu = cpu_name()
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}.")


def scale(ns, m: int, rounds: int, client_cpus: float, out) -> int:
    """Flower (and in-process) s/round against N at a fixed m."""
    cases = [(f"N={n}, m={m}", ["task=linreg", f"num_workers={n}", f"rounds={rounds}",
                                "sparsifier=regtopk", "sparsifier.sparsity=0.6",
                                "sparsifier.mu=4", "eval_every=1", "checkpoint.every=0",
                                f"participation.clients_per_round={m}",
                                f"runtime.client_cpus={client_cpus}"]) for n in ns]
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(cases, Path(tmp), flower_only_keys=("runtime.",))
    actors = int((os.cpu_count() or 1) // client_cpus)
    lines = [f"# Flower s/round against N at fixed m (`python scripts/bench_runtimes.py --scale "
             f"{' '.join(map(str, ns))} --m {m}`)", "", _machine(), "",
             f"Linear regression (J = 100, 500 points per client), RegTop-k S = 0.6, m = {m} "
             f"sampled clients per round, {rounds} rounds; runtime.client_cpus = {client_cpus} "
             f"(= {actors} Ray actors here).", "",
             "| N | runtime | s/round (median, rounds 2..) | whole run incl. start-up (s) |",
             "| ---: | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case'].split(',')[0][2:]} | {r['runtime']} | {r['s_per_round']:.4f} | "
                     f"{r['total_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a Markdown table here")
    ap.add_argument("--quick", action="store_true", help="linear regression only, few rounds")
    ap.add_argument("--scale", type=int, nargs="+", default=None, metavar="N",
                    help="Flower s/round against these N at fixed --m")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--client-cpus", type=float, default=1.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    if args.scale:
        return scale(args.scale, args.m, args.rounds, args.client_cpus, args.out)
    linreg = ["task=linreg", "num_workers=20", "sparsifier=regtopk", "sparsifier.sparsity=0.6",
              "sparsifier.mu=4", "eval_every=1"]
    cases = [("linreg N=20", linreg + ["rounds=30"])]
    if not args.quick:
        cases.append(("cifar10 ResNet-18 N=8", [
            "task=cifar10", "num_workers=8", "rounds=10", "sparsifier=regtopk",
            "sparsifier.sparsity=0.001", "sparsifier.mu=5", "eval_every=1000",
            "task.test_subset=100"]))
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(cases, Path(tmp))
        from regtopk_fl.runner import run_experiment

        fig2 = run_experiment(_cfg(linreg + ["rounds=2500", "runtime=inprocess"]), Path(tmp) / "fig2")
    import torch

    cpu = cpu_name()
    lines = ["# Runtime speed (`python scripts/bench_runtimes.py`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| case | runtime | s/round (median, rounds 2..) | whole run incl. start-up (s) |",
             "| --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} ({r['rounds']} rounds) | {r['runtime']} | "
                     f"{r['s_per_round']:.4f} | {r['total_s']:.1f} |")
    for case in {r["case"] for r in rows}:
        ip = next(r for r in rows if r["case"] == case and r["runtime"] == "inprocess")
        fl = next(r for r in rows if r["case"] == case and r["runtime"] == "flower")
        lines.append(f"\n{case}: Flower/in-process per round = {fl['s_per_round'] / ip['s_per_round']:.2f}x")
    lines.append(f"\nPaper's linear regression (N=20, J=100, 2500 rounds, RegTop-k S=0.6), "
                 f"in-process: {fig2['wall_time_s']:.2f} s (final gap {fig2['final']['gap']:.3g}).")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
