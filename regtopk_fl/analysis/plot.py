"""Figures and tables of a sweep, chosen from what was swept.

* ``curves``: the metric over rounds, one line per method (sparsifier, with mu
  for RegTop-k and its distortion when that was swept), one panel per sparsity
  when sparsity was swept (dense, if present, is drawn in every panel). Gap and
  loss on a log scale (the paper's Figs. 1 and 2), accuracy linear;
* ``uplink``: the metric against the cumulative uplink in MB;
* ``traffic``: the metric against the cumulative uplink + downlink (coded MB);
* ``time``: the metric against the simulated communication time (``network.*``);
* ``heatmap``: the final gap (log10), loss (log10) or accuracy over
  (sparsity, mu), one heatmap per sparsifier, when both were swept;
* ``vs_<key>``: the final metric against ``num_workers`` or a heterogeneity key
  (``task.sigma2``, ``task.alpha``, ``task.partition``...), when swept;
* ``table.md`` / ``table.csv``: the final numbers of every job, not finished
  ones included (with their status and reason).

* ``summary.md`` / ``summary.csv``: one row per setting (seed is the repeat
  axis): n, and every final number as mean ± the half-width of its 95 %
  t-interval;
* ``compare.md`` / ``compare.csv`` (``--compare A:B``): A against B paired by
  seed, one row per setting of the other swept keys (see compare.py).

Only finished jobs are plotted; the others are listed on stderr. ``seed`` is
the repeat axis, never a line: the repeats of a line (seeds, or any repeat
with identical settings) are drawn as their mean with a band, by default the
95 % t-interval of the mean (``band="ci"``; ``"minmax"``: the range of the
repeats; ``"none"``), and the legend says which and over how many seeds. On a
log axis a band (or bar) that reaches zero or below runs down to the panel's
smallest value. Every figure is a
plain ``matplotlib.figure.Figure`` (no pyplot state).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from scipy import stats as sps

from . import compare as cmp
from .collect import (FINISHED, METRICS, CollectError, OneLineParser, _coded, curves_from,
                      fill_from_config, scan, summarise)
from .stats import LEVEL

METRIC_LABELS = {"gap": r"$\|w - w^\star\|$", "loss": "training loss",
                 "accuracy": "test accuracy (%)"}
LOG_METRICS = {"gap", "loss"}
# the methods' order in a plot: the sparsifier classes' plot_order, read from
# conf/sparsifier/*.yaml (compress.method_order; names it does not know go last)
# swept keys that the method label or the panels already show
HANDLED = {"sparsifier", "sparsifier.name", "sparsifier.sparsity", "sparsifier.mu",
           "sparsifier.distortion", "seed", "experiment"}
XKEY_PREFIXES = ("task.", "data.", "dataset.", "partition")
XKEY_LABELS = {"num_workers": "number of workers N"}
KINDS = ("curves", "uplink", "traffic", "time", "heatmap", "vs")
BANDS = ("ci", "minmax", "none")
BAND_TEXT = {"ci": f"band: {LEVEL:.0%} t-interval of the mean".replace("%", " %"),
             "minmax": "band: min–max over seeds", "none": ""}


class PlotError(ValueError):
    """Bad input; the message names the directory, job, metric or key."""


@dataclass
class Plots:
    figures: dict  # name -> Figure
    files: list = field(default_factory=list)
    metric: str = ""
    table: pd.DataFrame | None = None
    skipped: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None  # one row per setting: n, mean, half-width
    compare: pd.DataFrame | None = None  # --compare A:B, paired by seed


# ------------------------------------------------------------- helpers ------

def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def is_regtopk(sparsifier: pd.Series) -> pd.Series:
    return sparsifier.astype(str).str.startswith("regtopk")


def display_names() -> dict:
    """{sparsifier name: its display name} (the classes' ``label``; the name
    itself where a class sets none, as the older ones do)."""
    from ..compress import SPARSIFIERS

    return {name: cls.display_name() for name, cls in SPARSIFIERS.items()}


def method_labels(df: pd.DataFrame, show_distortion: bool) -> pd.Series:
    """``topk``, ``regtopk (μ=4)``, ``regtopk (μ=4, paper)``, ``DGC``...: the
    sparsifier's display name (compress/base.py), with RegTop-k's mu."""
    shown = display_names()

    def label(row):
        name = _fmt(row.get("sparsifier")) or "?"
        details = []
        if name.startswith("regtopk"):
            if _fmt(row.get("mu")):
                details.append(f"μ={_fmt(row.get('mu'))}")
            if show_distortion and _fmt(row.get("distortion")):
                details.append(_fmt(row.get("distortion")))
        return shown.get(name, name) + (f" ({', '.join(details)})" if details else "")
    return df.apply(label, axis=1) if len(df) else pd.Series(dtype=str)


def line_labels(df: pd.DataFrame, extra_keys) -> pd.Series:
    label = df["method"]
    for key in extra_keys:
        label = label + f", {key}=" + df[key].map(_fmt)
    return label


def swept(df: pd.DataFrame, keys) -> list:
    return [k for k in keys if k in df and df[k].nunique(dropna=True) > 1]


def is_xkey(key: str) -> bool:
    return key == "num_workers" or key.startswith(XKEY_PREFIXES)


def _positive(values) -> bool:
    values = pd.Series(values).dropna()
    return len(values) > 0 and bool((values > 0).all())


def palette(labels) -> dict:
    """{label: color}, in the order given (tab10, tab20 beyond ten labels)."""
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def out_file(out_dir, name: str, ext: str, prefix: str | None = None) -> Path:
    """``OUT_DIR/name.ext``, or ``OUT_DIR/PREFIX_name.ext`` with a prefix. The
    output is always inside ``out_dir``, with or without a trailing slash."""
    return Path(out_dir) / (f"{prefix}_{name}.{ext}" if prefix else f"{name}.{ext}")


def check_out(out_dir, prefix) -> None:
    """PlotError unless ``out_dir`` can be a directory and ``prefix`` a plain file-name part."""
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PlotError(f"--out {out_dir}: is a file; --out names a directory (use --prefix "
                        "for a file-name prefix)")
    if prefix is not None and (not str(prefix) or any(c in str(prefix) for c in "/\\")
                               or str(prefix) in (".", "..")):
        raise PlotError(f"--prefix {prefix!r}: must be a file-name prefix (no / or \\); "
                        "the directory is --out")


def to_markdown(df: pd.DataFrame) -> str:
    cells = df.map(_fmt).map(lambda s: s.replace("|", r"\|"))
    align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df]
    lines = ["| " + " | ".join(df.columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------- the sweep ----

@dataclass
class Sweep:
    """What was swept among the finished jobs, and how to draw it."""
    jobs: pd.DataFrame  # finished jobs, with method/line columns
    curves: pd.DataFrame  # their rounds, with method/line columns
    metric: str
    extras: list  # swept keys shown in the line label
    sparsity_panels: list  # sparsity values, one panel each ([] = one panel)
    experiment: str = ""
    colors: dict = field(default_factory=dict)
    band: str = "ci"

    def title(self, what: str) -> str:
        return f"{self.experiment}: {what}" if self.experiment else what

    def panels(self, df: pd.DataFrame):
        """[(panel title, rows)]; dense rows go into every sparsity panel."""
        if not self.sparsity_panels:
            return [("", df)]
        dense = df["sparsifier"] == "dense"
        return [(f"sparsity {s:g}", df[dense | (df["sparsity"] == s)])
                for s in self.sparsity_panels]

    def relabel(self, df: pd.DataFrame, drop=()) -> pd.DataFrame:
        """Line labels without the keys in ``drop`` (the x axis of a figure)."""
        return df.assign(line=line_labels(df, [k for k in self.extras if k not in drop]))


def describe(jobs: pd.DataFrame, curves: pd.DataFrame, metric: str, band: str = "ci") -> Sweep:
    keys = jobs.attrs.get("override_keys", [])
    fin = jobs[jobs["status"] == FINISHED].copy()
    reg = is_regtopk(fin["sparsifier"])
    show_distortion = "distortion" in fin and fin.loc[reg, "distortion"].nunique() > 1
    fin["method"] = method_labels(fin, show_distortion)
    from ..compress import method_order

    rank = {m: i for i, m in enumerate(method_order())}
    fin["_rank"] = fin["sparsifier"].map(rank).fillna(len(rank))
    fin = fin.sort_values("_rank", kind="stable").drop(columns="_rank")

    for k in keys:  # a key one sweep overrides and another does not: fill in the default
        if k in fin and fin[k].isna().any() and fin[k].notna().any():
            fin[k] = fill_from_config(fin, k)
    extras = [k for k in swept(fin, keys) if k not in HANDLED]
    fin["line"] = line_labels(fin, extras)
    sparse = fin[fin["sparsifier"] != "dense"]
    panels = sorted(sparse["sparsity"].dropna().unique()) if "sparsity" in fin else []
    panels = panels if len(panels) > 1 else []

    per_job = ["job_dir", "method", "line"]
    curves = curves[curves["status"] == FINISHED].merge(fin[per_job], on="job_dir")
    colors = palette(fin["line"].unique())
    experiment = ", ".join(map(str, fin["experiment"].dropna().unique())) \
        if "experiment" in fin else ""
    return Sweep(fin, curves, metric, extras, panels, experiment, colors, band)


def choose_metric(jobs: pd.DataFrame, curves: pd.DataFrame, metric=None) -> str:
    fin = curves[curves["status"] == FINISHED] if len(curves) else curves
    available = [m for m in METRICS if m in fin and fin[m].notna().any()]
    if metric is not None:
        if metric not in available:
            raise PlotError(f"metric {metric!r}: no finished job has it in metrics.csv "
                            f"(available: {', '.join(available) or 'none'})")
        return metric
    if not available:
        raise PlotError("no finished job has a loss, gap or accuracy in metrics.csv")
    done = jobs[jobs["status"] == FINISHED]
    if "loss" in available and "task" in done and (done["task"] == "toy").all():
        return "loss"  # Fig. 1
    return next(m for m in ("gap", "accuracy", "loss") if m in available)


# -------------------------------------------------------------- figures -----

def _set_yscale(ax, metric, values):
    if metric in LOG_METRICS and _positive(values):
        ax.set_yscale("log")


def band_limits(stats: pd.DataFrame, band: str):
    """(lower, upper) of the band per row of ``stats`` (columns mean, std, lo,
    hi, n): the t-interval of the mean (``ci``) or the range (``minmax``)."""
    if band == "minmax":
        return stats["lo"], stats["hi"]
    n = stats["n"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(n > 1, sps.t.ppf(0.5 + LEVEL / 2, np.maximum(n - 1, 1)), np.nan)
        half = t * stats["std"].to_numpy(float) / np.sqrt(n)
    return stats["mean"] - half, stats["mean"] + half


def legend_title(band: str, counts) -> str:
    """What the lines and bands are, and over how many seeds."""
    counts = sorted({int(c) for c in counts})
    if not counts or counts[-1] <= 1:
        return ""
    n = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]}–{counts[-1]}"
    text = f"mean over seeds ({n})"
    return text + (f"; {BAND_TEXT[band]}" if BAND_TEXT.get(band) else "")


def _band(ax, x, lo, hi, color, log: bool, floor=None):
    """Shade [lo, hi]; on a log axis a band reaching zero or below runs down
    to ``floor`` (the panel's smallest positive value)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if log:
        ok &= hi > 0
        lo = np.where(lo > 0, lo, floor if floor is not None else np.nan)
    if ok.any():
        ax.fill_between(np.asarray(x, float), np.where(ok, lo, np.nan), np.where(ok, hi, np.nan),
                        color=color, alpha=0.2, linewidth=0)


def _line_plot(sw: Sweep, df: pd.DataFrame, x: str, xlabel: str, what: str) -> Figure:
    """Mean over repeats (seeds) per line and x, with the sweep's band."""
    panels = sw.panels(df)
    fig = Figure(figsize=(4.8 * len(panels) + 1.5, 4.0), layout="constrained")
    axs = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    m = sw.metric
    counts = []
    for ax, (panel, d) in zip(axs, panels):
        d = d.dropna(subset=[m, x])
        stats = (d.groupby(["line", "round"], sort=False)
                 .agg(x=(x, "mean"), mean=(m, "mean"), std=(m, "std"), lo=(m, "min"),
                      hi=(m, "max"), n=(m, "size"))
                 .reset_index())
        _set_yscale(ax, m, d[m])
        log = ax.get_yscale() == "log"
        for line, s in stats.groupby("line", sort=False):
            ax.plot(s["x"], s["mean"], label=line, color=sw.colors[line])
            counts.append(s["n"].max())
            if sw.band != "none" and (s["n"] > 1).any():
                lo, hi = band_limits(s, sw.band)
                _band(ax, s["x"], lo, hi, sw.colors[line], log,
                      floor=d[m][d[m] > 0].min() if log else None)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    axs[0].set_ylabel(METRIC_LABELS[m])
    axs[-1].legend(fontsize="small", title=legend_title(sw.band, counts) or None,
                   title_fontsize="x-small")
    fig.suptitle(sw.title(what))
    return fig


def fig_curves(sw: Sweep) -> Figure:
    return _line_plot(sw, sw.curves, "round", "round",
                      f"{METRIC_LABELS[sw.metric]} over rounds")


# figure kind -> (curves column on the x axis, its label, what the title says)
AGAINST = {
    "uplink": ("uplink_mb_cum", "cumulative uplink (MB)", "uplink traffic"),
    "traffic": ("traffic_mb_cum", "cumulative uplink + downlink (MB, coded)", "total traffic"),
    "time": ("comm_s_cum", "simulated communication time (s)", "simulated time"),
}


def fig_against(sw: Sweep, kind: str) -> Figure:
    """The metric against one of the cumulative columns of :data:`AGAINST`."""
    col, xlabel, what = AGAINST[kind]
    return _line_plot(sw, sw.curves, col, xlabel, f"{METRIC_LABELS[sw.metric]} against {what}")


def heatmap_tables(sw: Sweep) -> dict:
    """{panel label: pivot table mu x sparsity} of the final metric (log10 for gap, loss)."""
    col = f"final_{sw.metric}"
    need = {"sparsity", "mu", col}
    if not need <= set(sw.jobs):
        return {}
    d = sw.jobs.dropna(subset=list(need))
    if sw.metric in LOG_METRICS:
        d = d.assign(value=np.log10(d[col].where(d[col] > 0)))
    else:
        d = d.assign(value=d[col])
    # one heatmap per sparsifier (and distortion / other swept keys, never mixed)
    group = d["sparsifier"].astype(str)
    if "distortion" in d and d.loc[is_regtopk(d["sparsifier"]), "distortion"].nunique() > 1:
        group = group + " (" + d["distortion"].map(_fmt) + ")"
    for key in sw.extras:
        group = group + f", {key}=" + d[key].map(_fmt)
    tables = {}
    for name, g in d.assign(group=group).groupby("group", sort=False):
        if g["mu"].nunique() > 1 and g["sparsity"].nunique() > 1:
            tables[name] = g.pivot_table(index="mu", columns="sparsity", values="value",
                                         aggfunc="mean")
    return tables


def fig_heatmap(sw: Sweep, tables: dict) -> Figure:
    log = sw.metric in LOG_METRICS
    label = (f"log10 final {METRIC_LABELS[sw.metric]}" if log
             else f"final {METRIC_LABELS[sw.metric]}")
    fig = Figure(figsize=(5.0 * len(tables), 4.2), layout="constrained")
    axs = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, (name, table) in zip(axs, tables.items()):
        values = table.to_numpy(dtype=float)
        im = ax.imshow(values, origin="lower", aspect="auto",
                       cmap="viridis_r" if log else "viridis")
        ax.set_xticks(range(table.shape[1]), [f"{v:g}" for v in table.columns])
        ax.set_yticks(range(table.shape[0]), [f"{v:g}" for v in table.index])
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text readable on the cell
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color="w" if dark else "k")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("μ")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, label=label)
    fig.suptitle(sw.title(f"final {METRIC_LABELS[sw.metric]} over (sparsity, μ)"))
    return fig


