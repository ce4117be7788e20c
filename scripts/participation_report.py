"""The stale-Delta measurement of the participation sweep.

    python scripts/participation_report.py results/sweeps/sweep_participation \
        results/sweeps/sweep_participation_forget --out results/sweep_participation/stale_delta.md

Per (m, method, feedback policy), over the seeds of the sweeps (seed=range(n)):
the final ||w - w*||, its mean over the last 500 rounds (the final value alone
jitters at the sampling-noise floor), and ||w - w_dense(m)||, the distance of
the final model from the dense run with the same m and seed, each as mean ±
95 % t-interval half-width; then RegTop-k against Top-k and the stale-Delta
ablation (forget) against keep, paired by seed (scipy.stats). All runs with the same m and seed sample the same clients in every
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

from regtopk_fl.analysis.stats import paired, t_interval
from regtopk_fl.participation import sample_clients
from _report import emit  # noqa: E402  (scripts/_report.py)


def load(sweeps) -> dict:
    """{(m, sparsifier, policy, seed): {...}} of every finished job of the sweeps."""
    out = {}
    for sweep in sweeps:
        for d in sorted(Path(sweep).iterdir()):
            if not (d / "summary.json").exists() or not (d / "model.pt").exists():
                continue
            s = json.loads((d / "summary.json").read_text())
            if s.get("status") != "finished":
                continue
            cfg = {}
            for line in (d / ".hydra/overrides.yaml").read_text().splitlines():
                k, _, v = line.lstrip("- ").partition("=")
                cfg[k] = v
            m = int(cfg.get("participation.clients_per_round", s["num_workers"]))
            policy = cfg.get("participation.stale_feedback", "keep")
            with open(d / "metrics.csv") as fh:
                gaps = [float(r["gap"]) for r in csv.DictReader(fh)]
            key = (m, s["sparsifier"], policy, int(s["seed"]))
            if key in out:
                raise SystemExit(f"{d}: a second finished job for {key}")
            out[key] = {
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


ORDER = {"dense": 0, "topk": 1, "regtopk": 2}
PAIRS = (  # (A, B): sparsifier and feedback policy; the paired differences A - B
    (("regtopk", "keep"), ("topk", "keep")),
    (("regtopk", "forget"), ("regtopk", "keep")),
    (("regtopk", "forget"), ("topk", "keep")),
)


def _cell(values) -> str:
    mean, hw, n = t_interval(values)
    return f"{mean:.3g}" if n < 2 else f"{mean:.3g} ± {hw:.2g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=2500)
    args = ap.parse_args(argv)
    res = load(args.sweeps)
    for r in res.values():
        r["dist"] = float("nan")
    for (m, sp, policy, seed), r in res.items():
        dense = res.get((m, "dense", "keep", seed))
        if dense is not None:
            r["dist"] = float((r["w"] - dense["w"]).norm())
    groups = {}
    for (m, sp, policy, seed), r in res.items():
        groups.setdefault((m, sp, policy), {})[seed] = r
    lines = ["Mean ± half-width of the 95 % t-interval over the n seeds (scipy.stats.t); "
             "‖w − w_dense(m)‖ pairs each run with the dense run of the same m and seed.", "",
             "| m | method | RegTop-k feedback | n | seeds | final gap | mean gap, last 500 rounds | "
             "‖w − w_dense(m)‖ (final) |", "| ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for key in sorted(groups, key=lambda k: (-k[0], ORDER.get(k[1], 9), k[2])):
        m, sp, policy = key
        g = groups[key]
        seeds = sorted(g)
        lines.append(f"| {m} | {sp} | {policy if sp.startswith('regtopk') else '-'} | {len(g)} | "
                     f"{seeds[0]}-{seeds[-1]} | {_cell(r['final'] for r in g.values())} | "
                     f"{_cell(r['mean500'] for r in g.values())} | "
                     f"{_cell(r['dist'] for r in g.values() if r['dist'] == r['dist'])} |")
    lines += ["", "Paired by seed: A − B, its 95 % t-interval, scipy.stats.wilcoxon's p (two-sided) "
              "and the seeds where A was lower (better).", "",
              "| m | A | B | quantity | n | A − B | 95 % CI | p (Wilcoxon) | A lower |",
              "| ---: | --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for m in sorted({k[0] for k in groups}, reverse=True):
        for a, b in PAIRS:
            ga, gb = groups.get((m, *a)), groups.get((m, *b))
            if not ga or not gb or ga is gb:
                continue
            seeds = sorted(set(ga) & set(gb))
            for q, name in (("mean500", "mean gap, last 500"), ("dist", "‖w − w_dense‖"),
                            ("final", "final gap")):
                p = paired([ga[s][q] for s in seeds], [gb[s][q] for s in seeds], lower=True)
                if p["n"] == 0:
                    continue
                lines.append(f"| {m} | {a[0]} ({a[1]}) | {b[0]} ({b[1]}) | {name} | {p['n']} | "
                             f"{p['diff_mean']:.3g} | [{p['ci_low']:.3g}, {p['ci_high']:.3g}] | "
                             f"{p['p_wilcoxon']:.3g} | {p['wins']} |")
    any_run = next(iter(res.values()))
    lines += ["", f"Feedback age (seed {any_run['seed']}'s sampler):", "",
              "| m | feedback age (rounds) mean | median | share older than the previous round |",
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
