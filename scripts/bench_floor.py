"""The suite's round against a plain PyTorch loop of the same round (issue #34).

    python scripts/bench_floor.py [--repeat 5] [--rounds 30] [--methods dense topk regtopk] \
        [--runtimes inprocess flower] [--out results/bench_floor.md]
    python scripts/bench_floor.py --paired [--rounds 60] [--methods ...]   # round by round

The workload (the one pfl-research and BlazeFL were measured on, issue #34):
ResNet-18 with the CIFAR stem at width 16 on CIFAR-10, N = 100 clients of
50 images each (iid), m = 10 sampled per round, one SGD step of batch 20,
lr 0.01, the server's plain mean, 2 torch threads, 30 rounds; s/round is the
median of metrics.csv's round-to-round wall time over rounds 3-30.

**The floors** take the suite's own task (its images, model, initial
weights and every client's batch of every round) and the suite's sampler
(the same m clients each round), and nothing else of it:

* ``floor dense``: one ``nn.Module``, its parameters views into one flat
  tensor and their ``.grad`` views into one flat gradient buffer; the
  sampled clients' backward passes one after another accumulate into that
  buffer, then one in-place SGD step with lr / m (the mean).
* ``floor topk``: the same loop with error feedback: per client, the buffer
  is zeroed, the backward pass writes g into it, ``a = eps_n + g`` in place,
  ``torch.topk(a.abs(), k)``, the k values scatter-added into the round's
  aggregate and zeroed in ``eps_n``; then the SGD step with the mean. It is
  the Top-k floor of both ``topk`` and ``regtopk`` rows.

What the floors leave out that the suite does (so the ratios are the cost
of the suite's protocol and bookkeeping, not a different computation):
BatchNorm's running statistics run on from client to client in the floor,
where the suite starts every client from the server's statistics and
averages what they return (the same forward and backward arithmetic; the
statistics are not trained parameters); no trust checks, digests, byte
counts, downlink plans or metrics rows; the floor's mean is 1/m, the
suite's the data-share weights (equal here: 50 images each).

The suite runs through ``regtopk_fl.runner.run_experiment`` in this
process, exactly as ``regtopk-fl`` with the same overrides would
(``runtime=inprocess|flower``, ``sparsifier=dense|topk|regtopk``,
``sparsifier.sparsity=0.001``, RegTop-k's mu = 5). Every case runs
``--repeat`` times, interleaved (all cases once, then again in reverse order:
ABBA, so that a drift of the machine over a repetition favours no case), and the table
gives the median and spread (min-max) of s/round and of the ratio to the
floor taken pairwise within a repetition. pfl-research and BlazeFL are not
run here (this machine has no internet to install them); the issue's
numbers for them come from another session.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from _report import cpu_name, emit, spread  # noqa: E402  (scripts/_report.py)

DATA = ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
SPARSITY = 0.001


def workload(rounds: int, data: str, cache: str, threads: int = 2) -> list:
    """The issue's workload as the suite's overrides."""
    return ["task=cifar10", "task.width=16", "task.stem=cifar", "task.subset_per_class=500",
            "task.test_subset=100", "task.partition=iid", "num_workers=100",
            "participation.clients_per_round=10", "lr=0.01", "task.batch_size=20",
            f"threads={threads}", f"rounds={rounds}", f"eval_every={rounds}",
            "checkpoint.every=0", "progress=false", f"task.data_path={data}",
            f"task.cache_dir={cache}"]


def method_overrides(method: str) -> list:
    if method == "dense":
        return ["sparsifier=dense"]
    extra = ["sparsifier.mu=5"] if method == "regtopk" else []
    return [f"sparsifier={method}", f"sparsifier.sparsity={SPARSITY}"] + extra


def _cfg(overrides):
    from conftest import compose_cfg  # the launcher's config, composed by Hydra

    return compose_cfg(overrides)


def median_step(wall: list, skip: int = 2) -> float:
    """Median of the round-to-round times from round ``skip + 1`` on (1-based):
    rounds 3.. with the default, as the issue measures."""
    steps = [b - a for a, b in zip(wall[skip - 1:], wall[skip:])]
    return statistics.median(steps)


class Floor:
    """The plain loop on the suite's task: one model, flat parameters and
    gradient, clients in sequence. ``k=None``: dense mean; else Top-k with
    error feedback (``torch.topk``)."""

    def __init__(self, task, sampler, lr: float, k: int | None = None):
        import torch

        self.task, self.sampler, self.lr, self.k = task, sampler, float(lr), k
        model = task.model
        self.params = list(model.parameters())
        self.flat = task.init_params().clone()
        self.grad = torch.zeros_like(self.flat)
        off = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.data = self.flat[off:off + n].view_as(p)
                p.grad = self.grad[off:off + n].view_as(p)
                off += n
        self._load_buffers(task.init_buffers())
        self.agg = None if k is None else torch.zeros_like(self.flat)
        self.memory = {}  # client -> its residual eps_n (Top-k), made when first sampled

    def _load_buffers(self, flat):
        from regtopk_fl.tasks.models import buffer_tensors

        if flat is None:
            return
        off = 0
        for t in buffer_tensors(self.task.model):
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()

    def round(self, t: int) -> None:
        import torch
        import torch.nn.functional as F

        clients = self.sampler.clients(t)
        model = self.task.model
        model.train()
        self.grad.zero_()
        if self.k is not None:
            self.agg.zero_()
        for n in clients:
            x, y = self.task.batch(n, t, 0)
            if self.k is not None:
                self.grad.zero_()
            F.cross_entropy(model(x), y).backward()  # accumulates into self.grad
            if self.k is not None:
                a = self.memory.get(n)
                a = self.grad.clone() if a is None else a.add_(self.grad)
                idx = torch.topk(a.abs(), self.k, sorted=False).indices
                self.agg.index_add_(0, idx, a.index_select(0, idx))
                a.index_fill_(0, idx, 0.0)
                self.memory[n] = a
        with torch.no_grad():
            self.flat.sub_(self.grad if self.k is None else self.agg,
                           alpha=self.lr / len(clients))


def run_floor(cfg, rounds: int, topk: bool) -> list:
    """Wall times after each round (metrics.csv's ``wall_s`` equivalent).
    ``topk``: the error-feedback Top-k floor with the suite's k for the
    configured sparsity (the sparsifier's own budget)."""
    from regtopk_fl import participation
    from regtopk_fl.runner import build, torch_threads

    task, sparsifier = build(cfg)
    k = sparsifier.budget(task.dim) if topk else None
    sampler = participation.from_cfg(cfg, task.num_examples())
    with torch_threads(int(cfg.threads)):
        floor = Floor(task, sampler, float(cfg.lr), k)
        t0, wall = time.perf_counter(), []
        for t in range(1, rounds + 1):
            floor.round(t)
            wall.append(time.perf_counter() - t0)
    return wall


def run_suite(cfg, run_dir: Path, start: bool = False) -> list:
    """metrics.csv's ``wall_s`` after each round 1..R, as :func:`run_floor`
    returns them (``start``: with row 0's first, the initial evaluation)."""
    from regtopk_fl.runner import run_experiment

    run_experiment(cfg, run_dir)
    with open(run_dir / "metrics.csv") as fh:
        return [float(r["wall_s"]) for r in csv.DictReader(fh)
                if start or int(r["round"]) >= 1]


def cases(methods, runtimes) -> list:
    """(name, floor k or None | 'suite', overrides) in the order of one repetition."""
    out = []
    if "dense" in methods:
        out.append(("floor dense", "dense", []))
    if {"topk", "regtopk"} & set(methods):
        out.append(("floor topk", "topk", []))
    for method in methods:
        for runtime in runtimes:
            out.append((f"{runtime} {method}", "suite",
                        [f"runtime={runtime}"] + method_overrides(method)))
    return out


def floor_of(name: str) -> str:
    return "floor dense" if name.endswith("dense") else "floor topk"


def bench(args, tmp: Path) -> list:
    base = workload(args.rounds, args.data, args.cache, args.threads) + args.set
    rows = []
    order = cases(args.methods, args.runtimes)
    for rep in range(args.repeat):
        # odd repetitions in reverse (ABBA): a drift of the machine over a
        # repetition favours no case, so the pairwise ratios' median cancels it
        for name, kind, ov in (order if rep % 2 == 0 else order[::-1]):
            cfg = _cfg(base + (ov if kind == "suite" else method_overrides(kind)))
            t0 = time.perf_counter()
            if kind == "suite":
                wall = run_suite(cfg, tmp / f"{name.replace(' ', '-')}-{rep}")
            else:
                wall = run_floor(cfg, args.rounds, topk=kind == "topk")
            rows.append({"case": name, "rep": rep, "s_per_round": median_step(wall),
                         "total_s": time.perf_counter() - t0, "load": os.getloadavg()[0]})
            print(rows[-1], flush=True)
    return rows


def compute_ab(cfg, rounds: int, pairs: int) -> dict:
    """``--compute``: the suite's ``task.gradients`` for each round's sampled
    clients (its in-process loop: each client's model loaded, fresh ``.grad``
    tensors, their concatenation) against the dense floor's whole round,
    alternated ``pairs`` times in this process, each on its own task object
    (the floor rebinds its model's parameters), rounds 1..``rounds`` each
    time. Seconds per round: {"suite": [...], "floor": [...]}. Separates
    what the code adds to the arithmetic from the machine's drift between
    runs."""
    import torch

    from regtopk_fl import participation
    from regtopk_fl.runner import build, torch_threads

    suite_task, _ = build(cfg)
    floor_task, _ = build(cfg)
    sampler = participation.from_cfg(cfg, suite_task.num_examples())
    params, bufs = suite_task.init_params(), suite_task.init_buffers()
    out = {"suite": [], "floor": []}
    with torch_threads(int(cfg.threads)):
        floor = Floor(floor_task, sampler, float(cfg.lr), None)

        def suite_rounds():
            for t in range(1, rounds + 1):
                clients = sampler.clients(t)
                suite_task.gradients(params.unsqueeze(0).expand(len(clients), -1), bufs,
                                     clients, t, 0)

        def floor_rounds():
            for t in range(1, rounds + 1):
                floor.round(t)

        suite_rounds(), floor_rounds()  # warm-up
        for _ in range(pairs):
            for name, fn in (("suite", suite_rounds), ("floor", floor_rounds)):
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) / rounds)
    return out