def fig_vs_key(sw: Sweep, key: str) -> Figure:
    """Final metric against ``key`` per method (mean over repeats, bars as the sweep's band)."""
    col = f"final_{sw.metric}"
    d = sw.relabel(sw.jobs, drop=[key]).dropna(subset=[key, col])
    numeric = pd.api.types.is_numeric_dtype(d[key])
    ticks = sorted(d[key].unique(), key=str) if not numeric else None
    d = d.assign(x=d[key] if numeric else d[key].map({v: i for i, v in enumerate(ticks)}))
    colors = palette(d["line"].unique())
    panels = sw.panels(d)
    fig = Figure(figsize=(4.8 * len(panels) + 1.5, 4.0), layout="constrained")
    axs = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    counts = []
    for ax, (panel, p) in zip(axs, panels):
        stats = (p.groupby(["line", "x"], sort=False)[col]
                 .agg(mean="mean", std="std", lo="min", hi="max", n="size").reset_index()
                 .sort_values("x", kind="stable"))
        _set_yscale(ax, sw.metric, p[col])
        log = ax.get_yscale() == "log"
        for line, s in stats.groupby("line", sort=False):
            color = colors[line]
            ax.plot(s["x"], s["mean"], marker="o", label=line, color=color)
            counts.extend(s["n"])
            spread = s[s["n"] > 1]
            if sw.band != "none" and len(spread):
                lo, hi = band_limits(spread, sw.band)
                if log:  # a bar reaching zero or below runs to the panel's smallest value
                    lo = lo.where(lo > 0, p[col][p[col] > 0].min())
                ok = (lo.notna() & hi.notna()).to_numpy()
                ax.vlines(spread["x"][ok], lo[ok], hi[ok], color=color, alpha=0.5)
        if numeric and _positive(p["x"]) and p["x"].max() / p["x"].min() >= 10:
            ax.set_xscale("log")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        ax.set_title(panel)
        ax.set_xlabel(XKEY_LABELS.get(key, key))
        ax.grid(True, alpha=0.3)
    axs[0].set_ylabel(f"final {METRIC_LABELS[sw.metric]}")
    axs[-1].legend(fontsize="small", title=legend_title(sw.band, counts) or None,
                   title_fontsize="x-small")
    fig.suptitle(sw.title(f"final {METRIC_LABELS[sw.metric]} against {key}"))
    return fig


