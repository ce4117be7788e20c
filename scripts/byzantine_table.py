#!/usr/bin/env python
"""Attack x aggregation rule: the final metric of runs in which one worker is
Byzantine from its first round to the last (faults.hostile), against the
honest run and the run in which that worker is simply absent, per rule.

    python scripts/byzantine_table.py --task linreg --seeds 0 1 2 --out results/byzantine/linreg
    python scripts/byzantine_table.py --task tiny_image --seeds 0 1 --out results/byzantine/tiny_image

A run whose model diverges (the workers' gradients turn NaN, which the
worker step refuses) is recorded as diverged. Runs in-process (the Byzantine
attacks are the same in both runtimes:
tests/test_attacks.py). The attack rows use ``faults.hostile.scale`` (c,
default 15: under the default norm guard of 20x). Writes ``<out>.csv`` (one
row per run) and ``<out>.md`` (mean over seeds, and the spread).

``--from-csv <out>.csv`` rebuilds ``<out>.md`` from the kept per-run rows
without running anything; several CSVs make one table (``--out`` names it):

    python scripts/byzantine_table.py --task linreg --from-csv results/byzantine/linreg.csv

The defaults are the first table's rules and attacks (issue #17); issue #33
added the rule ``upload_clip`` and the attacks ``ipm`` and ``alie``, which
know the rule (their c: IPM_SCALE, ALIE_Z, unless ``--set
faults.hostile.scale=...``), e.g.

    python scripts/byzantine_table.py --task linreg --seeds 0 1 2 3 4 --attacks ipm alie \
        --rules mean trimmed_mean median centered_clip upload_clip --out /tmp/adaptive
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RULES = ("mean", "trimmed_mean", "median", "centered_clip", "upload_clip")
ATTACKS = ("honest", "absent", "sign_flip", "scaled_copy", "random_direction", "ipm", "alie")
# the columns and rows of the first table (issue #17): always shown, so that its
# kept rows rebuild its page unchanged; the others only where the rows have them
FIRST_RULES, FIRST_ATTACKS = RULES[:4], ATTACKS[:5]
ADAPTIVE = ("ipm", "alie")  # regtopk_fl.hostile.ADAPTIVE
# The adaptive attacks know the rule (issue #33): ipm's c is the largest norm
# ratio the rule lets through at full weight (a norm rule's clip_ratio; the
# mean: the guard's 15, as sign_flip; the coordinate-wise rules have no norm
# radius: 1, an upload of the median norm); alie's c is z = 1 standard deviation.
IPM_SCALE = {"mean": 15.0, "trimmed_mean": 1.0, "median": 1.0}
ALIE_Z = 1.0
# linreg: N = 10 (one Byzantine worker = 10%: trimmed_mean's default 0.1 cuts
# one value per side), RegTop-k S = 0.5; tiny_image: N = 10, Top-k S = 0.05,
# pixel noise 2 (as sweep_tiny_flower: keeps the methods apart).
TASKS = {
    "linreg": (["task=linreg", "num_workers=10", "sparsifier=regtopk", "sparsifier.sparsity=0.5",
                "sparsifier.mu=4", "lr=0.01", "rounds=300", "eval_every=300"], "gap", "lower"),
    "tiny_image": (["task=tiny_image", "num_workers=10", "sparsifier=topk",
                    "sparsifier.sparsity=0.05", "task.noise=2.0", "lr=0.1", "rounds=60",
                    "eval_every=60"],
                   "accuracy", "higher"),
}
HOSTILE = 9  # the last partition


def attack_scale(rule: str, attack: str, cfg, extra: list) -> float:
    """The c the attack runs with: ``faults.hostile.scale`` where ``--set``
    gives it or the attack is not adaptive, else the one that knows the rule
    (IPM_SCALE, ALIE_Z)."""
    from omegaconf import OmegaConf

    from regtopk_fl import hostile

    if any(o.startswith("faults.hostile.scale=") for o in extra) or attack not in ADAPTIVE:
        return hostile.scale(cfg.faults)
    if attack == "alie":
        return ALIE_Z
    if rule in IPM_SCALE:
        return IPM_SCALE[rule]
    return float(OmegaConf.select(cfg, "aggregate.clip_ratio"))  # a norm rule's radius


def run_one(task: str, rule: str, attack: str, seed: int, rounds: int, extra: list) -> dict:
    from regtopk_fl.compress import SparsifierError
    from regtopk_fl.deploy import compose_config
    from regtopk_fl.runner import run_experiment

    base, metric, _ = TASKS[task]
    ov = [*base, f"aggregate={rule}", f"seed={seed}", "runtime=inprocess", "threads=1",
          "checkpoint.every=0", "progress=false", *extra]
    if attack != "honest":
        ov += [f"faults.hostile.worker={HOSTILE}", f"faults.hostile.attacks=1-{rounds}:{attack}"]
    cfg = compose_config(ov)
    c = None if attack in ("honest", "absent") else attack_scale(rule, attack, cfg, extra)
    if attack in ADAPTIVE and not any(o.startswith("faults.hostile.scale=") for o in extra):
        ov.append(f"faults.hostile.scale={c}")
    with tempfile.TemporaryDirectory(prefix="byz-") as tmp:
        t0 = time.perf_counter()
        try:
            s = run_experiment(compose_config(ov), Path(tmp) / "run")
            final, status = s["final"][metric], s["status"]
        except SparsifierError as exc:  # the model diverged: the workers' gradients are NaN
            final, status = math.nan, f"diverged ({exc})"
        with open(Path(tmp) / "run" / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        rejected = sum(int(r["rejected"]) for r in rows)
    return {"task": task, "rule": rule, "attack": attack, "seed": seed, "metric": metric,
            "final": final, "rejected": rejected, "status": status, "rounds": len(rows) - 1,
            "seconds": round(time.perf_counter() - t0, 1), "scale": c}


def read_rows(path: Path) -> list:
    """The per-run rows of a written ``<out>.csv``, typed as ``run_one`` returns them."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["seed"], r["rejected"], r["rounds"] = int(r["seed"]), int(r["rejected"]), int(r["rounds"])
        r["final"], r["seconds"] = float(r["final"]), float(r["seconds"])
        if r.get("scale") not in (None, ""):
            r["scale"] = float(r["scale"])
    return rows


