"""The stale-Delta measurement of the participation sweep.

    python scripts/participation_report.py results/sweeps/sweep_participation \
        results/sweeps/sweep_participation_forget --out results/sweep_participation/stale_delta.md

Per (m, method, feedback policy): the final ||w - w*||, its mean over the last
500 rounds (the final value alone jitters at the sampling-noise floor), and
||w - w_dense(m)||, the distance of the final model from the dense run with
the same m. All runs with the same m and seed sample the same clients in every
round (the sampler is seeded by (seed, round)), so that distance isolates what
sparsification adds to the sampling noise. Also the age of the feedback a
returning client uses (rounds since it last took part), from the sampler.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

from regtopk_fl.participation import sample_clients
from _report import emit  # noqa: E402  (scripts/_report.py)


def load(sweeps) -> dict:
    out = {}
    for sweep in sweeps:
        for d in sorted(Path(sweep).iterdir()):
            if not (d / "summary.json").exists():
                continue
            cfg = {}
            for line in (d / ".hydra/overrides.yaml").read_text().splitlines():
                k, _, v = line.lstrip("- ").partition("=")
                cfg[k] = v
            s = json.loads((d / "summary.json").read_text())
            m = int(cfg.get("participation.clients_per_round", s["num_workers"]))
            policy = cfg.get("participation.stale_feedback", "keep")
            with open(d / "metrics.csv") as fh:
                gaps = [float(r["gap"]) for r in csv.DictReader(fh)]
            out[(m, s["sparsifier"], policy)] = {
                "n": s["num_workers"], "seed": s["seed"], "final": gaps[-1],
                "mean500": statistics.fmean(gaps[-500:]),
                "w": torch.load(d / "model.pt", weights_only=False)["params"]}
    return out


def ages(n: int, m: int, seed: int, rounds: int) -> list:
    last, out = {}, []
    for t in range(1, rounds + 1):
        for c in sample_clients(n, m, seed, t):
            if c in last:
                out.append(t - last[c])
            last[c] = t
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=2500)
    args = ap.parse_args(argv)
    res = load(args.sweeps)
    lines = ["| m | method | RegTop-k feedback | final gap | mean gap, last 500 rounds | "
             "‖w − w_dense(m)‖ (final) |", "| ---: | --- | --- | ---: | ---: | ---: |"]
    for key in sorted(res, key=lambda k: (-k[0], ["dense", "topk", "regtopk"].index(k[1])
                                          if k[1] in ("dense", "topk", "regtopk") else 9, k[2])):
        m, sp, policy = key
        r, dense = res[key], res.get((m, "dense", "keep"))
        dist = float((r["w"] - dense["w"]).norm()) if dense else float("nan")
        lines.append(f"| {m} | {sp} | {policy if sp.startswith('regtopk') else '-'} | "
                     f"{r['final']:.3g} | {r['mean500']:.3g} | {dist:.3g} |")
    any_run = next(iter(res.values()))
    lines += ["", "| m | feedback age (rounds) mean | median | share older than the previous round |",
              "| ---: | ---: | ---: | ---: |"]
    for m in sorted({k[0] for k in res}, reverse=True):
        if m >= any_run["n"]:
            continue
        a = ages(any_run["n"], m, any_run["seed"], args.rounds)
        lines.append(f"| {m} | {statistics.fmean(a):.2f} | {statistics.median(a):g} | "
                     f"{sum(x > 1 for x in a) / len(a):.2f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