def build_figures(sw: Sweep, x_keys=None, kinds=KINDS) -> dict:
    """{name: Figure} for everything of ``kinds`` that the sweep supports."""
    figures = {}
    if "curves" in kinds:
        figures["curves"] = fig_curves(sw)
    for kind, (col, _, _) in AGAINST.items():  # only what the runs recorded
        if kind in kinds and col in sw.curves and sw.curves[col].notna().any():
            figures[kind] = fig_against(sw, kind)
    tables = heatmap_tables(sw) if "heatmap" in kinds else {}
    if tables:
        figures["heatmap"] = fig_heatmap(sw, tables)
    if x_keys is None:
        x_keys = [k for k in sw.extras if is_xkey(k)]
    for key in x_keys if "vs" in kinds else ():
        figures["vs_" + re.sub(r"[^A-Za-z0-9]+", "_", key)] = fig_vs_key(sw, key)
    return figures


# --------------------------------------------------------------- tables -----

def final_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """Final numbers of every job (finished or not), one row each."""
    reg = is_regtopk(jobs["sparsifier"])
    show_distortion = "distortion" in jobs and jobs.loc[reg, "distortion"].nunique() > 1
    keys = [k for k in swept(jobs, jobs.attrs.get("override_keys", []))
            if k not in ("sparsifier", "sparsifier.name")]
    finals = [c for c in ("final_loss", "final_gap", "final_accuracy")
              if c in jobs and jobs[c].notna().any()]
    table = jobs.assign(method=method_labels(jobs, show_distortion))
    # coded bytes (what travels) where recorded, else raw (older runs)
    up, down = _coded(table, "uplink"), _coded(table, "downlink")
    if up is not None:
        table["uplink_mb"] = up / 1e6
    if down is not None:
        table["downlink_mb"] = down / 1e6
        table["total_mb"] = table["uplink_mb"] + table["downlink_mb"]
    columns = ["job", "method", *keys, *finals, "uplink_mb", "downlink_mb", "total_mb",
               "resyncs", "patches", "comm_s", "wall_time_s", "rounds_completed", "status",
               "reason"]
    return table[[c for c in columns if c in table]]


