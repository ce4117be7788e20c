"""The Fig. 3 evidence of issue #30, from the runs of scripts/fig3_evidence.sh
to the verdict table: raw files kept, paired comparisons, one row per claim.

    python scripts/fig3_verdict.py            # keep + compare + verdict
    python scripts/fig3_verdict.py --no-keep  # recompute from results/fig3/ alone

1. keep: every job of each stage's sweep (``results/sweeps/fig3_<stage>/<n>/``)
   is copied to ``results/fig3/<stage>/runs/<n>/``: ``metrics.csv``,
   ``summary.json`` and ``.hydra/`` (what ``regtopk-plot`` reads); of the warm
   start its run files, not its 2.8 MB ``model.pt``: ``fig3_evidence.sh
   warm_init`` remakes it, and the warm runs' ``summary.json`` holds its sha256.
2. compare: for each stage, ``regtopk-plot results/fig3/<stage>/runs --metric
   accuracy --compare regtopk:topk --out results/fig3/<stage>/`` (the final
   accuracy) and the same with ``--last 5`` into ``.../last5/`` (the mean of
   the last five evaluations, steadier than one). Anyone can rerun these two
   commands on the committed files.
3. verdict: ``results/fig3/verdict.md``, one row per claim of the paper, from
   the ``compare.csv`` files (and Figs. 1-2 from their recorded files); the
   same table replaces the block between ``<!-- verdict:begin -->`` and
   ``<!-- verdict:end -->`` in ``results/README.md``.

The verdict word of a row, from the 95 % CI of RegTop-k - Top-k:
* reproduced: the CI lies above 0 and (where the paper states a size) reaches it;
* not reproduced: the CI lies below the size the paper states, or below 0;
* not resolved: the CI holds 0 (and the stated size, if any);
  but a stage whose seeds all tie (the same final accuracy) is not reproduced.
A stage without finished pairs says "not run" and how to run it.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "fig3"
MACHINE = "CPU: 2-core AMD EPYC, 1 torch thread a job, 2 jobs side by side"

# stage -> (what the row says, the paper's stated size in points or None, the command)
STAGES = {
    "paper_1e-3": ("Fig. 3, the paper's text: CIFAR-10, width-16 ResNet-18, N = 8, S = 1e-3, "
                   "1500 it.", 8.0, "bash scripts/fig3_evidence.sh paper_1e-3"),
    "paper_1e-4": ("Fig. 3, the paper's text at the authors' S = 1e-4 (width 16, 1500 it.)", 8.0,
                   "bash scripts/fig3_evidence.sh paper_1e-4"),
    "ablation_base": ("ablation base: the paper's text (tiny_image, N = 8, S = 0.01, 300 it.)",
                      None, "bash scripts/fig3_evidence.sh ablation"),
    "ablation_local": ("+ 10 local steps, the last minibatch's gradient uploaded", None,
                       "ABLATION=local bash scripts/fig3_evidence.sh ablation"),
    "ablation_softmax": ("+ softmax before the cross-entropy", None,
                         "ABLATION=softmax bash scripts/fig3_evidence.sh ablation"),
    "ablation_sparsity": ("+ S / 10 (as 1e-4 against 1e-3)", None,
                          "ABLATION=sparsity bash scripts/fig3_evidence.sh ablation"),
    "ablation_uniform": ("+ the server's 1/N average instead of data shares", None,
                         "ABLATION=uniform bash scripts/fig3_evidence.sh ablation"),
    "ablation_bn": ("+ BatchNorm as the authors: tested in train mode, batches of 20", None,
                    "ABLATION=bn bash scripts/fig3_evidence.sh ablation"),
    "ablation_all": ("all five switches together (the authors' protocol)", None,
                     "ABLATION=all bash scripts/fig3_evidence.sh ablation"),
    "scratch_half": ("from scratch, half of CIFAR-10 (width 16, S = 1e-3, 200 it.)", None,
                     "bash scripts/fig3_evidence.sh scratch_half"),
    "warm": ("warm start: a dense-trained model (the other half), then the same as above",
             None, "bash scripts/fig3_evidence.sh warm_init warm"),
}


def keep(sweeps: Path) -> None:
    """Copy each stage's job files into results/fig3/<stage>/runs/."""
    for stage in STAGES:
        src = sweeps / f"fig3_{stage}"
        if not src.is_dir():
            continue
        dst = OUT / stage / "runs"
        for job in sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
            if not (job / "summary.json").exists():
                continue
            d = dst / job.name
            d.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.csv", "summary.json"):
                shutil.copy2(job / name, d / name)
            if (job / ".hydra").is_dir():
                shutil.copytree(job / ".hydra", d / ".hydra", dirs_exist_ok=True)
        if (src / "multirun.yaml").exists() and dst.is_dir():
            shutil.copy2(src / "multirun.yaml", dst / "multirun.yaml")
    init = sweeps / "fig3_warm_init"
    if (init / "summary.json").exists():
        d = OUT / "warm_init"
        d.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "summary.json"):  # model.pt (2.8 MB) stays out of git
            if (init / name).exists():
                shutil.copy2(init / name, d / name)
        if (init / ".hydra").is_dir():
            shutil.copytree(init / ".hydra", d / ".hydra", dirs_exist_ok=True)


