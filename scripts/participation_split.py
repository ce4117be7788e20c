#!/usr/bin/env python
"""Split the kept participation table and summary by ``participation.stale_feedback``.

    python scripts/participation_split.py results/seeds/participation

``regtopk-plot`` once pooled the RegTop-k runs with ``stale_feedback=keep`` and
``=forget`` into one setting (the keep runs never overrode the key; fixed in
regtopk_fl/analysis/collect.py's ``scan``). The raw runs were not kept, so this
rebuilds ``table.md/.csv`` and ``summary.md/.csv`` from the kept per-run
``table.csv``: its ``job`` column restarts at 0 with each sweep directory, in
the order ``scripts/seed_reruns.sh`` passed them (``SWEEPS`` below, with their
job counts), and the two ``forget`` sweeps ran with ``stale_feedback=forget``.
Before writing, it checks that (1) the kept table and summary regenerate byte
for byte from ``table.csv`` unsplit, (2) the job counts per sweep are the ones
expected, and (3) every group's final gap, mean ± half-width, is the one that
``stale_delta.md`` (made from the raw runs, split by policy) gives.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from regtopk_fl.analysis.collect import setting_labels  # noqa: E402
from regtopk_fl.analysis.plot import summary_markdown, summary_table, to_markdown  # noqa: E402
from regtopk_fl.analysis.stats import t_interval  # noqa: E402

KEY = "participation.stale_feedback"
M = "participation.clients_per_round"
# (sweep directory, jobs, stale_feedback), in seed_reruns.sh's order
SWEEPS = (("seeds_participation", 39, "keep"), ("seeds_participation_reduced", 20, "keep"),
          ("seeds_participation_m20", 15, "keep"), ("seeds_participation_dense_m10", 5, "keep"),
          ("seeds_participation_forget_reduced", 10, "forget"),
          ("seeds_participation_forget_m20", 5, "forget"))
TITLE = "sweep_participation"


def jobs_frame(table: pd.DataFrame, split: bool) -> pd.DataFrame:
    """What ``summary_table`` reads of a scan, from the kept per-run rows."""
    jobs = table.copy()
    jobs["sparsifier"] = jobs["method"].str.split(" ").str[0]
    jobs["mu"] = jobs["method"].str.extract(r"μ=([0-9.]+)")[0].astype(float)
    keys = [M, "sparsifier", "seed"] + ([KEY] if split else [])
    jobs.attrs["override_keys"] = keys
    jobs["setting"] = setting_labels(jobs, keys)
    return jobs


def policies(table: pd.DataFrame) -> list:
    starts = [i for i, j in enumerate(table["job"]) if j == "0"] + [len(table)]
    counts = [b - a for a, b in zip(starts, starts[1:])]
    expected = [n for _, n, _ in SWEEPS]
    if counts != expected:
        raise SystemExit(f"jobs per sweep {counts}, expected {expected}: not the kept table")
    return [p for (_, n, p) in SWEEPS for _ in range(n)]


def check_stale_delta(table: pd.DataFrame, text: str) -> int:
    """Every (m, method, policy) row of stale_delta.md: the same n and final gap."""
    checked = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 8 or not cells[0].isdigit():
            continue
        m, method, policy, n, _, final = cells[:6]
        sel = table[(table[M] == int(m)) & (table["method"].str.split(" ").str[0] == method)]
        if method.startswith("regtopk"):
            sel = sel[sel[KEY] == policy]
        mean, hw, k = t_interval(sel["final_gap"])
        got = f"{mean:.3g}" if k < 2 else f"{mean:.3g} ± {hw:.2g}"
        if k != int(n) or got != final:
            raise SystemExit(f"stale_delta.md m={m} {method} {policy}: n {n}, final gap {final}; "
                             f"the split gives n {k}, {got}")
        checked += 1
    return checked


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="results/seeds/participation")
    ap.add_argument("--check", action="store_true", help="check only, write nothing")
    args = ap.parse_args(argv)
    d = args.dir
    table = pd.read_csv(d / "table.csv", dtype={"job": str}, keep_default_na=False,
                        na_values=[""])
    if KEY in table:
        raise SystemExit(f"{d / 'table.csv'} is split already")
    heading = (d / "table.md").read_text().splitlines()[0]

    # (1) the kept files are what these functions make of table.csv
    summ = summary_table(jobs_frame(table, split=False))
    same = {"table.md": f"{heading}\n\n{to_markdown(table)}",
            "table.csv": table.to_csv(index=False),
            "summary.md": summary_markdown(summ, f"{TITLE}: final numbers per setting"),
            "summary.csv": summ.to_csv(index=False)}
    for name, text in same.items():
        if (d / name).read_text() != text:
            raise SystemExit(f"{d / name} does not regenerate from table.csv: not the kept file")

    # (2) and (3)
    split = table.copy()
    split.insert(list(split.columns).index("seed") + 1, KEY, policies(table))
    n = check_stale_delta(split, (d / "stale_delta.md").read_text())
    print(f"{n} rows of stale_delta.md agree with the split")
    summ = summary_table(jobs_frame(split, split=True))
    note = ("Split by `participation.stale_feedback` with scripts/participation_split.py from "
            "the kept table.csv (the raw runs were not kept); an earlier version pooled keep and "
            "forget.")
    out = {"table.md": f"{heading}\n\n{note}\n\n{to_markdown(split)}",
           "table.csv": split.to_csv(index=False),
           "summary.md": re.sub(r"\n\n", f"\n\n{note}\n\n",
                                summary_markdown(summ, f"{TITLE}: final numbers per setting"),
                                count=1),
           "summary.csv": summ.to_csv(index=False)}
    if not args.check:
        for name, text in out.items():
            (d / name).write_text(text)
            print(d / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
