#!/usr/bin/env python
"""How large is an honest upload? The evidence behind ``server.max_norm_ratio``.

Runs every job of the recorded presets (the grids under results/<preset>/)
with the server's default guard on, and reports per job the largest ratio
of an accepted upload's L2 norm to its round's lower-median norm
(regtopk_fl/trust.py), the uploads the guard rejected, and whether the final
numbers equal the recorded table.csv exactly (so the guard changed nothing).

    python scripts/norm_ratio_survey.py fig1_toy fig2_linreg sweep_linreg_workers ...
        [--runtime inprocess] [--out survey.csv] [--limit-rounds N] [--set KEY=VALUE ...]

``--runtime inprocess`` runs a Flower preset (fig1_toy via `make run`,
sweep_tiny_flower) in-process: the same arithmetic, much faster here
(tests/test_runtime_equivalence.py). ``--limit-rounds`` shortens the jobs
(ratios only; the tables are then not compared).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def jobs(preset: str) -> list:
    """The overrides of each job of the preset's sweep, in Hydra's job order."""
    from hydra import compose, initialize_config_dir

    from regtopk_fl.settings import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}"],
                      return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


def recorded(preset: str) -> list:
    path = REPO / "results" / preset / "table.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--runtime", default=None, help="override the preset's runtime")
    ap.add_argument("--limit-rounds", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more overrides, e.g. server.max_norm_ratio=null (measure without the guard)")
    args = ap.parse_args(argv)

    import torch

    from regtopk_fl.deploy import compose_config
    from regtopk_fl.runner import run_experiment

    torch.set_num_threads(1)
    rows = []
    for preset in args.presets:
        table = recorded(preset)
        for j, overrides in enumerate(jobs(preset)):
            extra = ["progress=false", "checkpoint.every=0", "threads=1"]
            if args.runtime:
                extra.append(f"runtime={args.runtime}")
            if args.limit_rounds:
                extra.append(f"rounds={args.limit_rounds}")
            cfg = compose_config([f"experiment={preset}", *overrides, *extra, *args.set])
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="ratio-survey-") as tmp:
                s = run_experiment(cfg, Path(tmp) / "run")
                with open(Path(tmp) / "run" / "metrics.csv") as fh:
                    rejected = sum(int(r["rejected"]) for r in csv.DictReader(fh))
            same = ""
            if table and not args.limit_rounds:
                rec = table[j]
                keys = [k for k in ("final_loss", "final_gap", "final_accuracy") if rec.get(k)]
                same = all(float(rec[k]) == float(s["final"][k.split("_", 1)[1]]) for k in keys)
            row = {"preset": preset, "job": j, "overrides": " ".join(overrides),
                   "max_norm_ratio": round(s["max_norm_ratio"], 4), "rejected": rejected,
                   "final": s["final"], "equals_table": same,
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, flush=True)
    worst = {}
    for r in rows:
        worst[r["preset"]] = max(worst.get(r["preset"], 0.0), r["max_norm_ratio"])
    print("max ratio per preset:", worst)
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