def plot(stage: str) -> None:
    runs = OUT / stage / "runs"
    base = [sys.executable, "-m", "regtopk_fl.analysis.plot", str(runs), "--metric", "accuracy",
            "--compare", "regtopk:topk"]
    for extra, out in (([], OUT / stage), (["--last", "5"], OUT / stage / "last5")):
        subprocess.run([*base, *extra, "--out", f"{out}/"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)


def verdict_word(lo: float, hi: float, size) -> str:
    if size is not None and hi < size:
        return "not reproduced"
    if hi < 0:
        return "not reproduced"
    if lo > 0:
        return "reproduced"
    return "not resolved"


def _num(v) -> str:
    """As compare.md prints it (4 significant digits), with its sign."""
    return ("+" if v > 0 else "") + f"{v:.4g}"


def stage_row(stage: str) -> dict:
    label, size, cmd = STAGES[stage]
    f = OUT / stage / "compare.csv"
    if not f.exists():
        return {"claim": label, "measured": f"not run (`{cmd}`)", "n": "", "verdict": "not run",
                "link": ""}
    c = pd.read_csv(f).iloc[0]
    last = pd.read_csv(OUT / stage / "last5" / "compare.csv").iloc[0]
    n = int(c["n"])
    measured = (f"{_num(c['diff_mean'])} points [{_num(c['ci_low'])}, {_num(c['ci_high'])}], "
                f"p = {c['p_wilcoxon']:.3g}, RegTop-k better on {int(c['wins'])} of {n}; "
                f"last 5 evaluations: {_num(last['diff_mean'])} [{_num(last['ci_low'])}, "
                f"{_num(last['ci_high'])}]")
    word = verdict_word(c["ci_low"], c["ci_high"], size)
    if int(c["ties"]) == n:  # the same accuracy on every seed: no gap opens at all
        measured += f"; tied on all {n} seeds"
        word = "not reproduced"
    return {"claim": label, "measured": measured, "n": n, "verdict": word,
            "link": f"[compare](fig3/{stage}/compare.md), [fig3.md](fig3.md)",
            "_lo": c["ci_low"], "_hi": c["ci_high"]}


def earlier_rows() -> list:
    """Figs. 1 and 2 from their recorded files (made before this issue)."""
    rows = []
    t = (ROOT / "results" / "fig1_toy" / "table.md").read_text()
    loss = {ln.split("|")[2].strip(): ln.split("|")[3].strip()
            for ln in t.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()}
    rows.append({
        "figure": "Fig. 1", "claim": "two-worker toy: Top-1 never moves, RegTop-1 tracks dense",
        "paper": "Top-1 flat, RegTop-1 ≈ dense",
        "measured": (f"loss after 100 it.: Top-1 {loss.get('topk')} (the initial loss), "
                     f"RegTop-1 {loss.get('regtopk (μ=1)')}, dense {loss.get('dense')}"),
        "n": "1 (deterministic)", "machine": "CPU, Flower", "verdict": "reproduced",
        "link": "[fig1_toy](fig1_toy/table.md), [fig1.md](fig1.md)"})
    c = pd.read_csv(ROOT / "results" / "seeds" / "fig2_linreg" / "compare.csv")
    for _, r in c.iterrows():
        word = "reproduced" if r["ci_high"] < 0 else (
            "not reproduced" if r["ci_low"] > 0 else "not resolved")
        rows.append({
            "figure": "Fig. 2", "claim": f"linear regression, N = 20, S = {r['sparsifier.sparsity']:g}",
            "paper": "RegTop-k's gap ‖w − w*‖ below Top-k's",
            "measured": (f"gap {_num(r['diff_mean'])} [{_num(r['ci_low'])}, "
                         f"{_num(r['ci_high'])}], p = {r['p_wilcoxon']:.3g}, RegTop-k better on "
                         f"{int(r['wins'])} of {int(r['n'])}"),
            "n": int(r["n"]), "machine": "CPU, in-process", "verdict": word,
            "link": "[compare](seeds/fig2_linreg/compare.md), [fig2.md](fig2.md)"})
    return rows


def fig3_rows() -> list:
    rows = []
    for stage in STAGES:
        r = stage_row(stage)
        size = STAGES[stage][1]
        r["figure"] = "Fig. 3" if stage.startswith("paper") else (
            "Fig. 3, ablation" if stage.startswith("ablation") else "Fig. 3, warm start")
        r["paper"] = ("RegTop-k above Top-k by > 8 points" if size else
                      "RegTop-k above Top-k (accuracy)")
        r["machine"] = MACHINE if r["n"] != "" else ""
        r["base"] = stage in ("ablation_base", "scratch_half")
        rows.append(r)
    rows.append({
        "figure": "Fig. 3", "claim": "the paper's text on the full network (width 64, 1500 it.) "
        "on a GPU, with seeds", "paper": "RegTop-k above Top-k by > 8 points",
        "measured": "not measured: no GPU (`scripts/gpu_fig3_verdict.sh` is prepared; one earlier "
                    "H200 run, n = 1: +1.86 points, no interval)",
        "n": "", "machine": "", "verdict": "not measured: no GPU", "link": "[fig3](fig3.md)"})
    return rows


def overall(rows: list) -> dict:
    """The Fig. 3 summary row: reproduced, or reproduced only under the
    switches whose rows are, or not."""
    text = [r for r in rows if r["figure"] == "Fig. 3" and r.get("_lo") is not None]
    # a switch is a cause where its row is reproduced and its group's base row is not
    base_ok = {g: any(r["figure"] == g and r.get("base") and r["verdict"] == "reproduced"
                      for r in rows) for g in ("Fig. 3, ablation", "Fig. 3, warm start")}
    causes = [r["claim"] for r in rows if r["figure"] in base_ok and not r.get("base")
              and not base_ok[r["figure"]] and r["verdict"] == "reproduced"]
    if any(r["verdict"] == "reproduced" for r in text):
        word = "reproduced"
    elif causes:
        word = "reproduced only under " + "; ".join(causes)
    elif text:
        word = "not reproduced" if all(r["verdict"] == "not reproduced" for r in text) \
            else "not resolved"
    else:
        word = "not run"
    return {"figure": "Fig. 3", "claim": "**overall** (the rows below)", "paper":
            "RegTop-k above Top-k by > 8 points at 1500 it.", "measured": "", "n": "",
            "machine": "", "verdict": f"**{word}**", "link": ""}


def table(rows: list) -> str:
    cols = ("figure", "claim", "paper", "measured", "n", "machine", "verdict", "link")
    head = "| " + " | ".join(("figure", "setting", "the paper says", "RegTop-k − Top-k "
                              "[95 % CI], p (Wilcoxon), wins", "n", "machine", "verdict",
                              "table")) + " |"
    lines = [head, "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", r"\|") for c in cols) + " |")
    return "\n".join(lines)


