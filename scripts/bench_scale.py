"""Peak memory and seconds per round of the in-process engine against the
number of clients N at a fixed number m of sampled clients per round.

    python scripts/bench_scale.py [--n 100 1000 10000] [--m 100] [--rounds 60] \
        [--out results/scale/bench_scale.md]

Linear regression (J = 100, 500 points per client), RegTop-k at S = 0.6. Each
(N, state) case runs in a fresh process, so ``ru_maxrss`` (peak resident set)
is that case's alone. ``state``:

* ``per-client``: what the engine does under sampling - per-client states
  created when a client first takes part (regtopk_fl/client_states.py);
* ``[N, J]``: the whole-population memory with rows=sampled (the engine's
  path without sampling), for comparison: its per-row bookkeeping walks all N.

s/round is the median over rounds 2.. (round 1 includes first-touch costs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from _report import cpu_name, emit  # noqa: E402  (scripts/_report.py)

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child(n: int, m: int, rounds: int, state: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from regtopk_fl.compress import RegTopK
    from regtopk_fl.engine import InProcessRun
    from regtopk_fl.memory import ErrorFeedbackMemory
    from regtopk_fl.participation import Participation
    from regtopk_fl.tasks.linreg import LinRegTask

    base = _rss_mb()
    t0 = time.perf_counter()
    task = LinRegTask(num_workers=n, dim=100, samples_per_worker=500)
    build_s = time.perf_counter() - t0
    task_mb = sum(x.numel() * x.element_size() for x in (task.gram, task.z, task.truth)) / 2**20
    after_task = _rss_mb()
    run = InProcessRun(task, RegTopK(0.6, mu=4.0), lr=0.01, participation=Participation(n, m))
    if state == "[N, J]":
        run.clients = None
        run.memory = ErrorFeedbackMemory(n, task.dim, task.dtype)
    steps = []
    for t in range(1, rounds + 1):
        t1 = time.perf_counter()
        run.round(t)
        steps.append(time.perf_counter() - t1)
    gap = task.evaluate(run.server.params)["gap"]
    held = len(run.clients) if run.clients is not None else n
    return {"N": n, "m": m, "state": state, "rounds": rounds, "build_s": build_s,
            "task_mb": task_mb, "rss_torch_mb": base, "rss_after_task_mb": after_task,
            "peak_rss_mb": _rss_mb(), "s_per_round": statistics.median(steps[1:]),
            "clients_with_state": held, "gap": gap}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--states", nargs="+", default=["per-client", "[N, J]"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, metavar=("N", "M", "ROUNDS", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        n, m, r, s = args.child
        print(json.dumps(child(int(n), int(m), int(r), s)))
        return 0
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for n in args.n:
        # m >= N is full participation: the engine's [N, J] path either way
        for state in (args.states[:1] if args.m >= n else args.states):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(args.m),
                                  str(args.rounds), state], capture_output=True, text=True,
                                 env=env, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    cpu = cpu_name()
    lines = ["# In-process scaling with N at fixed m (`python scripts/bench_scale.py`)", "",
             f"Machine: {os.cpu_count()} CPU cores ({cpu}), 1 torch thread, "
             f"{time.strftime('%Y-%m-%d %H:%M')}; linear regression J = 100, 500 points per "
             f"client, RegTop-k S = 0.6, m = {args.m} sampled per round, {args.rounds} rounds "
             "per case, each case in a fresh process.", "",
             "| N | client state | s/round (median) | peak RSS (MB) | RSS after building the "
             "task (MB) | task data (MB) | clients holding state | task build (s) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        state = "everyone (m = N): [N, J]" if r["m"] >= r["N"] else r["state"]
        lines.append(f"| {r['N']} | {state} | {r['s_per_round']:.4f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_after_task_mb']:.0f} | "
                     f"{r['task_mb']:.0f} | {r['clients_with_state']} | {r['build_s']:.1f} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
