"""Paired comparisons of two methods over seeds (``regtopk-plot --compare A:B``).

A and B are two values of the *method key* ``by`` (default ``sparsifier``:
``--compare regtopk:topk``; any other key works, e.g. ``--by
participation.stale_feedback --compare forget:keep``). A job that did not
override ``by`` counts with the value in its ``.hydra/config.yaml``, so
sweeps that differ in one override can be compared.

One row per *setting*: per combination of the other swept override keys
(``seed`` and ``experiment`` excluded; keys that only one of A and B has are
dropped). Within a setting, A's and B's jobs are paired by ``seed``; seeds
with only one side finished are counted in ``unpaired`` and left out. The
compared value is the final metric (``final_<metric>``) or, with ``last=N``,
the mean of the metric over the last N evaluated rounds. Statistics are
:func:`regtopk_fl.analysis.stats.paired`'s (scipy): ``n, mean_a, mean_b,
diff_mean`` (A - B), ``ci_low, ci_high`` (95 % t-interval of the mean
difference), ``p_ttest``, ``p_wilcoxon``, ``wins/losses/ties`` (seeds where A
was better / worse / equal in the metric's direction).

With ``target``: per job the first round where the metric reaches the target
and the traffic (coded MB) by then; per setting how many seeds of each side
reach it, and the paired difference in rounds and MB (A - B; lower is
better) over the seeds where both do.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .collect import FINISHED, NOT_A_SETTING, REPEAT_KEY, config_value, fill_from_config
from .stats import lower_is_better, paired

# keys that name the same thing as the method key
ALIASES = {"sparsifier": ("sparsifier", "sparsifier.name"),
           "sparsifier.name": ("sparsifier", "sparsifier.name")}


class CompareError(ValueError):
    """Bad input; the message names the key or value."""


def parse_pair(text: str):
    """``"regtopk:topk"`` -> ("regtopk", "topk")."""
    a, sep, b = str(text).partition(":")
    if not sep or not a or not b or ":" in b:
        raise CompareError(f"--compare {text!r}: must be A:B (two values of the method key, "
                           "e.g. regtopk:topk)")
    return a, b


def _label(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else str(v)
    return str(v)


def method_values(jobs: pd.DataFrame, by: str) -> pd.Series:
    """The method key of every job as a string: its override, else its config value."""
    col = jobs[by] if by in jobs else pd.Series(None, index=jobs.index, dtype=object)
    out = col.map(_label)
    missing = out == ""
    if missing.any():
        out[missing] = [_label(config_value(j, by)) for j in jobs.loc[missing, "job_dir"]]
    return out


def values_of(jobs: pd.DataFrame, curves: pd.DataFrame | None, metric: str, last=None):
    """The compared number per job: final_<metric>, or the mean over the last N
    evaluated rounds of the curves."""
    if last is None:
        col = f"final_{metric}"
        if col not in jobs:
            raise CompareError(f"metric {metric!r}: no job has {col}")
        return pd.to_numeric(jobs[col], errors="coerce")
    n = int(last)
    if curves is None or metric not in curves:
        raise CompareError(f"metric {metric!r}: not in metrics.csv")
    c = curves.dropna(subset=[metric]).sort_values(["job_dir", "round"])
    tail = c.groupby("job_dir")[metric].apply(lambda s: s.iloc[-n:].mean())
    return jobs["job_dir"].map(tail).astype(float)


def _pairs(side_a: pd.DataFrame, side_b: pd.DataFrame, column: str, setting: str, a: str, b: str):
    """(values of A, values of B) aligned by seed; unpaired seed count."""
    for name, side in ((a, side_a), (b, side_b)):
        dup = side[REPEAT_KEY][side[REPEAT_KEY].duplicated()]
        if len(dup):
            raise CompareError(f"{setting or 'the sweep'}: {len(dup) + 1} finished jobs of "
                               f"{name} with seed {dup.iloc[0]} (give each sweep once)")
    va = side_a.set_index(REPEAT_KEY)[column]
    vb = side_b.set_index(REPEAT_KEY)[column]
    common = va.index.intersection(vb.index).sort_values()
    unpaired = len(va.index.symmetric_difference(vb.index))
    return va.loc[common].to_numpy(float), vb.loc[common].to_numpy(float), list(common), unpaired


def compare(jobs: pd.DataFrame, curves: pd.DataFrame | None, a: str, b: str, metric: str,
            by: str = "sparsifier", last=None, target=None, to_target=None) -> pd.DataFrame:
    """The paired table of A against B (see the module doc). ``to_target(jobs,
    curves, metric, target)`` gives per job ``round_to_target`` and
    ``mb_to_target`` (regtopk_fl.analysis.plot.to_target)."""
    fin = jobs[jobs["status"] == FINISHED].copy()
    if REPEAT_KEY not in fin or fin[REPEAT_KEY].isna().any():
        raise CompareError("jobs without a seed cannot be paired")
    fin["_method"] = method_values(fin, by)
    available = sorted(set(fin["_method"]) - {""})
    for name in (a, b):
        if name not in available:
            raise CompareError(f"--compare {a}:{b}: no finished job has {by}={name} "
                               f"(values: {', '.join(available) or 'none'})")
    sel = fin[fin["_method"].isin([a, b])].copy()
    sel["_value"] = values_of(sel, curves, metric, last)
    if target is not None:
        hit = to_target(sel, curves, metric, float(target))
        sel["_rounds"] = hit["round_to_target"]
        sel["_mb"] = hit["mb_to_target"] if "mb_to_target" in hit else np.nan
    skip = {*NOT_A_SETTING, by, *ALIASES.get(by, ())}
    keys = []
    for k in jobs.attrs.get("override_keys", []):
        if k in skip:
            continue
        col = fill_from_config(sel, k)
        # a key that one method does not have (e.g. mu swept for RegTop-k only) is no setting
        if any(col[sel["_method"] == m].isna().all() for m in (a, b)):
            continue
        if col.map(_label).nunique() > 1:
            sel[k] = col
            keys.append(k)
    label = (lambda row: " ".join(f"{k}={_label(row[k])}" for k in keys)) if keys else (lambda row: "")
    sel["_setting"] = sel.apply(label, axis=1) if len(sel) else ""
    rows = []
    lower = lower_is_better(metric)
    for setting, g in sel.groupby("_setting", sort=False):
        side_a, side_b = g[g["_method"] == a], g[g["_method"] == b]
        if side_a.empty or side_b.empty:
            continue
        va, vb, seeds, unpaired = _pairs(side_a, side_b, "_value", setting, a, b)
        row = {"by": by, "a": a, "b": b, **{k: g[k].iloc[0] for k in keys},
               "metric": metric if last is None else f"mean_{metric}_last{int(last)}"}
        row.update(paired(va, vb, lower=lower))
        row["unpaired"] = unpaired
        row["seeds"] = " ".join(_label(s) for s in seeds)
        if target is not None:
            row["target"] = float(target)
            ra, rb, _, _ = _pairs(side_a, side_b, "_rounds", setting, a, b)
            ma, mb, _, _ = _pairs(side_a, side_b, "_mb", setting, a, b)
            row["reached_a"], row["reached_b"] = int(np.isfinite(ra).sum()), int(np.isfinite(rb).sum())
            for what, (xa, xb) in (("rounds", (ra, rb)), ("mb", (ma, mb))):
                p = paired(xa, xb, lower=True)  # fewer rounds / bytes is better
                row.update({f"{what}_n": p["n"], f"{what}_a": p["mean_a"], f"{what}_b": p["mean_b"],
                            f"{what}_diff_mean": p["diff_mean"], f"{what}_ci_low": p["ci_low"],
                            f"{what}_ci_high": p["ci_high"], f"{what}_p_wilcoxon": p["p_wilcoxon"],
                            f"{what}_wins": p["wins"]})
        rows.append(row)
    if not rows:
        raise CompareError(f"--compare {a}:{b}: no setting has finished jobs of both "
                           f"(by {by})")
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """The markdown twin of compare.csv (4 significant digits, p with 3)."""
    def cell(col, v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{v:.3g}" if col.startswith("p_") or "_p_" in col else f"{v:.4g}"
        return str(v).replace("|", r"\|")

    cols = list(table.columns)
    lines = [f"# {title}", "",
             "diff = A - B of the compared value, paired by seed; CI: 95 % t-interval of the "
             "mean difference; p_wilcoxon: scipy.stats.wilcoxon on the differences (two-sided); "
             "wins: seeds where A was better (lower gap/loss, higher accuracy).", "",
             "| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---"
                               for c in cols) + " |"]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