RULE = ("Verdict from the 95 % CI of the paired difference: *reproduced*, the CI lies on the "
        "paper's side of 0 and reaches the size it states; *not reproduced*, the CI excludes "
        "the stated size or lies on the other side of 0, or every seed ties; *not resolved*, "
        "the CI holds 0. "
        "Fig. 3 differences are test-accuracy points after the last round (positive: RegTop-k "
        "better), Fig. 2's the final gap ‖w − w*‖ (negative: RegTop-k better). Made by "
        "`python scripts/fig3_verdict.py` from the committed runs.")


def details() -> str:
    """Per stage: its command, every seed's final accuracy and the wall time
    of its jobs (from the kept summary.json files)."""
    out = []
    for stage, (label, _, cmd) in STAGES.items():
        runs = OUT / stage / "runs"
        summaries = [json.loads(f.read_text()) for f in sorted(runs.glob("*/summary.json"))] \
            if runs.is_dir() else []
        fin = [x for x in summaries if x.get("status") == "finished"]
        out.append(f"### {label}")
        if not fin:
            out += ["", f"Not run: `{cmd}`.", ""]
            continue
        acc = {(x["seed"], x["sparsifier"]): x["final"]["accuracy"] for x in fin}
        seeds = sorted({sd for sd, _ in acc})
        wall = sorted(x["wall_time_s"] for x in fin)
        out += ["", f"`{cmd}` ([compare](fig3/{stage}/compare.md), "
                f"[last 5](fig3/{stage}/last5/compare.md), [curves](fig3/{stage}/curves.png), "
                f"[per job](fig3/{stage}/table.md)); {len(fin)} jobs, "
                f"{wall[0]:.0f}-{wall[-1]:.0f} s each.", "",
                "| seed | Top-k | RegTop-k | RegTop-k − Top-k |", "| ---: | ---: | ---: | ---: |"]
        for sd in seeds:
            t, r = acc.get((sd, "topk")), acc.get((sd, "regtopk"))
            d = "" if t is None or r is None else f"{r - t:+.2f}"
            out.append(f"| {sd} | {'' if t is None else f'{t:.2f} %'} | "
                       f"{'' if r is None else f'{r:.2f} %'} | {d} |")
        out.append("")
    return "\n".join(out)


