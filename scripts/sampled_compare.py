"""Paired tables of results/sweep_participation/sampled.md (issue #33, part 1)
from the kept runs: regtopk_fl.analysis.compare (what ``regtopk-plot
--compare`` runs) with the method named by sparsifier *and* stale-feedback
policy, so that a ``forget`` run pairs with Top-k's (``keep``) run of the same
seed and m, which ``--by`` alone cannot do (both keys differ).

    python scripts/sampled_compare.py A_DIRS B_DIRS --a NAME --b NAME [--metric gap --last 500]
        [--out FILE.md]

A_DIRS / B_DIRS: comma-separated sweep (or runs) directories of each side."""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from regtopk_fl.analysis import compare as cmp
from regtopk_fl.analysis.collect import collect, load_curves


def side(dirs: str, name: str):
    paths = [d for d in dirs.split(",") if d]
    jobs, curves = collect(paths), load_curves(paths)
    jobs["method"] = name
    curves["method"] = name
    return jobs, curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a_dirs")
    p.add_argument("b_dirs")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--metric", default="gap")
    p.add_argument("--last", type=int, default=None)
    p.add_argument("--key", default="participation.clients_per_round",
                   help="the setting the rows are split by")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.a == args.b:
        print(f"--a {args.a!r}: must differ from --b", file=sys.stderr)
        return 2
    ja, ca = side(args.a_dirs, args.a)
    jb, cb = side(args.b_dirs, args.b)
    jobs = pd.concat([ja, jb], ignore_index=True)
    curves = pd.concat([ca, cb], ignore_index=True)
    if args.key not in jobs:
        jobs[args.key] = [cmp.config_value(j, args.key) for j in jobs["job_dir"]]
    jobs.attrs["override_keys"] = [args.key]
    table = cmp.compare(jobs, curves, args.a, args.b, args.metric, by="method", last=args.last)
    what = f"mean {args.metric} over the last {args.last} evaluations" if args.last else \
        f"final {args.metric}"
    text = cmp.to_markdown(table, f"{args.a} - {args.b}, {what}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        table.to_csv(args.out[:-3] + ".csv" if args.out.endswith(".md") else args.out + ".csv",
                     index=False)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