def markdown(rows: list, task: str) -> str:
    _, metric, better = TASKS[task]
    seeds = sorted({r["seed"] for r in rows})
    by = {}
    for r in rows:
        by.setdefault((r["attack"], r["rule"]), []).append(r["final"])
    fmt = (lambda v: f"{v:.3g}") if metric == "gap" else (lambda v: f"{v:.1f}")
    diverged = {(r["attack"], r["rule"]) for r in rows if math.isnan(r["final"])}
    rules = [r for r in RULES if r in FIRST_RULES or any(x["rule"] == r for x in rows)]
    attacks = [a for a in ATTACKS if a in FIRST_ATTACKS or any(x["attack"] == a for x in rows)]
    lines = [f"final {metric} ({better} is better), mean over seeds {seeds} (n = {len(seeds)})"
             " [min-max]", "",
             "| attack | " + " | ".join(rules) + " |", "| --- |" + " ---: |" * len(rules)]
    for attack in attacks:
        cells = []
        for rule in rules:
            v = by.get((attack, rule))
            if not v:
                cells.append("")
                continue
            if (attack, rule) in diverged:
                n = sum(math.isnan(x) for x in v)
                cells.append(f"diverged ({n} of {len(v)})")
                continue
            spread = f" [{fmt(min(v))}-{fmt(max(v))}]" if len(v) > 1 else ""
            cells.append(fmt(statistics.fmean(v)) + spread)
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    rej = {}  # summed over seeds (a dict comprehension here once kept the last seed's)
    for r in rows:
        if r["rejected"]:
            key = (r["attack"], r["rule"])
            rej[key] = rej.get(key, 0) + int(r["rejected"])
    if rej:
        lines += ["", "uploads the guard refused (summed over seeds): " + ", ".join(
            f"{a}/{r}: {n}" for (a, r), n in sorted(rej.items()))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rules", nargs="+", default=list(FIRST_RULES), choices=RULES)
    ap.add_argument("--attacks", nargs="+", default=list(FIRST_ATTACKS), choices=ATTACKS)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.csv and <out>.md")
    ap.add_argument("--from-csv", type=Path, nargs="+", default=None, metavar="CSV",
                    help="rebuild CSV's .md from its kept rows (runs nothing); several CSVs "
                         "make one table, written to <out>.md (--out is then required)")
    args = ap.parse_args(argv)

    if args.from_csv is not None:
        if len(args.from_csv) > 1 and args.out is None:
            print(f"--out=None: required with {len(args.from_csv)} CSVs", file=sys.stderr)
            return 2
        rows = [r for path in args.from_csv for r in read_rows(path)]
        text = markdown(rows, args.task)
        print(text)
        (args.out or args.from_csv[0]).with_suffix(".md").write_text(text)
        return 0

    import torch

    torch.set_num_threads(1)
    rounds = next(int(o.split("=")[1]) for o in TASKS[args.task][0] if o.startswith("rounds="))
    rounds = next((int(o.split("=")[1]) for o in args.set if o.startswith("rounds=")), rounds)
    rows = []
    for seed in args.seeds:
        for attack in args.attacks:
            for rule in args.rules:
                row = run_one(args.task, rule, attack, seed, rounds, args.set)
                rows.append(row)
                print(row, flush=True)
    text = markdown(rows, args.task)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
