"""Where the in-process round's time goes: the paper's linear regression
(bench_runtimes.py's floor case: N = 20, J = 100, RegTop-k S = 0.6, mu = 4,
eval_every = 1, threads = 1) run once with a wall clock around each step of
the round, printed as microseconds per round (inclusive: a step's time
includes the steps it calls, so the lines do not add up).

    PYTHONPATH=. python scripts/profile_round.py [--rounds 2500]

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
    ("regtopk_fl.fedround", "Coordinator.collect"),
    ("regtopk_fl.fedround", "FedServer.step"),
    ("regtopk_fl.fedround", "FedServer._validate"),
    ("regtopk_fl.fedround", "FedServer._screen"),
    ("regtopk_fl.fedround", "FedServer._aggregate"),
    ("regtopk_fl.fedround", "FedServer._feedback"),
    ("regtopk_fl.fedround", "FedServer._count"),
    ("regtopk_fl.fedround", "FedServer._step"),
    ("regtopk_fl.broadcast", "Downlink.after_step"),
    ("regtopk_fl.tasks.linreg", "LinRegTask.evaluate"),
    ("regtopk_fl.runner", "round_row"),
    ("regtopk_fl.results", "RunRecorder.add"),
]


@contextlib.contextmanager
def clock(steps=STEPS):
    """Within the block, each step runs inside a wall clock; yields the
    seconds they add up to (keys as in ``steps``). ``engine.worker_round``,
    bound there by name, is re-bound to the clocked one. Everything is put
    back on exit."""
    from regtopk_fl import engine

    spent, undo = collections.Counter(), [(engine, "worker_round", engine.worker_round)]
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
                spent[_key] += time.perf_counter() - t0

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2500)
    args = ap.parse_args(argv)
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