def paired(cfg, rounds: int, topk: bool) -> dict:
    """``--paired``: the suite's in-process run (``run_experiment``, every
    step of the runner's loop) and its floor, advanced alternately round by
    round in this process: after the suite's round t, the floor's round t
    runs inside it (``InProcessRun.round`` wrapped), timed on its own and
    taken off the suite's round-to-round time. Adjacent rounds see the same
    machine, so a drift over the run (the spread of whole runs: 0.40-0.53
    s/round for the floor alone on one day) cancels in each pair. The floor
    has its own task object (it rebinds its model's parameters). Returns
    {"suite": [s per round], "floor": [...]} for rounds 1..``rounds``."""
    from regtopk_fl import engine, participation
    from regtopk_fl.runner import build, run_experiment, torch_threads

    floor_task, sparsifier = build(cfg)
    k = sparsifier.budget(floor_task.dim) if topk else None
    sampler = participation.from_cfg(cfg, floor_task.num_examples())
    floor_s: list = []
    inner = engine.InProcessRun.round
    with torch_threads(int(cfg.threads)):
        floor = Floor(floor_task, sampler, float(cfg.lr), k)

    def round_then_floor(self, t, observer=None):
        out = inner(self, t, observer)
        t0 = time.perf_counter()
        floor.round(t)
        floor_s.append(time.perf_counter() - t0)
        return out

    engine.InProcessRun.round = round_then_floor
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wall = run_suite(cfg, Path(tmp) / "run", start=True)
    finally:
        engine.InProcessRun.round = inner
    if len(wall) != rounds + 1 or len(floor_s) != rounds:  # row 0: the initial evaluation
        raise RuntimeError(f"paired: {len(wall)} metrics rows and {len(floor_s)} floor "
                           f"rounds for {rounds} rounds")
    suite_s = [b - a - f for a, b, f in zip(wall, wall[1:], floor_s)]
    return {"suite": suite_s, "floor": floor_s}


