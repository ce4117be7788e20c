"""Seconds per round of runtime=flower vs runtime=inprocess, same machine,
same run, and the paper's linear regression in-process against its numpy
floor (scripts/numpy_floor.py).

    python scripts/bench_runtimes.py [--repeat K] [--out results/bench_runtimes.md] [--quick]
    python scripts/bench_runtimes.py --scale 10 100 1000 [--m 10] [--out results/scale/flower_vs_n.md]

Per-round time is the median of the differences of metrics.csv's wall_s,
leaving out round 1 (start-up: Ray, actors, data loading).

``--repeat K`` runs every case K times, interleaved (in-process, Flower,
in-process, Flower, ...; the floor comparison likewise: the suite, the
floor, the suite, ...), and prints the median and the spread (min-max) of
each number over the K runs: of s/round, and of the Flower / in-process
ratio and the suite / floor ratio, each taken pairwise (the runs next to
each other). A single run is never a result on a shared machine.

The floor comparison (issue #19): the paper's linear regression (N = 20,
J = 100, 2500 rounds, RegTop-k S = 0.6, mu = 4, eval_every = 1, threads = 1),
its ``summary.json`` ``wall_time_s`` against the rounds of the plain numpy
implementation, one after the other in this process. numpy's BLAS is held
to one thread as well (``OPENBLAS_NUM_THREADS=1`` unless set), like torch's.
Next to them, the floor's loop on torch tensors (its torch twin): the
per-call cost of torch itself on [20, 100] arrays.

The table also says how many torch threads the Flower clients computed
with (``summary.json`` ``client_threads``: their Ray CPU share), the
driver's CPU seconds per run (the server, and under Flower the Ray driver),
and how long a client's train message took in its ClientApp: the compute
phase (gradient, error feedback, selection) and the rest (the replica and
its copy to the device, the state files, decoding and encoding), from
``client_timing.csv``'s medians.

``--scale``: s/round of runtime=flower against the number of nodes N at a
fixed number m of sampled clients per round (linear regression, RegTop-k
S = 0.6), with as many Ray actors as ``runtime.client_cpus`` allows (one per
core at client_cpus=1), next to in-process at the same N and m.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the numpy floor's BLAS, before numpy loads

import argparse  # noqa: E402
import csv  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))  # also when imported by a test
from _report import cpu_name, emit, spread  # noqa: E402  (scripts/_report.py)

LINREG = ["task=linreg", "num_workers=20", "sparsifier=regtopk", "sparsifier.sparsity=0.6",
          "sparsifier.mu=4", "eval_every=1"]
FIG2 = LINREG + ["rounds=2500", "runtime=inprocess", "threads=1", "checkpoint.every=0"]
CASES = ("linreg", "cifar10", "floor")
FLOOR_TARGET = 1.5  # issue #19: wall_time_s <= 1.5x the numpy floor's


def _cfg(overrides):
    from conftest import compose_cfg  # the launcher's config, composed by Hydra

    return compose_cfg(overrides)


def per_round(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as fh:
        wall = [float(r["wall_s"]) for r in csv.DictReader(fh)]
    steps = [b - a for a, b in zip(wall[1:], wall[2:])]  # rounds 2.. (round 1 = start-up)
    return statistics.median(steps)


def bench(cases, tmp: Path, flower_only_keys=(), repeat: int = 1, first_rep: int = 0):
    """One row per (case, runtime, repetition); repetitions outermost, so
    every case's runs are spread over the whole benchmark. Repetitions are
    numbered from ``first_rep`` (their run directories too)."""
    from regtopk_fl.runner import run_experiment

    rows = []
    for rep in range(first_rep, first_rep + repeat):
        for name, overrides in cases:
            for runtime in ("inprocess", "flower"):
                ov = [o for o in overrides
                      if runtime == "flower" or not o.startswith(tuple(flower_only_keys))]
                run_dir = tmp / f"{name}-{runtime}-{rep}"
                t0, c0 = time.perf_counter(), time.process_time()
                summary = run_experiment(_cfg([f"runtime={runtime}"] + ov), run_dir)
                total, cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append({"case": name, "runtime": runtime, "rep": rep,
                             "rounds": summary["rounds"], "s_per_round": per_round(run_dir),
                             "total_s": total, "driver_cpu_s": cpu,
                             "client_threads": summary.get("client_threads"),
                             "client_timing_s": summary.get("client_timing_s")})
                print(rows[-1], flush=True)
    return rows


def load_floor():
    import numpy_floor  # scripts/ is on sys.path (above)

    return numpy_floor


def floor_pairs(tmp: Path, repeat: int, extra=(), first_rep: int = 0) -> list:
    """The suite's paper linear regression, the numpy floor and its torch
    twin, one after the other, ``repeat`` times: [(suite wall_time_s, numpy
    floor s, suite final gap, floor final gap, torch twin s)]."""
    from regtopk_fl.runner import build, run_experiment, torch_threads

    floor = load_floor()
    cfg = _cfg(FIG2 + list(extra))
    task, sparsifier = build(cfg)
    args = (float(cfg.sparsifier.sparsity), float(cfg.sparsifier.mu), float(cfg.lr),
            int(cfg.rounds))
    pairs = []
    for rep in range(first_rep, first_rep + repeat):
        summary = run_experiment(cfg, tmp / f"fig2-{rep}")
        gaps, secs = floor.from_task(task, *args)
        with torch_threads(int(cfg.threads)):  # the suite's run computes with as many
            _, torch_secs = floor.from_task(task, *args, backend="torch")
        pairs.append((summary["wall_time_s"], secs, summary["final"]["gap"], float(gaps[-1]),
                      torch_secs))
        print({"fig2 suite s": pairs[-1][0], "numpy floor s": secs, "torch twin s": torch_secs},
              flush=True)
    return pairs


def _machine() -> str:
    import torch

    from regtopk_fl.ray_cluster import usable_cpus

    cpu, usable = cpu_name(), usable_cpus()
    cores = (f"{os.cpu_count()} CPU cores" if usable == os.cpu_count()
             else f"{usable} of {os.cpu_count()} CPU cores usable (affinity)")
    return (f"Machine: {cores} ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads in this process; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}.")


def scale(ns, m: int, rounds: int, client_cpus: float, out) -> int:
    """Flower (and in-process) s/round against N at a fixed m."""
    cases = [(f"N={n}, m={m}", ["task=linreg", f"num_workers={n}", f"rounds={rounds}",
                                "sparsifier=regtopk", "sparsifier.sparsity=0.6",
                                "sparsifier.mu=4", "eval_every=1", "checkpoint.every=0",
                                f"participation.clients_per_round={m}",
                                f"runtime.client_cpus={client_cpus}"]) for n in ns]
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(cases, Path(tmp), flower_only_keys=("runtime.",))
    actors = int((os.cpu_count() or 1) // client_cpus)
    lines = [f"# Flower s/round against N at fixed m (`python scripts/bench_runtimes.py --scale "
             f"{' '.join(map(str, ns))} --m {m}`)", "", _machine(), "",
             f"Linear regression (J = 100, 500 points per client), RegTop-k S = 0.6, m = {m} "
             f"sampled clients per round, {rounds} rounds; runtime.client_cpus = {client_cpus} "
             f"(= {actors} Ray actors here).", "",
             "| N | runtime | s/round (median, rounds 2..) | whole run incl. start-up (s) |",
             "| ---: | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case'].split(',')[0][2:]} | {r['runtime']} | {r['s_per_round']:.4f} | "
                     f"{r['total_s']:.1f} |")
    emit(lines, out)
    return 0


def _client_ms(rows) -> str:
    """Medians over the runs of the ClientApps' median message: the compute
    phase and the rest of the handling (summary.json ``client_timing_s``)."""
    timing = [r["client_timing_s"] for r in rows if r.get("client_timing_s")]
    if not timing:
        return "-"
    compute = statistics.median(t["compute"] for t in timing)
    rest = statistics.median(t["handle"] - t["compute"] for t in timing)
    return f"{1e3 * compute:.1f} / {1e3 * rest:.1f}"


def report(rows, pairs, repeat: int, argv_text: str, note: str = "") -> list:
    lines = [f"# Runtime speed (`python scripts/bench_runtimes.py{argv_text}`){note}", "",
             _machine(),
             "", f"Every case ran {repeat} time(s), interleaved (in-process, Flower, in-process, "
             f"...): the median over the runs and their spread (min-max).", "",
             "| case | runtime | s/round: median | min-max | whole run incl. start-up (s): median "
             "| driver CPU s: median | Flower clients' torch threads "
             "| a client's message: compute / the rest (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for case in cases:
        for runtime in ("inprocess", "flower"):
            mine = [r for r in rows if r["case"] == case and r["runtime"] == runtime]
            if not mine:
                continue
            med, rng = spread([r["s_per_round"] for r in mine])
            threads = sorted({t for r in mine for t in (r["client_threads"] or [])})
            lines.append(f"| {case} ({mine[0]['rounds']} rounds) | {runtime} | {med} | {rng} | "
                         f"{statistics.median(r['total_s'] for r in mine):.1f} | "
                         f"{statistics.median(r['driver_cpu_s'] for r in mine):.1f} | "
                         f"{threads if runtime == 'flower' else '-'} | {_client_ms(mine)} |")
    lines += ["", "| case | Flower / in-process per round: median | min-max | runs |",
              "| --- | ---: | ---: | ---: |"]
    for case in cases:
        ratios = []
        for rep in sorted({r["rep"] for r in rows}):
            ip, fl = (next((r for r in rows if r["case"] == case and r["runtime"] == rt
                            and r["rep"] == rep), None) for rt in ("inprocess", "flower"))
            if ip is not None and fl is not None:  # a cut run's last pair may be half
                ratios.append(fl["s_per_round"] / ip["s_per_round"])
        if ratios:
            med, rng = spread(ratios, "{:.2f}", "x")
            lines.append(f"| {case} | {med} | {rng} | {len(ratios)} |")
    return lines + (floor_report(pairs) if pairs else [])


def floor_report(pairs) -> list:
    """The suite against its numpy floor and torch twin, pairwise."""
    suite, floor, twin = ([p[i] for p in pairs] for i in (0, 1, 4))
    ratios = [p[0] / p[1] for p in pairs]
    med = statistics.median(ratios)
    return ["", "## The in-process round against its numpy floor (issue #19)", "",
              "The paper's linear regression (N = 20, J = 100, 2500 rounds, RegTop-k S = 0.6, "
              "mu = 4, eval_every = 1, threads = 1): the run's `wall_time_s` against "
              "`scripts/numpy_floor.py`'s rounds, one after the other, "
              f"{len(pairs)} time(s).", "",
              "| | median | min-max |", "| --- | ---: | ---: |",
              "| in-process `wall_time_s` (s) | {} | {} |".format(*spread(suite, "{:.3f}")),
              "| numpy floor (s) | {} | {} |".format(*spread(floor, "{:.3f}")),
              "| torch twin of the floor (s) | {} | {} |".format(*spread(twin, "{:.3f}")),
              "| in-process / floor (pairwise) | {} | {} |".format(*spread(ratios, "{:.2f}", "x")),
              "| in-process / torch twin (pairwise) | {} | {} |".format(
                  *spread([p[0] / p[4] for p in pairs], "{:.2f}", "x")),
              "| torch twin / floor (pairwise) | {} | {} |".format(
                  *spread([p[4] / p[1] for p in pairs], "{:.2f}", "x")),
              "", "The torch twin is the floor's loop on torch tensors, one thread "
              "(`numpy_floor.py --backend torch`, each step spelt as torch does it "
              "fastest): what torch's own calls cost on arrays this small.",
              "", f"Final gap: in-process {pairs[0][2]:.3g}, floor {pairs[0][3]:.3g}. "
              f"Target <= {FLOOR_TARGET}x: {'met' if med <= FLOOR_TARGET else 'not met'} "
              f"(median {med:.2f}x)."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a Markdown table here")
    ap.add_argument("--quick", action="store_true", help="linear regression only, few rounds")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                    help="which to run: the linear regression and ResNet-18 through both "
                         "runtimes, and the in-process round against its numpy floor "
                         "(default: all)")
    ap.add_argument("--repeat", type=int, default=1, metavar="K",
                    help="run every case K times, interleaved; print medians and spreads")
    ap.add_argument("--scale", type=int, nargs="+", default=None, metavar="N",
                    help="Flower s/round against these N at fixed --m")
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--client-cpus", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override added to every case (repeatable), e.g. "
                         "device=cpu on a GPU machine; task.* keys only to the CIFAR case "
                         "(task.data_path=ARCHIVE), runtime.* keys only to the Flower runs")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat={args.repeat}: must be >= 1")
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    if args.scale:
        return scale(args.scale, args.m, args.rounds, args.client_cpus, args.out)
    # task.* keys: the CIFAR case's; runtime.* keys: the Flower runs' (the
    # in-process runtime has none)
    common = [o for o in args.set if not o.startswith("task.")]
    want = set(args.cases) - ({"cifar10"} if args.quick else set())
    if not want:
        ap.error(f"--cases {' '.join(args.cases)} with --quick: nothing left to run")
    cases = []
    if "linreg" in want:
        cases.append(("linreg N=20", LINREG + ["rounds=30"] + common))
    if "cifar10" in want:
        cases.append(("cifar10 ResNet-18 N=8", [
            "task=cifar10", "num_workers=8", "rounds=10", "sparsifier=regtopk",
            "sparsifier.sparsity=0.001", "sparsifier.mu=5", "eval_every=1000",
            "task.test_subset=100"] + args.set))
    argv_text = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):  # every case, then the floor, per repetition
            rows += bench(cases, Path(tmp), flower_only_keys=("runtime.",), first_rep=rep)
            if "floor" in want:
                pairs += floor_pairs(Path(tmp), 1,
                                     [o for o in common if not o.startswith("runtime.")],
                                     first_rep=rep)
            if args.out and rep + 1 < args.repeat:  # a run cut short keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text("\n".join(report(
                    rows, pairs, rep + 1, argv_text, f" (cut short here: {rep + 1} of "
                    f"{args.repeat} repetitions so far)")) + "\n")
    emit(report(rows, pairs, args.repeat, argv_text), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