def relink(md: str) -> str:
    """The links of a results/ page, as results/fig3/verdict.md needs them."""
    import re

    def fix(m):
        target = m.group(1)
        if target.startswith(("http:", "https:", "#")):
            return m.group(0)
        return "](" + (target[len("fig3/"):] if target.startswith("fig3/") else "../" + target) + ")"

    return re.sub(r"\]\(([^)]+)\)", fix, md)


def replace_block(page: Path, name: str, md: str) -> None:
    """Put ``md`` between ``<!-- name:begin -->`` and ``<!-- name:end -->``
    of ``page``; a page without both markers is left alone."""
    text = page.read_text() if page.exists() else ""
    b, e = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if b in text and e in text:
        head, rest = text.split(b, 1)
        _, tail = rest.split(e, 1)
        page.write_text(f"{head}{b}\n{md}{e}{tail}")


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=Path, default=ROOT / "results" / "sweeps")
    ap.add_argument("--no-keep", action="store_true", help="use results/fig3/ as it is")
    ap.add_argument("--out", type=Path, default=OUT, help="default: results/fig3")
    ap.add_argument("--index", type=Path, default=ROOT / "results" / "README.md",
                    help="the page whose verdict block is replaced")
    args = ap.parse_args(argv)
    OUT = args.out
    if not args.no_keep:
        keep(args.sweeps)
    for stage in STAGES:
        runs = OUT / stage / "runs"
        if runs.is_dir():
            try:
                plot(stage)
            except subprocess.CalledProcessError as exc:  # e.g. no finished pair yet
                print(f"{stage}: regtopk-plot failed ({exc.returncode}); row says not run",
                      file=sys.stderr)
                for f in (OUT / stage / "compare.csv",):
                    f.unlink(missing_ok=True)
    f3 = fig3_rows()
    rows = earlier_rows() + [overall(f3)] + f3
    md = table(rows) + "\n\n" + RULE + "\n"
    (OUT / "verdict.md").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "verdict.md").write_text("# The verdict on the paper's figures\n\n" +
                                    relink(md))
    replace_block(args.index, "verdict", md)
    # the detail page (beside the index: the same links) holds the same rows
    replace_block(args.index.parent / "fig3.md", "verdict", md)
    replace_block(args.index.parent / "fig3.md", "details",
                  "## Each stage, seed by seed\n\n" + details())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
