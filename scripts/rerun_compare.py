"""Run a fixed set of runs through the launcher, or compare two such sets
bitwise: the check that a change to the round's code left every recorded
number where it was (issue #19: "every recorded number and byte count
unchanged, with the reruns shown").

    PYTHONPATH=<checkout A> python scripts/rerun_compare.py run OUT_A [--only NAME ...]
    PYTHONPATH=<checkout B> python scripts/rerun_compare.py run OUT_B
    python scripts/rerun_compare.py compare OUT_A OUT_B [--new-keys KEY ...]

``run`` starts ``python -m regtopk_fl.launcher`` once per case (a fresh
process each, as a user would; the launcher of the checkout on PYTHONPATH)
into ``OUT/<case>/`` (a sweep's jobs into ``OUT/<case>/<n>/``). ``compare``
holds every run directory of A against B's: ``metrics.csv`` cell for cell
apart from ``wall_s``, ``summary.json`` key for key apart from the
clocks (``wall_time_s``, ``client_timing_s``), and ``model.pt``'s tensors with ``torch.equal``. It prints
one line per run and exits with 1 when anything differs. ``--new-keys``:
summary keys that B may add (a new record, absent from A's older runs).

Bitwise is the right test here: both sets run on the same machine with the
same kernels (the same runtime, threads and CPU), only the code differs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LINREG = ["task=linreg", "threads=1"]
CASES = {
    # the paper's Fig. 2: dense / Top-k / RegTop-k x S in {0.4, 0.5, 0.6}, 2500 rounds (9 jobs)
    "fig2_linreg": ["-m", "experiment=fig2_linreg"],
    # client sampling with drops and NaN uploads (patches, rejections, deferrals)
    "linreg_sampled_drops": LINREG + [
        "num_workers=40", "participation.clients_per_round=10", "faults.drop_prob=0.2",
        "faults.nan_prob=0.05", "rounds=300", "sparsifier=regtopk", "sparsifier.sparsity=0.5",
        "task.size_ratio=3", "network.uplink_mbps=1", "network.downlink_mbps=10",
        "network.latency_ms=5"],
    "linreg_sampled_drops_flower": LINREG + [
        "runtime=flower", "num_workers=12", "participation.clients_per_round=5",
        "faults.drop_prob=0.2", "faults.nan_prob=0.05", "rounds=25", "sparsifier=regtopk",
        "sparsifier.sparsity=0.5", "task.size_ratio=3"],
    # one hostile worker: upload attacks, absences, a Byzantine sign flip
    "linreg_hostile": LINREG + [
        "num_workers=8", "rounds=60", "sparsifier=topk", "sparsifier.sparsity=0.3",
        "faults.hostile.worker=2",
        "faults.hostile.attacks=3:nan 5:huge_norm 6-8:absent 9:sign_flip 10:over_budget "
        "11:inflate_examples 12:dense_all 13:coded_all 20-30:absent"],
    # momentum and weight decay (full-model resyncs), drops, Gaussian-k's varying counts
    "linreg_momentum_gaussiank": LINREG + [
        "num_workers=10", "rounds=150", "momentum=0.9", "weight_decay=0.0001",
        "faults.drop_prob=0.15", "sparsifier=gaussiank", "sparsifier.sparsity=0.2"],
    "linreg_trimmed_mean_randomk": LINREG + [
        "num_workers=10", "rounds=100", "aggregate=trimmed_mean", "sparsifier=randomk",
        "sparsifier.sparsity=0.3", "broadcast=model"],
    "tiny_image": ["task=tiny_image", "num_workers=4", "rounds=20", "sparsifier=regtopk",
                   "sparsifier.sparsity=0.05", "faults.drop_prob=0.1", "threads=1"],
    "tiny_image_flower": ["task=tiny_image", "runtime=flower", "num_workers=4", "rounds=12",
                          "sparsifier=regtopk", "sparsifier.sparsity=0.05",
                          "faults.drop_prob=0.1", "threads=1"],
    # a model above 2^16 entries with plain SGD: the server's pooled g and sparse
    # step, the replicas' sparse step (regtopk_fl/fedround.py, optim.py)
    "tiny_image_wide": ["task=tiny_image", "+task.width=96", "num_workers=4", "rounds=15",
                        "sparsifier=topk", "sparsifier.sparsity=0.01", "faults.drop_prob=0.1",
                        "threads=1"],
    "tiny_image_wide_flower": ["task=tiny_image", "+task.width=96", "runtime=flower",
                               "num_workers=4", "rounds=10", "sparsifier=topk",
                               "sparsifier.sparsity=0.01", "faults.drop_prob=0.1", "threads=1"],
    # dense under client sampling (#34): the store's markers, g shared as dense feedback,
    # NaN uploads rejected and restored; wide: dense uploads above 2^16 entries
    # (the trust screen's per-row norms); Flower: the clients' lazy state files
    "linreg_sampled_dense": LINREG + [
        "num_workers=30", "participation.clients_per_round=6", "faults.drop_prob=0.2",
        "faults.nan_prob=0.1", "rounds=120", "sparsifier=dense", "task.size_ratio=3"],
    "linreg_sampled_dense_flower": LINREG + [
        "runtime=flower", "num_workers=10", "participation.clients_per_round=4",
        "faults.drop_prob=0.2", "faults.nan_prob=0.1", "rounds=15", "sparsifier=dense",
        "task.size_ratio=3"],
    "tiny_image_wide_sampled_dense": ["task=tiny_image", "+task.width=96", "num_workers=8",
                                      "participation.clients_per_round=4", "rounds=12",
                                      "sparsifier=dense", "faults.drop_prob=0.1",
                                      "faults.nan_prob=0.1", "threads=1"],
    # dense with every worker each round, above 2^16 entries: the memory's zero
    # residual unallocated and its batch from a pool (memory.py, reuse.py), NaN
    # uploads put back into the residual
    "tiny_image_wide_dense": ["task=tiny_image", "+task.width=96", "num_workers=4",
                              "rounds=12", "sparsifier=dense", "faults.drop_prob=0.1",
                              "faults.nan_prob=0.15", "threads=1"],
}


def run(out: Path, only) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_LOG_LEVEL="ERROR", FLWR_TELEMETRY_ENABLED="0")
    for name, overrides in CASES.items():
        if only and name not in only:
            continue
        multirun = overrides[:1] == ["-m"]
        where = (f"hydra.sweep.dir={out / name}" if multirun else f"hydra.run.dir={out / name}")
        cmd = [sys.executable, "-m", "regtopk_fl.launcher", *overrides, where, "progress=false",
               "checkpoint.every=0"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


CLOCKS = ("wall_time_s", "client_timing_s")  # summary keys that time, never equal twice


def _rows(path: Path) -> list:
    with open(path) as fh:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(fh)]


def _summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    for clock in CLOCKS:
        s.pop(clock, None)
    return s


def _models_equal(a: Path, b: Path) -> bool:
    import torch

    ma, mb = (torch.load(p, weights_only=False) for p in (a, b))
    if ma.keys() != mb.keys():
        return False
    for k in ma:
        x, y = ma[k], mb[k]
        if (x is None) != (y is None) or (x is not None and not (
                x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))):
            return False
    return True


def compare(a: Path, b: Path, new_keys=()) -> int:
    bad = 0
    dirs = sorted(p.parent for p in a.rglob("metrics.csv"))
    if not dirs:
        print(f"no run directories under {a}")
        return 1
    for d in dirs:
        rel = d.relative_to(a)
        e = b / rel
        what = []
        if not (e / "metrics.csv").exists():
            what.append("missing in B")
        else:
            ra, rb = _rows(d / "metrics.csv"), _rows(e / "metrics.csv")
            diff = [i for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
            if len(ra) != len(rb) or diff:
                what.append(f"metrics.csv differs ({len(ra)} vs {len(rb)} rows; first row "
                            f"{diff[0] if diff else min(len(ra), len(rb))})")
            sa, sb = _summary(d / "summary.json"), _summary(e / "summary.json")
            for k in new_keys:
                if k not in sa:
                    sb.pop(k, None)
            keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
            if keys:
                what.append(f"summary.json differs in {keys}")
            if not _models_equal(d / "model.pt", e / "model.pt"):
                what.append("model.pt differs")
        bad += bool(what)
        n = len(_rows(d / "metrics.csv")) - 1
        print(f"{rel}: {'; '.join(what) if what else f'bitwise equal ({n} rounds)'}")
    print(f"{len(dirs) - bad} of {len(dirs)} runs bitwise equal")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="*", default=None, choices=sorted(CASES))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--new-keys", nargs="*", default=())
    args = ap.parse_args(argv)
    return run(args.out, args.only) if args.cmd == "run" else compare(args.a, args.b,
                                                                       args.new_keys)


if __name__ == "__main__":
    sys.exit(main())
