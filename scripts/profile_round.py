"""Where the in-process round's time goes: the paper's linear regression
(bench_runtimes.py's floor case: N = 20, J = 100, RegTop-k S = 0.6, mu = 4,
eval_every = 1, threads = 1) run once with a wall clock around each step of
the round, printed as microseconds per round (inclusive: a step's time
includes the steps it calls, so the lines do not add up).

    PYTHONPATH=. python scripts/profile_round.py [--rounds 2500]

``--flower DATA``: the Flower server's side of a Fig. 3 round instead
(runtime=flower, ResNet-18, N = 8, S = 0.001, Top-k, deterministic; DATA a
CIFAR-10 archive, ``--device``, ``--width``, ``--rounds``, ``--method``;
``--runtime inprocess`` runs the in-process twin, its workers' steps timed too,
``--keep DIR`` keeps the run): the median
milliseconds of each server step per call and how often it ran per round,
the round's s/round, and the clients' phase medians (client_timing.csv;
they run in other processes). ``send_and_receive`` is the server waiting for
its clients: the round minus what the server does between rounds.

Each wrapped call costs about a microsecond of its own, so the run's
``wall_time_s`` is a little above an unwrapped one's; compare the lines with
each other and with ``numpy_floor.py``'s rounds, not with other runs.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

# the server's steps of a round, both runtimes: collect -> step 1-7 -> downlink
SERVER_STEPS = [
    ("regtopk_fl.fedround", "Coordinator.collect"),
    ("regtopk_fl.fedround", "FedServer.step"),
    ("regtopk_fl.fedround", "FedServer._validate"),
    ("regtopk_fl.fedround", "FedServer._screen"),
    ("regtopk_fl.fedround", "FedServer._aggregate"),
    ("regtopk_fl.fedround", "FedServer._feedback"),
    ("regtopk_fl.fedround", "FedServer._count"),
    ("regtopk_fl.fedround", "FedServer._step"),
    ("regtopk_fl.broadcast", "Downlink.after_step"),
]

# (module, attribute path): the round's steps, top to bottom
STEPS = [
    ("regtopk_fl.engine", "InProcessRun.round"),
    ("regtopk_fl.fedround", "Coordinator.plan"),
    ("regtopk_fl.fedround", "worker_round"),
    ("regtopk_fl.fedround", "apply_feedback"),
    ("regtopk_fl.tasks.base", "Task.local_update"),
    ("regtopk_fl.fedround", "sparsify"),
    ("regtopk_fl.memory", "ErrorFeedbackMemory.accumulate"),
    ("regtopk_fl.memory", "ErrorFeedbackMemory.context"),
    ("regtopk_fl.compress.regtopk", "RegTopK.select"),
    ("regtopk_fl.memory", "ErrorFeedbackMemory.commit"),
    *SERVER_STEPS,
    ("regtopk_fl.tasks.linreg", "LinRegTask.evaluate"),
    ("regtopk_fl.runner", "round_row"),
    ("regtopk_fl.results", "RunRecorder.add"),
]

# the in-process twin of a Fig. 3 round (--flower DATA --runtime inprocess): the
# workers' steps too, all in this process (the gradients' share is the model's
# forward and backward passes; the rest is the protocol)
INPROCESS_STEPS = [
    ("regtopk_fl.engine", "InProcessRun.round"),
    ("regtopk_fl.fedround", "Coordinator.plan"),
    ("regtopk_fl.client_states", "ClientStates.gather"),
    ("regtopk_fl.client_states", "ClientStates.scatter"),
    ("regtopk_fl.fedround", "worker_round"),
    ("regtopk_fl.tasks.images", "_ImageTask.gradients"),
    ("regtopk_fl.tasks.images", "_ImageTask.batch"),
    ("regtopk_fl.fedround", "sparsify"),
    ("regtopk_fl.memory", "ErrorFeedbackMemory.accumulate"),
    ("regtopk_fl.memory", "ErrorFeedbackMemory.commit"),
    *SERVER_STEPS,
    ("regtopk_fl.results", "RunRecorder.add"),
]

# the Flower server's side of a round (the driver process; clients run elsewhere)
FLOWER_STEPS = [
    ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid.send_and_receive"),
    ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid.push_messages"),
    ("flwr.superlink.grid.inmemory_grid", "InMemoryGrid.pull_messages"),
    ("strategies.sparse_strategy", "SparseAggregation.configure_train"),
    ("regtopk_fl.fedround", "Coordinator.plan"),
    ("protocol.wire", "step_records"),
    ("protocol.wire", "train_content"),
    ("strategies.sparse_strategy", "SparseAggregation.aggregate_train"),
    ("protocol.wire", "read_reply"),
    *SERVER_STEPS,
    ("regtopk_fl.broadcast", "model_digest"),
    ("regtopk_fl.results", "RunRecorder.add"),
]


@contextlib.contextmanager
def clock(steps=STEPS):
    """Within the block, each step runs inside a wall clock; yields the
    seconds they add up to (keys as in ``steps``; ``.calls`` holds each
    call's seconds). ``engine.worker_round``, bound there by name, is
    re-bound to the clocked one. Everything is put back on exit."""
    from regtopk_fl import engine

    spent, undo = collections.Counter(), [(engine, "worker_round", engine.worker_round)]
    spent.calls = collections.defaultdict(list)
    for mod_name, path in steps:
        owner = importlib.import_module(mod_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        raw = vars(owner)[name]
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw

        def timed(*a, _fn=fn, _key=path, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                spent[_key] += dt
                spent.calls[_key].append(dt)

        timed = functools.wraps(fn)(timed)
        undo.append((owner, name, raw))
        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)
    from regtopk_fl import fedround
    engine.worker_round = fedround.worker_round
    try:
        yield spent
    finally:
        for owner, name, raw in reversed(undo):
            setattr(owner, name, raw)


def flower(args) -> int:
    """The Flower server's steps at Fig. 3's settings (see the module doc)."""
    import statistics
    from types import SimpleNamespace

    import gpu_bench
    from regtopk_fl.runner import run_experiment

    a = SimpleNamespace(workers=args.workers, rounds=args.rounds, width=args.width,
                        data=args.flower, cache=args.cache, test_subset=200, device=args.device)
    cfg = gpu_bench.compose(gpu_bench.fig3(a, args.method, args.runtime) + list(args.override))
    steps = INPROCESS_STEPS if args.runtime == "inprocess" else FLOWER_STEPS
    with tempfile.TemporaryDirectory() as tmp, clock(steps) as spent:
        run_dir = Path(args.keep) if args.keep else Path(tmp) / "run"
        summary = run_experiment(cfg, run_dir)
        s_round = gpu_bench.per_round(run_dir)
    rounds = int(summary["rounds"])
    print(f"runtime={args.runtime}, Fig. 3 ({args.method}) at width {args.width}, "
          f"N = {args.workers}, {rounds} rounds, device={args.device}: {s_round:.4f} s/round "
          "(median of rounds 2..R-1)")
    print("server steps: median ms per call x calls per round = ms per round (inclusive; the "
          "grid's calls include Flower's evaluate phase, which sends nothing):")
    for _, path in steps:
        calls = spent.calls.get(path, [])
        if calls:
            print(f"{1e3 * statistics.median(calls):9.2f} ms x {len(calls) / rounds:5.1f} = "
                  f"{1e3 * sum(calls) / rounds:8.2f}  {path}")
    timing = summary.get("client_timing_s") or {}
    print("a client's train message (medians, ms): "
          + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in timing.items()))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--flower", metavar="DATA", help="the Flower server at Fig. 3 (see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--cache", default="/tmp/regtopk_gpu_cache")
    ap.add_argument("--override", nargs="*", default=[], help="--flower: more config overrides")
    ap.add_argument("--runtime", default="flower", help="--flower: or inprocess (the twin)")
    ap.add_argument("--method", default="topk", help="--flower: the sparsifier")
    ap.add_argument("--keep", help="--flower: the run directory to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.flower:
        args.rounds = args.rounds or 30
        return flower(args)
    args.rounds = args.rounds or 2500
    from bench_runtimes import FIG2, _cfg
    from regtopk_fl.runner import run_experiment

    cfg = _cfg([o for o in FIG2 if not o.startswith("rounds=")] + [f"rounds={args.rounds}"])
    with tempfile.TemporaryDirectory() as tmp, clock() as spent:
        summary = run_experiment(cfg, Path(tmp) / "run")
    print(f"wall_time_s {summary['wall_time_s']:.3f} for {args.rounds} rounds "
          f"(final gap {summary['final']['gap']:.5g}); us per round, inclusive:")
    for _, path in STEPS:
        print(f"{spent[path] / args.rounds * 1e6:9.1f}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
