#!/usr/bin/env python
"""Time to a target accuracy on the suite's network model (issue #32, Shi et al.'s claim).

Shi et al. (GaussianK-SGD) report wall-clock speed-ups on 16 GPUs over 10 GbE:
Gaussian-k up to 2.33x faster than Dense, 3.63x than Top-k and 1.51x than DGC.
This script puts the suite's own convergence runs (``experiment=gaussiank``
with ``network.uplink_mbps = network.downlink_mbps = 10000``) on a synchronous
round-time model:

    T_round = t_compute + t_select(method) + comm_s

1. **t_compute**: one worker's forward and backward of the runs' model on one
   minibatch, timed here (median of ``--repeats`` after a warm-up), on this
   machine's CPU with ``--threads`` torch threads. Workers run in parallel
   in the model, so a round costs one worker's step. ``--compute-ms`` replaces
   the measurement (e.g. a GPU's step, measured elsewhere).
2. **t_select**: ``sparsifier.select`` on one worker's accumulated gradient of
   the model's J entries (the benchmark's layer-structured vector,
   ``bench_sparsifiers.make_data``), timed here the same way; 0 for Dense.
3. **comm_s**: the run's own simulated communication time of each round
   (``regtopk_fl/network.py``: the largest broadcast plus the slowest upload
   at the run's rates), summed up to the round that reaches the target.

A run reaches the target at its first evaluated round with accuracy >=
``--target``; the time is that round times (t_compute + t_select) plus the
summed comm_s. Runs are paired by seed: ``x Gaussian-k`` is the median over
the seeds where both reached the target of (this method's time / Gaussian-k's).

    python scripts/time_to_accuracy.py results/sweeps/gaussiank_compare --target 30 \
        --out results/gaussiank/time_to_accuracy.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from regtopk_fl.analysis.collect import collect, load_curves  # noqa: E402
from regtopk_fl.compress import SPARSIFIERS  # noqa: E402
from regtopk_fl.tasks.models import build_model, num_params  # noqa: E402

REFERENCE = "gaussiank"
PAPER = {"dense": 2.33, "topk": 3.63, "dgc": 1.51}  # Gaussian-k's speed-up, Shi et al.


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compute_ms(cfg, repeats: int) -> tuple:
    """One worker's forward + backward on one minibatch of the runs' model; (ms, J)."""
    task = cfg["task"]
    model = build_model(task.get("model", "resnet18"), num_classes=10, seed=0,
                        stem=task.get("stem", "cifar"), width=task.get("width", 64))
    batch = int(task.get("batch_size", 20))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return _median_ms(step, repeats), num_params(model)


def select_ms(methods, sparsity: float, dim: int, repeats: int) -> dict:
    from bench_sparsifiers import make_data  # scripts/

    _, a, ctx, _, _ = make_data(dim, sparsity, "cpu")
    out = {}
    for name in methods:
        if name == "dense":
            out[name] = 0.0
            continue
        sp = SPARSIFIERS[name](sparsity)
        out[name] = _median_ms(lambda sp=sp: sp.select(a, ctx), repeats)
    return out


def reach(curves, target: float):
    """Per (sparsifier, seed): the first evaluated round with accuracy >= target
    and the comm_s summed up to it; None where the run never reached it."""
    rows = {}
    for (method, seed), c in curves.groupby(["sparsifier", "seed"]):
        c = c.sort_values("round")
        hit = c[c["accuracy"] >= target]
        if hit.empty:
            rows[(method, seed)] = None
            continue
        r = int(hit["round"].iloc[0])
        comm = float(c.loc[c["round"] <= r, "comm_s"].fillna(0).sum())
        rows[(method, seed)] = (r, comm)
    return rows


def table(curves, target: float, t_c: float, t_s: dict) -> list:
    reached = reach(curves, target)
    methods = [m for m in ("dense", "topk", "gaussiank", "dgc", "trimmed_topk", "randomk",
                           "regtopk") if m in set(curves["sparsifier"])]
    seeds = sorted(set(curves["seed"]))
    secs = {}
    for (m, seed), hit in reached.items():
        if hit is not None:
            r, comm = hit
            secs[(m, seed)] = r * (t_c + t_s[m]) / 1e3 + comm
    lines = [f"| method | seeds at {target:g} % | rounds to target, mean (range) | "
             "select ms | comm s to target | compute + select s to target | "
             "time to target s, mean | ÷ Gaussian-k's, median over seeds | Shi et al. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        hits = [(s, reached[(m, s)]) for s in seeds if reached.get((m, s))]
        if not hits:
            lines.append(f"| {m} | 0 of {len(seeds)} | - | {t_s[m]:.2f} | - | - | - | - | "
                         f"{PAPER.get(m, '-')} |")
            continue
        rounds = [h[0] for _, h in hits]
        comm = statistics.fmean(h[1] for _, h in hits)
        busy = statistics.fmean(r * (t_c + t_s[m]) / 1e3 for r in rounds)
        mean_t = statistics.fmean(secs[(m, s)] for s, _ in hits)
        ratios = [secs[(m, s)] / secs[(REFERENCE, s)] for s, _ in hits
                  if (REFERENCE, s) in secs]
        ratio = f"{statistics.median(ratios):.2f} (n = {len(ratios)})" if ratios else "-"
        paper = f"{PAPER[m]:g}" if m in PAPER else "-"
        lines.append(f"| {m} | {len(hits)} of {len(seeds)} | {statistics.fmean(rounds):.0f} "
                     f"({min(rounds)}-{max(rounds)}) | {t_s[m]:.2f} | {comm:.3f} | {busy:.1f} | "
                     f"{mean_t:.1f} | {ratio} | {paper} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path, nargs="+")
    ap.add_argument("--target", type=float, required=True, help="test accuracy, percent")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compute-ms", type=float, default=None,
                    help="one worker's step in ms instead of timing it here")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.target <= 100:
        ap.exit(2, f"time_to_accuracy: --target={args.target}: must be in (0, 100]\n")
    torch.set_num_threads(args.threads)
    jobs = collect(args.sweep)
    jobs = jobs[jobs["status"] == "finished"]
    if jobs.empty:
        ap.exit(2, f"time_to_accuracy: {args.sweep[0]}: no finished job\n")
    curves = load_curves(args.sweep)
    curves = curves[curves["job_dir"].isin(set(jobs["job_dir"]))]
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(OmegaConf.load(Path(jobs["job_dir"].iloc[0]) / ".hydra"
                                                / "config.yaml"))
    t_c, dim = compute_ms(cfg, args.repeats)
    if args.compute_ms is not None:
        t_c = args.compute_ms
    sparsity = float(jobs.loc[jobs["sparsifier"] != "dense", "sparsity"].iloc[0])
    t_s = select_ms(sorted(set(curves["sparsifier"])), sparsity, dim, args.repeats)
    net = cfg.get("network", {})
    head = [f"- runs: {', '.join(str(s) for s in args.sweep)} ({len(jobs)} finished jobs, "
            f"N = {cfg['num_workers']} workers, S = {sparsity:g}, J = {dim:,})",
            f"- network: uplink {net.get('uplink_mbps')} Mb/s, downlink "
            f"{net.get('downlink_mbps')} Mb/s, latency {net.get('latency_ms')} ms",
            f"- t_compute: {t_c:.1f} ms per round ("
            + ("given" if args.compute_ms is not None else
               f"timed here, {args.threads} thread(s), median of {args.repeats}") + ")",
            ""]
    text = "\n".join(head + table(curves, args.target, t_c, t_s)) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
