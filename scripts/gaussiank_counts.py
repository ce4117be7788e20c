#!/usr/bin/env python
"""How many entries does an honest Gaussian-k worker select? The evidence
behind Gaussian-k's upload budget (regtopk_fl/compress/gaussiank.py,
``BUDGET_FACTOR``; README "Reliability").

Runs the jobs of the recorded presets whose sparsifier is Gaussian-k (or any
preset with ``--set sparsifier=gaussiank``) in-process and records, for every
worker and round, the count its threshold selected *before* any cap, over k.
With ``--bench``, the same on scripts/bench_sparsifiers.py's select and
step paths (its 'layers' gradients; the bench's own rounds, untimed).

    python scripts/gaussiank_counts.py gaussiank [--limit-rounds N] [--set KEY=VALUE ...]
    python scripts/gaussiank_counts.py --bench
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class CountLog:
    """Wraps ``refine_select``'s uncapped selection: count / k per row."""

    def __init__(self):
        self.ratios: list = []  # (round or case, row, count, k)

    def install(self):
        from regtopk_fl.compress import gaussiank
        from regtopk_fl.compress.base import num_selected

        inner = gaussiank.refine_select
        log = self

        def recording(a, sparsity, score):
            sel = inner(a, sparsity, score)
            k = num_selected(sparsity, a.shape[1])
            for row, c in enumerate(sel.counts.tolist()):
                log.ratios.append((row, int(c), k))
            return sel

        gaussiank.refine_select = recording

    def worst(self):
        return max(((c / k), c, k) for _, c, k in self.ratios)


def preset_jobs(preset: str, extra: list) -> list:
    from scripts.norm_ratio_survey import jobs

    out = []
    for overrides in jobs(preset):
        if any(o in ("sparsifier=gaussiank", "sparsifier=regtopk_gaussiank") for o in overrides) or \
                any(e.startswith("sparsifier=") and "gaussiank" in e for e in extra):
            out.append(overrides)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("presets", nargs="*")
    ap.add_argument("--limit-rounds", type=int, default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bench", action="store_true",
                    help="the gradients of scripts/bench_sparsifiers.py instead of presets")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    log = CountLog()
    log.install()
    if args.bench:  # bench_cell's select and step paths, without the timing
        from regtopk_fl.compress import SPARSIFIERS
        from regtopk_fl.fedround import sparsify
        from regtopk_fl.memory import ErrorFeedbackMemory
        from scripts.bench_sparsifiers import (SIZES, SPARSITIES, WEIGHT, global_gradient,
                                               make_data)

        for dim in SIZES:
            for s in SPARSITIES:
                grads, a, ctx, others, cancel = make_data(dim, s, "cpu", 0, "layers")
                for name in ("gaussiank", "regtopk_gaussiank"):
                    sp = SPARSIFIERS[name](s)
                    start = len(log.ratios)
                    sp.select(a, ctx)
                    mem = ErrorFeedbackMemory(1, dim)
                    sparsify(mem, grads(0), sp, [WEIGHT], round=0)
                    for t in range(1, 9):  # the bench's warm-up + 7 repeats
                        mem.feedback_from_global(global_gradient(mem, others, cancel), [WEIGHT])
                        sparsify(mem, grads(t), sp, [WEIGHT], round=t)
                    sub = log.ratios[start:]
                    print({"case": f"J={dim} S={s} {name}", "k": sub[0][2],
                           "counts": [c for _, c, _ in sub],
                           "max_count_over_k": round(max(c / k for _, c, k in sub), 2)},
                          flush=True)
        print("worst count / k:", log.worst())
        return 0

    from regtopk_fl.deploy import compose_config
    from regtopk_fl.runner import run_experiment

    for preset in args.presets:
        for overrides in preset_jobs(preset, args.set):
            extra = ["progress=false", "checkpoint.every=0", "threads=1",
                     "server.max_norm_ratio=null", *args.set]
            if args.limit_rounds:
                extra.append(f"rounds={args.limit_rounds}")
            cfg = compose_config([f"experiment={preset}", *overrides, *extra])
            start, t0 = len(log.ratios), time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="gk-counts-") as tmp:
                s = run_experiment(cfg, Path(tmp) / "run")
            sub = log.ratios[start:]
            ks = {k for _, _, k in sub}
            worst = max(c / k for _, c, k in sub)
            below = sum(c < 2 * k / 3 for _, c, k in sub)
            above = sum(c > 4 * k / 3 for _, c, k in sub)
            print({"preset": preset, "overrides": " ".join(overrides + args.set), "k": sorted(ks),
                   "selections": len(sub), "max_count": max(c for _, c, _ in sub),
                   "max_count_over_k": round(worst, 3), "below_2k/3": below,
                   "above_4k/3": above, "final": s["final"],
                   "seconds": round(time.perf_counter() - t0, 1)}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