def paired_report(results: dict, rounds: int, skip: int, threads: int, argv_text: str) -> list:
    """The ``--paired`` table: per method, the suite's and the floor's
    s/round (median over rounds ``skip + 1``..) and the per-round ratio's
    median, quartiles and min-max."""
    lines = [f"# The in-process round against its floor, round by round (`python "
             f"scripts/bench_floor.py{argv_text}`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {threads} threads; {rounds} rounds per "
             f"method, each suite round followed by the floor's same round in one process; "
             f"rounds {skip + 1}..{rounds} counted.", "",
             "| case | suite s/round | floor s/round | suite ÷ floor per round: median | "
             "quartiles | min-max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, res in results.items():
        su, fl = res["suite"][skip:], res["floor"][skip:]
        ratios = sorted(a / b for a, b in zip(su, fl))
        q = statistics.quantiles(ratios, n=4)
        lines.append(f"| inprocess {method} | {statistics.median(su):.3f} | "
                     f"{statistics.median(fl):.3f} | {statistics.median(ratios):.3f}x | "
                     f"{q[0]:.3f}x-{q[2]:.3f}x | {ratios[0]:.3f}x-{ratios[-1]:.3f}x |")
    return lines


def report(rows, args, argv_text: str) -> list:
    import torch

    names = list(dict.fromkeys(r["case"] for r in rows))
    reps = sorted({r["rep"] for r in rows})
    by = {(r["case"], r["rep"]): r for r in rows}
    loads = [r["load"] for r in rows]
    lines = [f"# The round against a plain PyTorch loop (`python scripts/bench_floor.py{argv_text}`)",
             "", f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; load average (1 min) at the cases' ends "
             f"{min(loads):.1f}-{max(loads):.1f}.", "",
             f"ResNet-18 (CIFAR stem, width 16) on CIFAR-10, N = 100 x 50 images (iid), m = 10 "
             f"per round, batch 20, lr 0.01, {args.threads} threads, {args.rounds} rounds; "
             f"S = {SPARSITY} for topk and regtopk (mu = 5). {len(reps)} repetition(s), "
             "interleaved (odd repetitions in reverse order); s/round = median over rounds 3.. of "
             "one run; the table: the median "
             "over the runs and their min-max; the ratio is taken within a repetition."
             + (f" Overrides added to every case: `{' '.join(args.set)}`." if args.set else ""),
             "",
             "| case | s/round: median | min-max | ÷ its floor: median | min-max | "
             "whole run (s): median |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        mine = [by[(name, rep)] for rep in reps if (name, rep) in by]
        med, rng = spread([r["s_per_round"] for r in mine], "{:.3f}")
        ratios = [by[(name, rep)]["s_per_round"] / by[(floor_of(name), rep)]["s_per_round"]
                  for rep in reps if (name, rep) in by and (floor_of(name), rep) in by]
        rmed, rrng = spread(ratios, "{:.2f}", "x") if ratios else ("-", "-")
        lines.append(f"| {name} | {med} | {rng} | {rmed} | {rrng} | "
                     f"{statistics.median(r['total_s'] for r in mine):.1f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, metavar="K")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=("dense", "topk", "regtopk"),
                    default=["dense", "topk", "regtopk"])
    ap.add_argument("--runtimes", nargs="+", choices=("inprocess", "flower"),
                    default=["inprocess", "flower"])
    ap.add_argument("--data", default=str(DATA), help="the CIFAR-10 archive")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "regtopk-floor-cache"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for every case, floors included (e.g. "
                         "task.subset_per_class=10 num_workers=10 for a smoke test)")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--compute", type=int, default=0, metavar="PAIRS",
                    help="instead: the suite's task.gradients against the dense floor, "
                         "PAIRS alternations in this process (compute_ab)")
    ap.add_argument("--paired", action="store_true",
                    help="instead: each method's in-process run and its floor alternated "
                         "round by round in one process (paired)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat={args.repeat}: must be >= 1")
    if args.rounds < 4:
        ap.error(f"--rounds={args.rounds}: must be >= 4 (s/round is taken over rounds 3..)")
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if args.compute:
        cfg = _cfg(workload(args.rounds, args.data, args.cache, args.threads) + args.set
                   + ["runtime=inprocess", "sparsifier=dense"])
        res = compute_ab(cfg, args.rounds, args.compute)
        ratios = [a / b for a, b in zip(res["suite"], res["floor"])]
        emit([f"# The suite's gradients against the dense floor (`python scripts/bench_floor.py"
              f"{argv_text}`)", "", f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), "
              f"{time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads; {args.compute} "
              f"alternations of {args.rounds} rounds each, one process.", "",
              "| | s/round: median | min-max |", "| --- | ---: | ---: |",
              "| suite `task.gradients` | %s | %s |" % spread(res["suite"], "{:.3f}"),
              "| floor's round | %s | %s |" % spread(res["floor"], "{:.3f}"),
              "| suite ÷ floor, pairwise | %s | %s |" % spread(ratios, "{:.3f}", "x")], args.out)
        return 0
    if args.paired:
        base = workload(args.rounds, args.data, args.cache, args.threads) + args.set
        results = {m: paired(_cfg(base + ["runtime=inprocess"] + method_overrides(m)),
                             args.rounds, topk=m != "dense") for m in args.methods}
        emit(paired_report(results, args.rounds, 2, args.threads, argv_text), args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(args, Path(tmp))
    emit(report(rows, args, argv_text), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
