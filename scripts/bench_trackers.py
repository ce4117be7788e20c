"""What a tracker costs a run: the same job with tracker=csv, tensorboard and
mlflow, each in its own ``regtopk-fl`` process (imports included).

    python scripts/bench_trackers.py [--rounds 2500] [--repeat 3] [--out FILE]

The job is Fig. 2's linear regression (N=20, J=100, RegTop-k S=0.6, one
thread): about a millisecond per round, so the trackers' own cost shows.
Per tracker, the median over ``--repeat`` runs (the trackers take turns) of:
the process's wall time, ``wall_time_s`` of summary.json (the rounds: the
clock starts once the sinks are open) and its extra seconds per round over
csv.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, emit  # noqa: E402

TRACKERS = ("csv", "tensorboard", "mlflow")


def one(tracker: str, rounds: int, run_dir: Path) -> tuple:
    args = ["experiment=fig2_linreg", "sparsifier=regtopk", "sparsifier.sparsity=0.6",
            f"rounds={rounds}", "threads=1", "progress=false", "checkpoint.every=0",
            f"tracker={tracker}", f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "regtopk_fl", *args], check=True,
                   capture_output=True)
    total = time.perf_counter() - t0
    return total, json.loads((run_dir / "summary.json").read_text())["wall_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    got = {t: [] for t in TRACKERS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for tracker in TRACKERS:
                got[tracker].append(one(tracker, args.rounds, Path(tmp) / f"{tracker}-{i}"))
    med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for t, v in got.items()}
    lines = [f"Trackers on `experiment=fig2_linreg sparsifier=regtopk sparsifier.sparsity=0.6 "
             f"rounds={args.rounds} threads=1`, median of {args.repeat} ({cpu_name()})", "",
             "| tracker | process s | rounds s (wall_time_s) | extra ms per round over csv |",
             "| --- | --- | --- | --- |"]
    for t, (total, rounds) in med.items():
        extra = 1000 * (rounds - med["csv"][1]) / args.rounds
        lines.append(f"| {t} | {total:.1f} | {rounds:.2f} | {extra:.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