# ----------------------------------------------------------------- main -----

def to_target(jobs: pd.DataFrame, curves: pd.DataFrame, metric: str, target: float) -> pd.DataFrame:
    """Per job, the first round where ``metric`` reaches ``target`` (<= for gap
    and loss, >= for accuracy) and the cumulative traffic (coded MB) and
    simulated communication time by then; empty where it never does."""
    cols = ["round_to_target"] + [dst for src, dst in (("traffic_mb_cum", "mb_to_target"),
                                                       ("comm_s_cum", "comm_s_to_target"))
                                  if src in curves]
    out = pd.DataFrame(index=jobs.index, columns=cols, dtype=float)
    for i, job_dir in jobs["job_dir"].items():
        c = curves[curves["job_dir"] == job_dir]
        vals = pd.to_numeric(c[metric], errors="coerce")
        hit = c[vals >= target] if metric == "accuracy" else c[vals <= target]
        if hit.empty:
            continue
        first = hit.iloc[0]
        out.loc[i, "round_to_target"] = first["round"]
        for src, dst in (("traffic_mb_cum", "mb_to_target"), ("comm_s_cum", "comm_s_to_target")):
            if dst in out:
                out.loc[i, dst] = first[src]
    return out


def summary_table(jobs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (seed = repeat axis): the method, the swept keys, n,
    the seeds, and every final number as its mean and the half-width of its
    95 % t-interval (``<col>_hw``)."""
    fin = jobs[jobs["status"] == FINISHED]
    summ = summarise(jobs)
    if summ.empty:
        return summ
    reg = is_regtopk(fin["sparsifier"])
    show = "distortion" in fin and fin.loc[reg, "distortion"].nunique() > 1
    methods = fin.assign(method=method_labels(fin, show)).groupby("setting", sort=False)["method"].first()
    summ.insert(1, "method", summ["setting"].map(methods))
    swept_keys = set(swept(fin, jobs.attrs.get("override_keys", [])))
    keys = [k for k in jobs.attrs.get("override_keys", []) if k in summ]
    keep = ["method", *[c for c in summ.columns if c not in ("setting", "method")
                        and not c.startswith("best_") and c not in ("sparsifier", "sparsifier.name")
                        and (c not in keys or c in swept_keys)]]
    return summ[keep]


def summary_markdown(summ: pd.DataFrame, title: str) -> str:
    """The summary with each final number as ``mean ± half-width``."""
    shown = summ.copy()
    for col in [c for c in summ.columns if c.startswith("final_") and not c.endswith("_hw")]:
        hw = summ[f"{col}_hw"]
        shown[col] = [(f"{m:.4g} ± {h:.2g}" if np.isfinite(h) else _fmt(m))
                      if np.isfinite(m) else "" for m, h in zip(summ[col], hw)]
        shown = shown.drop(columns=f"{col}_hw")
    note = (f"Mean ± half-width of the {LEVEL:.0%} t-interval over the n seeds of each "
            "setting.").replace("%", " %")
    return f"# {title}\n\n{note}\n\n{to_markdown(shown)}"


def comparisons(jobs, curves, metric, pairs, by="sparsifier", last=None, target=None):
    """The paired tables of every A:B in ``pairs``, one DataFrame."""
    tables = []
    for text in pairs:
        try:
            a, b = cmp.parse_pair(text)
            tables.append(cmp.compare(jobs, curves, a, b, metric, by, last, target, to_target))
        except cmp.CompareError as e:
            raise PlotError(str(e)) from None
    return pd.concat(tables, ignore_index=True)


def plot(sweep_dirs, out=None, fmt: str = "png", metric=None, x=None, save=True,
         kinds=KINDS, dpi=150, target=None, band: str = "ci", compare=(), by="sparsifier",
         last=None, prefix=None) -> Plots:
    """Collect ``sweep_dirs``, draw what they support (of ``kinds``: curves, uplink,
    heatmap, vs) and (``save``) write into the directory ``out`` (created if
    missing; default ``SWEEP_DIR/plots/``) the figures, ``table.md/.csv``,
    ``summary.md/.csv`` and, for each ``A:B`` in ``compare``, ``compare.md/.csv``;
    each name starts with ``PREFIX_`` when ``prefix`` is given. Raises PlotError
    on bad input."""
    check_out(out, prefix)
    if band not in BANDS:
        raise PlotError(f"band {band!r}: must be one of {', '.join(BANDS)}")
    if last is not None and int(last) < 1:
        raise PlotError(f"last {last!r}: must be an integer >= 1")
    sweep_dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    try:
        jobs, metrics = scan(sweep_dirs)
    except CollectError as e:
        raise PlotError(str(e)) from None
    skipped = jobs.loc[jobs["status"] != FINISHED, ["job_dir", "status", "reason"]]
    if len(skipped) == len(jobs):
        why = "; ".join(f"{r.job_dir}: {r.status} ({r.reason})" for r in skipped.itertuples())
        raise PlotError(f"no finished job in {', '.join(map(str, sweep_dirs))}: {why}")
    if x is not None and (x not in jobs or jobs[x].isna().all()):
        keys = jobs.attrs.get("override_keys", [])
        raise PlotError(f"key {x!r}: no job has it (override keys: "
                        f"{', '.join(keys) or 'none'})")
    curves = curves_from(jobs, metrics)
    metric = choose_metric(jobs, curves, metric)
    sw = describe(jobs, curves, metric, band)
    figures = build_figures(sw, None if x is None else [x], kinds)
    table = final_table(jobs)
    if target is not None:
        table = table.join(to_target(jobs, curves, metric, float(target)))
    result = Plots(figures, [], metric, table, skipped)
    result.summary = summary_table(jobs)
    if compare:
        result.compare = comparisons(jobs, curves, metric, compare, by, last, target)
    if not save:
        return result
    out_dir = Path(out) if out is not None else Path(sweep_dirs[0]) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        path = out_file(out_dir, name, fmt, prefix)
        fig.savefig(path, format=fmt, dpi=dpi)
        result.files.append(path)
    md, csv = out_file(out_dir, "table", "md", prefix), out_file(out_dir, "table", "csv", prefix)
    heading = sw.title(f"final numbers per job (metric: {metric}"
                       + (f", target {metric} {target:g})" if target is not None else ")"))
    md.write_text(f"# {heading}\n\n{to_markdown(table)}")
    table.to_csv(csv, index=False)
    result.files += [md, csv]
    md, csv = (out_file(out_dir, "summary", "md", prefix),
               out_file(out_dir, "summary", "csv", prefix))
    md.write_text(summary_markdown(result.summary, sw.title("final numbers per setting")))
    result.summary.to_csv(csv, index=False)
    result.files += [md, csv]
    if result.compare is not None:
        md, csv = (out_file(out_dir, "compare", "md", prefix),
                   out_file(out_dir, "compare", "csv", prefix))
        what = f"final {metric}" if last is None else f"mean {metric} over the last {last} rounds"
        md.write_text(cmp.to_markdown(result.compare, sw.title(
            f"paired comparison ({', '.join(compare)} by {by}; {what})")))
        result.compare.to_csv(csv, index=False)
        result.files += [md, csv]
    return result


def main(argv=None) -> int:
    parser = OneLineParser(prog="regtopk-plot",
                            description="Figures and a table of a sweep, chosen from what was swept.")
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR",
                        help="Hydra sweep (or single run) directory")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="the directory to write into (created if missing), with or "
                             "without a trailing /: DIR/curves.png, DIR/table.md... "
                             "(default: SWEEP_DIR/plots/)")
    parser.add_argument("--prefix", default=None, metavar="P",
                        help="start every file name with P_: DIR/P_curves.png, "
                             "DIR/P_table.md...")
    parser.add_argument("--format", choices=("png", "pdf"), default="png", dest="fmt")
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="default: loss for the toy task, else gap, else accuracy")
    parser.add_argument("--x", default=None, metavar="KEY",
                        help="plot the final metric against this key (default: the swept "
                             "num_workers / task.* keys)")
    parser.add_argument("--target", type=float, default=None, metavar="VALUE",
                        help="add the round, traffic (MB) and simulated time (s) at which each "
                             "job first reaches this metric value (<= for gap/loss, >= for "
                             "accuracy) to the table (and, paired, to --compare)")
    parser.add_argument("--band", choices=BANDS, default="ci",
                        help="the band around the mean over seeds: ci = 95%% t-interval of the "
                             "mean (default), minmax = range of the seeds, none")
    parser.add_argument("--compare", action="append", default=[], metavar="A:B",
                        help="A against B paired by seed (two values of --by, e.g. "
                             "regtopk:topk) -> DIR/compare.csv/.md; may be repeated")
    parser.add_argument("--by", default="sparsifier", metavar="KEY",
                        help="the key whose values --compare names (default: sparsifier; e.g. "
                             "participation.stale_feedback)")
    parser.add_argument("--last", type=int, default=None, metavar="N",
                        help="--compare the mean of the metric over the last N evaluated rounds "
                             "instead of its final value")
    args = parser.parse_args(argv)
    try:
        result = plot(args.sweeps, args.out, args.fmt, args.metric, args.x, target=args.target,
                      band=args.band, compare=args.compare, by=args.by, last=args.last,
                      prefix=args.prefix)
    except PlotError as e:
        parser.error(str(e))
    for fig in result.figures.values():
        fig.clear()
    if len(result.skipped):
        print(f"regtopk-plot: {len(result.skipped)} of {len(result.table)} jobs not plotted:",
              file=sys.stderr)
        for r in result.skipped.itertuples():
            print(f"  {r.job_dir}: {r.status} ({r.reason})", file=sys.stderr)
    for path in result.files:
        print(path)
    _plot_observations(args.sweeps, result.files)
    return 0


def _plot_observations(sweeps, files) -> None:
    """Jobs that recorded observe.every statistics get their own figure."""
    from .observations import plot_observations

    out_dir = Path(files[0]).parent if files else None
    for sweep in sweeps:
        for obs in sorted(Path(sweep).glob("**/observations.csv")):
            job = obs.parent
            name = f"observations_{job.name}.png"
            print(plot_observations(job, (out_dir or job) / name))


if __name__ == "__main__":
    sys.exit(main())
