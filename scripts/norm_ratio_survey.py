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

Comebacks (#17): ``--comeback R [--comeback-start T] [--comeback-worker W]``
refuses worker W (default: the last) in rounds T..T+R-1 (the ``nan``
attack: it computes honestly, only what travels is NaN; default T = 3) and
reports its comeback: the accepted upload's norm / the round's median
(``comeback_ratio``, the first comeback), the largest norm / (median +
deferred allowance / max_norm_ratio) of its comebacks
(``comeback_over_allowance``: the guard refuses above max_norm_ratio), and
how often it was refused after the comeback (``refused_after``). The run
needs at least T + R rounds; the final numbers then differ from the table.
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
    ap.add_argument("--comeback", type=int, default=None, metavar="R",
                    help="refuse one worker for R rounds, then report its comeback")
    ap.add_argument("--comeback-start", type=int, default=3, metavar="T")
    ap.add_argument("--comeback-worker", type=int, default=None, metavar="W")
    args = ap.parse_args(argv)

    import torch

    from regtopk_fl import fedround, trust
    from regtopk_fl.deploy import compose_config
    from regtopk_fl.runner import run_experiment

    seen = {"guards": [], "outcomes": []}
    if args.comeback:
        install, collect = trust.install, fedround.Coordinator.collect

        def installing(*a, **k):
            guard = install(*a, **k)
            seen["guards"].append(guard)
            return guard

        def collecting(self, replies, rejected=None):
            out = collect(self, replies, rejected)
            seen["outcomes"].append(out)
            return out

        trust.install, fedround.Coordinator.collect = installing, collecting

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
            if args.comeback:
                worker = (int(cfg.num_workers) - 1 if args.comeback_worker is None
                          else args.comeback_worker)
                t1, t2 = args.comeback_start, args.comeback_start + args.comeback - 1
                cfg = compose_config([f"experiment={preset}", *overrides, *extra, *args.set,
                                      f"faults.hostile.worker={worker}",
                                      f"faults.hostile.attacks={t1}-{t2}:nan"])
                seen["guards"].clear()
                seen["outcomes"].clear()
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
            if args.comeback:
                row["equals_table"] = ""
                mine = [c for c in seen["guards"][0].comebacks if c[0] == worker]
                row.update({"refused": args.comeback, "comeback_round": t2 + 1,
                            "comeback_ratio": round(mine[0][1], 3) if mine else None,
                            "comeback_over_allowance": round(max(c[2] for c in mine), 3)
                            if mine else None,
                            "refused_after": sum(worker in o.rejected
                                                 for o in seen["outcomes"][t2:])})
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
