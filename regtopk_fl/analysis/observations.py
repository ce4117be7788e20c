"""Figures of the Gaussian-k observations a run records with observe.every
(observations.csv, histograms.npz): histograms of the accumulated gradient,
Top-k's contraction ratio against its bounds, Gaussian-k's selected count."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_observations(run_dir, out_png) -> Path:
    run_dir, out_png = Path(run_dir), Path(out_png)
    obs = pd.read_csv(run_dir / "observations.csv")
    hist = np.load(run_dir / "histograms.npz")
    fig = Figure(figsize=(15, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for r in obs["round"]:
        counts, edges = hist[f"r{r}_counts"], hist[f"r{r}_edges"]
        centers = 0.5 * (edges[1:] + edges[:-1])
        std = float(obs.loc[obs["round"] == r, "std"].iloc[0]) or 1.0
        ax1.semilogy(centers / std, np.maximum(counts, 0.5), label=f"iteration {r}")
    ax1.set(title="accumulated gradient a (worker 0)", xlabel="(a - mean) / std",
            ylabel="entries per bin (log)")
    ax1.legend(fontsize=7)
    ax2.plot(obs["round"], obs["topk_contraction"], "o-", label="||u - Top_k(u)||² / ||u||²")
    ax2.plot(obs["round"], obs["bound_1_minus_k_over_d"], "--", label="1 - k/d")
    ax2.plot(obs["round"], obs["bound_sq"], ":", label="(1 - k/d)²")
    ax2.set(title="Top-k contraction vs bounds", xlabel="iteration", ylabel="ratio")
    ax2.legend(fontsize=7)
    ax3.semilogy(obs["round"], obs["gaussiank_count"], "o-", label="Gaussian-k selected")
    ax3.semilogy(obs["round"], obs["k"], "--", label="k")
    ax3.fill_between(obs["round"], 2 * obs["k"] / 3, 4 * obs["k"] / 3, alpha=0.2,
                     label="[2k/3, 4k/3]")
    ax3.set(title="Gaussian-k count", xlabel="iteration", ylabel="entries (log)")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
