"""Kill a run with SIGKILL part-way, resume it, and check it against an
uninterrupted run of the same settings, bit for bit.

    python scripts/kill_resume.py --out results/runs/kill_resume --crash-after 23 47 -- \
        experiment=fig3_cifar10_cpu sparsifier=regtopk rounds=60 checkpoint.every=10 threads=1

Runs ``regtopk-fl <overrides>`` once uninterrupted (``<out>/reference``), then
in ``<out>/killed``: once per ``--crash-after`` round, a run that SIGKILLs
itself after that round (the REGTOPK_FL_CRASH_AFTER_ROUND hook; each resumes
from the previous one's last checkpoint), and a final run that finishes.
Compares metrics.csv (all columns but wall_s) and model.pt; exit status 0 when
they are identical. ``--catch-up-rounds R ...`` leaves the downlink columns of
those rounds out of the comparison and prints them instead (a resumed
``runtime=flower`` run catches its nodes up in the first round after the
checkpoint: their replicas are gone). tests/test_faults_resume.py uses the
same functions.
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from regtopk_fl.checkpoint import CRASH_ENV


def launch(run_dir: Path, overrides, crash_after=None, timeout=3600) -> tuple:
    """``regtopk-fl <overrides> hydra.run.dir=<run_dir>`` in its own process
    group; returns (exit status, output). Whatever a killed run leaves behind
    (Ray's processes under runtime=flower) is killed with its group."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_after is not None:
        env[CRASH_ENV] = str(crash_after)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.out"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "regtopk_fl", *overrides,
                                 f"hydra.run.dir={run_dir}"], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        rc = proc.wait(timeout=timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc, log.read_text()


def rows(run_dir: Path) -> list:
    with open(run_dir / "metrics.csv") as fh:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(fh)]


# what a resumed Flower run sends differently: its nodes' replicas are gone
# or ahead of the checkpoint, so each node is caught up (a patch from the
# round its replica holds, from model_0 without one, or the full model) the
# first time it is sent something after the resume
DOWNLINK = ("downlink_bytes", "downlink_coded_bytes", "resyncs", "patches", "comm_s")


def differences(a: Path, b: Path, resync_rounds=()) -> list:
    """What differs between two finished runs (empty: bitwise identical).
    In ``resync_rounds`` the downlink columns are left out (a resumed
    Flower run catches its nodes up there; the caller checks that itself)."""
    out = []
    skip = {str(r) for r in resync_rounds}
    clean = lambda rs: [{k: v for k, v in r.items()  # noqa: E731
                         if not (r["round"] in skip and k in DOWNLINK)} for r in rs]
    ra, rb = clean(rows(a)), clean(rows(b))
    if ra != rb:
        bad = next(i for i, (x, y) in enumerate(zip(ra + [None], rb + [None])) if x != y)
        out.append(f"metrics.csv differs from row {bad}")
    ma = torch.load(a / "model.pt", weights_only=False)
    mb = torch.load(b / "model.pt", weights_only=False)
    for key in ("params", "buffers"):
        x, y = ma[key], mb[key]
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            out.append(f"model.pt {key} differ")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--crash-after", type=int, nargs="+", required=True)
    ap.add_argument("--catch-up-rounds", type=int, nargs="*", default=[])
    ap.add_argument("overrides", nargs="+")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rc, out = launch(args.out / "reference", args.overrides)
    if rc != 0:
        print(out[-2000:], file=sys.stderr)
        return 1
    print(f"reference: {time.perf_counter() - t0:.0f} s")
    killed = args.out / "killed"
    for r in args.crash_after:
        t0 = time.perf_counter()
        rc, out = launch(killed, args.overrides, crash_after=r)
        ck = torch.load(killed / "checkpoint.pt", weights_only=False, map_location="cpu")
        print(f"killed after round {r}: exit {rc}, last checkpoint after round {ck['round']} "
              f"({time.perf_counter() - t0:.0f} s)")
        if rc != -signal.SIGKILL:
            print(out[-2000:], file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    rc, out = launch(killed, args.overrides)
    print(f"resumed to the end: exit {rc} ({time.perf_counter() - t0:.0f} s)")
    if rc != 0:
        print(out[-2000:], file=sys.stderr)
        return 1
    diff = differences(killed, args.out / "reference", args.catch_up_rounds)
    ours, ref = ({r["round"]: r for r in rows(d)} for d in (killed, args.out / "reference"))
    for t in map(str, args.catch_up_rounds):
        print(f"round {t} downlink (coded bytes, resyncs, patches): resumed "
              f"{ours[t]['downlink_coded_bytes']}, {ours[t]['resyncs']}, {ours[t]['patches']}; "
              f"uninterrupted {ref[t]['downlink_coded_bytes']}, {ref[t]['resyncs']}, "
              f"{ref[t]['patches']}")
    skip = f", the downlink of rounds {args.catch_up_rounds} aside" if args.catch_up_rounds else ""
    print(f"identical to the uninterrupted run (metrics.csv without wall_s{skip}, model.pt)"
          if not diff else "NOT identical: " + "; ".join(diff))
    return 0 if not diff else 1


if __name__ == "__main__":
    sys.exit(main())
