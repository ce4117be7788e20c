#!/usr/bin/env python
"""Time every sparsifier against exact top-k, on CPU (and CUDA when present).

For J in {1e5, 1e6, 11_173_962} (ResNet-18's size) and S in {0.0001, 0.001, 0.01}:

* ``select``: ``sparsifier.select(a, ctx)`` on a ``[1, J]`` batch with a ready
  context. The context is realistic: it comes from a previous RegTop-k round
  of the same worker (k entries sent, server feedback on them with weight
  1/8 and some exact cancellations), so RegTop-k runs its regularized path.
* ``step``: the whole worker step ``fedround.sparsify`` (accumulate + context
  + select + commit + uploads), with fresh server feedback before every call
  (untimed), as in a federated round.

Each time is the median over ``--repeats`` calls after one warm-up round. The
methods are timed round-robin (one call each per repeat, rotating order) and
each ratio to exact top-k is the median of the per-repeat ratios, so a busy,
shared machine slows every method alike (same data, same device, same
moment); the same paired ratio of process CPU time is reported too. On a
shared, oversubscribed machine prefer ``--threads 1``: every OpenMP parallel
region then waits for a core, which penalises kernel count, not work.

Two reference rows: ``floor`` is one elementwise pass over J floats into a
preallocated output (``torch.mul(g, 2, out=buf)``), the least any method that
reads every entry must spend. It is timed in both round-robins, and every
method's time is also given in ``passes``: the median of its per-repeat
ratio to the floor (the worker step's cost in one-pass floors). ``sort
(authors')`` is the
regularized score followed by a full descending ``torch.sort`` and the first
k entries, which is how the authors' released code selects.

Also reported: the mean number of entries sent, raw and coded upload bytes,
and the index part of both as a ratio to the information floor log2 C(J, k).

``--repeat K`` makes K whole runs (each its own round-robins of ``--repeats``
calls) and ends with a summary of the passes per cell: the median over the
runs and their spread (min-max), so that no single run is quoted; the
verdicts (Top-k's step within 5 floors, RegTop-k's within 1.1x Top-k's, issue
#19) use those medians. ``--methods`` times a subset, or any row-wise
sparsifier of conf/sparsifier/ by its name (Top-k always runs).

    python scripts/bench_sparsifiers.py                      # full run, prints Markdown
    python scripts/bench_sparsifiers.py --out results/bench_sparsifiers.md
    python scripts/bench_sparsifiers.py --quick              # smoke test (seconds)
    python scripts/bench_sparsifiers.py --shi --threads 2 --sizes 11173962 --repeat 3 \
        --out results/bench_shi.md                         # Shi et al.'s set (issue #32)
    python scripts/bench_sparsifiers.py --device cuda --sizes 11173962 --out $OUT/bench.md
    python scripts/bench_sparsifiers.py --threads 2 --device cpu --sizes 11173962 \
        --methods topk regtopk --repeat 5                  # passes per S, 5 runs
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # also when imported by a test

from _report import spread  # noqa: E402  (scripts/_report.py)
from regtopk_fl.compress import SPARSIFIERS  # noqa: E402
from regtopk_fl.compress.base import num_selected  # noqa: E402
from regtopk_fl.compress.regtopk import regularized_abs  # noqa: E402
from regtopk_fl.fedround import sparsify  # noqa: E402
from regtopk_fl.memory import ErrorFeedbackMemory  # noqa: E402
from regtopk_fl.payload import (coded_index_bytes, index_itemsize, info_floor_bits,  # noqa: E402
                                raw_bytes, coded_bytes)

SIZES = (100_000, 1_000_000, 11_173_962)
QUICK_SIZES = (20_000,)
SPARSITIES = (0.0001, 0.001, 0.01)
METHODS = ("dense", "topk", "regtopk", "gaussiank", "regtopk_gaussiank", "randomk")  # default
# --methods takes any row-wise sparsifier of conf/sparsifier/ (the registry), e.g. dgc
CHOICES = tuple(n for n, c in SPARSIFIERS.items() if not c.needs_all_workers)
FLOOR, SORT = "floor (1 pass)", "sort (authors')"
WEIGHT = 1.0 / 8.0  # the worker's aggregation weight, as with 8 equal workers
CANCEL = 0.1  # share of last round's entries on which the global gradient is exactly 0
COLUMNS = ("device", "J", "S", "k", "method", "select_ms", "select_x_topk",
           "select_cpu_x_topk", "select_passes", "step_ms", "step_x_topk", "step_cpu_x_topk",
           "step_passes", "mean_sent", "sent_x_k_median", "sent_x_k_min", "sent_x_k_max",
           "raw_bytes", "coded_bytes", "raw_idx_x_floor", "coded_idx_x_floor")


# -- environment ---------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidate_scan() -> str:
    """Which scan finds exact top-k's candidates on CPU (compress/exact_topk.py)."""
    from regtopk_fl.compress import exact_topk

    scan = exact_topk._compiled_scan()
    if scan is None or exact_topk._scan_failure:
        if os.environ.get("REGTOPK_FL_NUMBA") == "0":
            why = "REGTOPK_FL_NUMBA=0"
        elif exact_topk._scan_failure:
            why = f"the compiled scan failed: {exact_topk._scan_failure[0]!r}"
        else:
            why = "numba missing or not importable"
        return f"torch ({why})"
    import numba

    try:  # known once a parallel kernel has run
        return f"numba {numba.__version__}, {numba.threading_layer()} threads"
    except ValueError:
        return f"numba {numba.__version__}"


def environment(devices) -> dict:
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_candidate_scan": candidate_scan(),
        "devices": ", ".join(devices),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if "cuda" in devices:
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# -- timing --------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str) -> tuple:
    """(wall ms, process CPU ms) of one call. CPU time counts only this
    process's work (all its threads): unlike wall time it does not grow while
    the process waits for a core on a shared machine."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - t0), 1e3 * (time.process_time() - c0)


def interleaved(tasks: dict, device: str, repeats: int, ref: str, floor: str = FLOOR) -> dict:
    """Time every task once per repeat, round-robin (the order rotates), after
    one warm-up round. ``tasks``: name -> (fn, setup or None); setup runs
    untimed before its call. Returns name -> (median wall ms, median of the
    per-repeat wall ratio to task ``ref``, median of the per-repeat CPU-time
    ratio, median of the per-repeat wall ratio to task ``floor``: passes).
    Interleaving puts every method under the same background load, so
    the paired ratios stay meaningful on a busy machine when absolute times drift."""
    names = list(tasks)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fn, setup = tasks[n]
            if setup is not None:
                setup()
            w, c = time_ms(fn, device)
            if r:  # round 0 is the warm-up
                wall[n].append(w)
                cpu[n].append(c)

    def paired(x, ref_x):
        return statistics.median(a / max(b, 1e-6) for a, b in zip(x, ref_x))

    return {n: (statistics.median(wall[n]), paired(wall[n], wall[ref]),
                paired(cpu[n], cpu[ref]), paired(wall[n], wall[floor])) for n in names}


# -- data ------------------------------------------------------------------------
def make_data(dim: int, sparsity: float, device: str, seed: int = 0, dist: str = "layers"):
    """A worker's gradient, a ready RegTop-k context and the global feedback.

    ``dist='layers'``: Gaussian within 16 layer-like blocks whose scales span
    two decades (heavy-tailed overall, as real gradients; Gaussian-k's normal
    fit then misses k and refines 3 times). ``dist='normal'``: i.i.d. N(0, 1),
    Gaussian-k's best case. Round 0
    is a RegTop-k round of the same worker; the server's global gradient on
    the sent entries is the worker's contribution plus other workers' (noise),
    and exactly 0 on a share ``CANCEL`` of them (entries that cancelled)."""
    gen = torch.Generator().manual_seed(seed)
    nblocks = 16
    scales = torch.pow(10.0, -2.0 * torch.rand(nblocks, generator=gen))
    if dist == "normal":
        scales = torch.ones(nblocks)
    elif dist != "layers":
        raise ValueError(f"dist={dist!r}: expected 'layers' or 'normal'")
    scale = scales.repeat_interleave(math.ceil(dim / nblocks))[:dim]
    z = torch.randn(1, dim, generator=gen).to(device)
    scale = scale.to(device)

    def grads(t: int) -> torch.Tensor:
        """Round t's gradient: the same entries, each round at another place."""
        return torch.roll(z, shifts=(t * 7_919_113) % dim, dims=1) * scale

    grad0, grad1 = grads(0), grads(1)
    others = torch.randn(dim, generator=gen).to(device) * scale  # the generator is on the CPU
    cancel = (torch.rand(dim, generator=gen) < CANCEL).to(device)

    reg = SPARSIFIERS["regtopk"](sparsity)
    mem = ErrorFeedbackMemory(1, dim, device=device)
    sparsify(mem, grad0, reg, [WEIGHT], round=0)
    g_global = global_gradient(mem, others, cancel)
    mem.feedback_from_global(g_global, [WEIGHT])
    a = mem.accumulate(grad1).clone()
    ctx = mem.context([WEIGHT], round=1)
    return grads, a, ctx, others, cancel


def global_gradient(mem: ErrorFeedbackMemory, others, cancel) -> torch.Tensor:
    """What the server would return: w * (this worker's upload) + the others,
    with exact zeros where the workers cancelled."""
    g = others.clone()
    g[mem.prev_local] += WEIGHT * mem.prev_sent
    g[cancel] = 0
    return g


# -- one (device, J, S) cell --------------------------------------------------------
def bench_cell(device: str, dim: int, sparsity: float, repeats: int, seed: int = 0,
               dist: str = "layers", methods=METHODS, sort: bool = True) -> list:
    """Rows of one (device, J, S) cell: the floor, each of ``methods`` (Top-k,
    the reference of every ratio, always), and the authors' sort if ``sort``."""
    methods = ("topk",) + tuple(m for m in methods if m != "topk")
    grads, a, ctx, others, cancel = make_data(dim, sparsity, device, seed, dist)
    k = num_selected(sparsity, dim)
    reg = SPARSIFIERS["regtopk"](sparsity)
    buf = torch.empty_like(a)
    g = grads(1)

    def authors_sort():
        score = regularized_abs(a, ctx, reg.mu, reg.distortion, reg.q)
        order = torch.sort(score, dim=1, descending=True).indices
        return order[:, :k]

    sparsifiers = {name: SPARSIFIERS[name](sparsity) for name in methods}
    # the selection path: sparsifier.select on [1, J] with the ready context
    floor = (lambda: torch.mul(g, 2, out=buf), None)
    tasks = {FLOOR: floor, SORT: (authors_sort, None)} if sort else {FLOOR: floor}
    for name, sp in sparsifiers.items():
        tasks[name] = ((lambda sp=sp: sp.select(a, ctx)), None)
    select = interleaved(tasks, device, repeats, ref="topk")

    # the worker step: one memory per method, fresh feedback and gradient per round
    tasks, states = {FLOOR: floor}, {}
    for name, sp in sparsifiers.items():
        mem = ErrorFeedbackMemory(1, dim, device=device)
        sparsify(mem, grads(0), sp, [WEIGHT], round=0)
        st = states[name] = {"mem": mem, "round": 0, "sent": [], "up": None, "grad": None}

        def feedback(st=st):
            st["mem"].feedback_from_global(global_gradient(st["mem"], others, cancel), [WEIGHT])
            st["round"] += 1
            st["grad"] = grads(st["round"])  # a fresh gradient every round

        def step(st=st, sp=sp):
            ups = sparsify(st["mem"], st["grad"], sp, [WEIGHT], round=st["round"])
            st["up"] = ups[0]
            st["sent"].append(ups[0].sent)

        tasks[name] = (step, feedback)
    step = interleaved(tasks, device, repeats, ref="topk")
    del tasks

    rows = [dict(device=device, J=dim, S=sparsity, k=k, method=FLOOR,
                 select_ms=select[FLOOR][0], select_x_topk=select[FLOOR][1],
                 select_cpu_x_topk=select[FLOOR][2], select_passes=1.0,
                 step_ms=step[FLOOR][0], step_x_topk=step[FLOOR][1],
                 step_cpu_x_topk=step[FLOOR][2], step_passes=1.0)]
    for name in methods:
        st = states[name]
        up = st["up"]
        row = dict(device=device, J=dim, S=sparsity, k=k, method=name,
                   select_ms=select[name][0], select_x_topk=select[name][1],
                   select_cpu_x_topk=select[name][2], select_passes=select[name][3],
                   step_ms=step[name][0], step_x_topk=step[name][1],
                   step_cpu_x_topk=step[name][2], step_passes=step[name][3],
                   mean_sent=statistics.fmean(st["sent"][1:] or st["sent"]),
                   **sent_over_k(st["sent"][1:] or st["sent"], k),
                   raw_bytes=raw_bytes(up), coded_bytes=coded_bytes(up))
        floor_bits = info_floor_bits(dim, up.sent)
        if up.indices is not None and floor_bits > 0:
            floor_bytes = floor_bits / 8.0
            row["raw_idx_x_floor"] = up.sent * index_itemsize(dim) / floor_bytes
            row["coded_idx_x_floor"] = coded_index_bytes(up.indices, dim) / floor_bytes
        rows.append(row)
    if sort:
        rows.append(dict(device=device, J=dim, S=sparsity, k=k, method=SORT,
                         select_ms=select[SORT][0], select_x_topk=select[SORT][1],
                         select_cpu_x_topk=select[SORT][2], select_passes=select[SORT][3],
                         mean_sent=float(k)))
    return rows


def sent_over_k(sent, k: int) -> dict:
    """The count each timed worker step sent, over k: median and range (Shi et
    al.'s approximate selections send "about k"; trimmed top-k may send more)."""
    x = [n / k for n in sent]
    return dict(sent_x_k_median=statistics.median(x), sent_x_k_min=min(x), sent_x_k_max=max(x))


def bench_global(device: str, dim: int, sparsity: float, repeats: int, workers: int = 8):
    """Optional: the global top-k oracle on [N, J] against row-wise top-k."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(workers, dim, generator=gen).to(device)
    mem = ErrorFeedbackMemory(workers, dim, device=device)
    ctx = mem.context([1.0 / workers] * workers)
    tasks = {name: ((lambda sp=SPARSIFIERS[name](sparsity): sp.select(a, ctx)), None)
             for name in ("topk", "global_topk")}
    res = interleaved(tasks, device, repeats, ref="topk", floor="topk")
    return [dict(device=device, J=dim, S=sparsity, N=workers, method=name,
                 select_ms=ms, select_x_topk=x, select_cpu_x_topk=xc)
            for name, (ms, x, xc, _) in res.items()]


# -- output ------------------------------------------------------------------------
def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.{nd}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def markdown(rows, env: dict, global_rows=None, note: str = "") -> str:
    lines = ["# Sparsifier benchmark", ""]
    lines += [f"- {key}: {val}" for key, val in env.items()]
    if note:
        lines += [f"- note: {note}"]
    lines += ["", "Times are medians in ms over the repeats; methods are timed round-robin and "
              "`x topk` is the median of the per-repeat ratios to exact top-k (select: "
              "`sparsifier.select` on [1, J] with a ready context; step: `fedround.sparsify`, "
              "i.e. accumulate + select + commit, fresh gradient and feedback each round); "
              "`cpu x topk` is the same paired ratio of process CPU time (the work done, "
              "insensitive to waiting for a core on a shared machine). "
              "`floor` is one elementwise pass over J floats into a preallocated output "
              "(`torch.mul(g, 2, out=buf)`), timed in both round-robins; `passes` is the "
              "median of the per-repeat ratios to it (cost in one-pass floors); "
              "`sort (authors')` is the regularized score plus a full descending torch.sort. "
              "Bytes are one worker's last upload; `idx/floor` is its index part over "
              "log2 C(J, sent) bits; `mean sent` is over the timed steps.", ""]
    head = ("device", "J", "S", "k", "method", "select ms", "select x topk",
            "select cpu x topk", "select passes", "step ms", "step x topk", "step cpu x topk",
            "step passes", "mean sent", "sent/k med", "sent/k min", "sent/k max",
            "raw B", "coded B", "raw idx/floor", "coded idx/floor")
    keys = COLUMNS
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = []
        for key in keys:
            v = r.get(key)
            if key == "mean_sent" and v is not None:
                cells.append(f"{v:.0f}" if v == int(v) else f"{v:.1f}")
            elif key in ("select_ms", "step_ms"):
                cells.append(_fmt(v, 2))
            else:
                cells.append(_fmt(v, 2))
        lines.append("| " + " | ".join(cells) + " |")
    if global_rows:
        lines += ["", "Global top-k oracle on [N, J] (select only) against row-wise top-k on "
                  "the same [N, J]:", "",
                  "| device | J | S | N | method | select ms | x topk | cpu x topk |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in global_rows:
            lines.append(f"| {r['device']} | {r['J']} | {r['S']} | {r['N']} | {r['method']} | "
                         f"{_fmt(r['select_ms'])} | {_fmt(r['select_x_topk'])} | "
                         f"{_fmt(r['select_cpu_x_topk'])} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows) -> None:
    """Every run's rows (``run`` numbers them from 0)."""
    cols = ("run",) + COLUMNS
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({c: r.get(c, "") for c in cols})


TOPK_PASSES = 5.0  # issue #19: the Top-k worker step within 5 one-pass floors
REGTOPK_X = 1.1  # RegTop-k's step within 1.1x Top-k's


def _values(runs, device, dim, s, method, key):
    return [r[key] for rows in runs for r in rows
            if (r["device"], r["J"], r["S"], r["method"]) == (device, dim, s, method)
            and r.get(key) is not None]


def _spread(vals) -> str:
    """'median' for one run, 'median (min-max)' for several."""
    if not vals:
        return "-"
    med, rng = spread([float(v) for v in vals], _fmt)
    return med if len(vals) == 1 else f"{med} ({rng})"


SUMMARY = (("floor ms", FLOOR, "step_ms"), ("Top-k select passes", "topk", "select_passes"),
           ("Top-k step ms", "topk", "step_ms"), ("Top-k step passes", "topk", "step_passes"),
           ("RegTop-k step passes", "regtopk", "step_passes"),
           ("RegTop-k ÷ Top-k select", "regtopk", "select_x_topk"),
           ("RegTop-k ÷ Top-k step", "regtopk", "step_x_topk"))


def summary(runs) -> str:
    """Passes and ratios per cell: the median over the runs and, for several
    runs, their spread (min-max); each run's own value is already the median
    over its ``--repeats`` calls."""
    cells = dict.fromkeys((r["device"], r["J"], r["S"], r["k"]) for r in runs[0])
    head = ("device", "J", "S", "k") + tuple(name for name, _, _ in SUMMARY)
    lines = [f"Passes per cell ({len(runs)} run{'s' if len(runs) > 1 else ''}; "
             + ("median (min-max) over the runs" if len(runs) > 1 else "one run: quote none alone")
             + "; passes = the step's or select's time in one-pass floors):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for device, dim, s, k in cells:
        vals = [_spread(_values(runs, device, dim, s, method, key)) for _, method, key in SUMMARY]
        lines.append(f"| {device} | {dim} | {s} | {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


SHI = ("topk", "gaussiank", "dgc", "trimmed_topk", "randomk")  # Shi et al.'s comparison set


def comparison(runs) -> str:
    """Shi et al.'s selection-time comparison, per (device, J, S): each
    selection's passes over the gradient (select time in one-pass floors),
    its count over k (median and range over the timed worker steps of every
    run) and its select time over Top-k's (median over the runs); empty when
    fewer than two of its methods ran."""
    rows = [r for rows in runs for r in rows]
    methods = [m for m in SHI if any(r["method"] == m for r in rows)]
    if len(methods) < 2:
        return ""
    cells = dict.fromkeys((r["device"], r["J"], r["S"], r["k"]) for r in runs[0])
    lines = ["Shi et al.'s comparison (select on [1, J]; count over the worker steps; "
             + ("median (min-max) over the runs" if len(runs) > 1 else "one run") + "):", "",
             "| device | J | S | k | method | passes over the gradient | count ÷ k, median |"
             " count ÷ k, range | time ÷ Top-k |", "|---|---|---|---|---|---|---|---|---|"]
    for device, dim, s, k in cells:
        for m in methods:
            v = lambda key: _values(runs, device, dim, s, m, key)  # noqa: E731
            lo, hi = v("sent_x_k_min"), v("sent_x_k_max")
            rng = f"{_fmt(min(lo))}-{_fmt(max(hi))}" if lo else "-"
            lines.append(f"| {device} | {dim} | {s} | {k} | {m} | {_spread(v('select_passes'))} | "
                         f"{_spread(v('sent_x_k_median'))} | {rng} | "
                         f"{_spread(v('select_x_topk'))} |")
    return "\n".join(lines) + "\n"


def targets(runs) -> list:
    """This project's targets at the largest J, per device, on the medians
    over the runs: the Top-k worker step within ``TOPK_PASSES`` one-pass
    floors, RegTop-k's step <= ``REGTOPK_X`` x Top-k's; and the verdict on
    Gaussian-k's approximate threshold against exact top-k."""
    out = []
    rows = runs[0]
    for device in dict.fromkeys(r["device"] for r in rows):
        rs = [r for r in rows if r["device"] == device]
        big = max(r["J"] for r in rs)
        for r in rs:
            if r["J"] != big:
                continue
            head = f"{device} J={big} S={r['S']} {r['method']}"

            def med(key):
                return statistics.median(_values(runs, device, big, r["S"], r["method"], key))
            if r["method"] == "topk":
                p, ms = med("step_passes"), med("step_ms")
                out.append(f"{head} step: {ms:.1f} ms = {p:.1f} passes of the floor "
                           f"(target <= {TOPK_PASSES:g}): {'OK' if p <= TOPK_PASSES else 'MISSED'}")
            elif r["method"] == "regtopk":
                x, xc = med("step_x_topk"), med("step_cpu_x_topk")
                ok = lambda v: "OK" if v <= REGTOPK_X else "MISSED"  # noqa: E731
                out.append(f"{head} step: wall {x:.2f}x, CPU {xc:.2f}x topk (target <= "
                           f"{REGTOPK_X:g}): {ok(x)} / {ok(xc)}")
            elif r["method"] == "gaussiank":
                for path in ("select", "step"):
                    x = med(f"{path}_x_topk")
                    verdict = (f"beats exact top-k by {1 / x:.2f}x" if x < 1
                               else f"is {x:.2f}x slower than exact top-k")
                    out.append(f"{head} {path}: {x:.2f}x topk: Gaussian-k {verdict}")
    return out


# -- main --------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small J only (smoke test)")
    p.add_argument("--device", action="append", choices=("cpu", "cuda"),
                   help="device(s) to time; default cpu, plus cuda when available")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement within one run (default 7, 3 with --quick)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="K whole runs: the summary gives each cell's median and spread "
                        "(min-max) over them, and the verdicts use the medians (default 1)")
    p.add_argument("--methods", nargs="+", choices=CHOICES + ("sort",), default=None,
                   help=f"methods to time, of {', '.join(CHOICES)} (default: "
                        f"{', '.join(METHODS)}, and the authors' sort); topk, the "
                        "reference of every ratio, always runs")
    p.add_argument("--shi", action="store_true",
                   help="Shi et al.'s comparison set: " + ", ".join(SHI)
                        + " (overrides --methods; no authors' sort)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override the J values")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="override the S values")
    p.add_argument("--global-topk", action="store_true",
                   help="also time the global top-k oracle with N=8 workers")
    p.add_argument("--dist", choices=("layers", "normal"), default="layers",
                   help="gradient distribution (default: layers of different scales)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--note", default="", help="free text recorded with the results")
    p.add_argument("--out", type=Path, default=None,
                   help="write Markdown here and a CSV next to it (.csv)")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    sparsities = args.sparsities or SPARSITIES
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if repeats < 1:
        raise SystemExit(f"--repeats={repeats}: must be >= 1")

    if args.repeat < 1:
        raise SystemExit(f"--repeat={args.repeat}: must be >= 1")
    methods = tuple(m for m in (args.methods or METHODS) if m != "sort")
    if args.shi:
        methods = SHI
    sort = not args.shi and (args.methods is None or "sort" in args.methods)

    env = environment(devices)
    env["repeats"] = repeats
    env["runs"] = args.repeat
    env["gradients"] = args.dist
    runs, global_rows = [], []
    for run in range(args.repeat):
        rows = []
        for device in devices:
            for dim in sizes:
                for s in sparsities:
                    t0 = time.perf_counter()
                    cell = bench_cell(device, dim, s, repeats, dist=args.dist, methods=methods,
                                      sort=sort)
                    rows += cell
                    top = {r["method"]: r for r in cell}
                    print(f"# run {run + 1}/{args.repeat} {device} J={dim} S={s}: "
                          f"{time.perf_counter() - t0:.1f}s; topk step "
                          f"{top['topk']['step_passes']:.2f} passes"
                          + (f", regtopk {top['regtopk']['step_x_topk']:.2f}x topk"
                             if "regtopk" in top else ""), file=sys.stderr, flush=True)
                    if args.global_topk and run == 0:
                        global_rows += bench_global(device, dim, s, repeats)
        for r in rows:
            r["run"] = run
        runs.append(rows)
    try:
        env["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    env["cpu_candidate_scan"] = candidate_scan()  # now with numba's threading layer
    last = runs[-1]
    text = markdown(last, env, global_rows, args.note)
    if args.repeat > 1:
        text = text.replace("| device | J | S | k | method |",
                            f"Full table of the last run ({args.repeat} of {args.repeat}):\n\n"
                            "| device | J | S | k | method |", 1)
    text += "\n" + summary(runs)
    shi = comparison(runs)
    if shi:
        text += "\n" + shi
    checks = targets(runs)
    if checks:
        text += ("\nTargets and verdicts (largest J" + (", medians over the runs" if
                 args.repeat > 1 else "") + "):\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        write_csv(args.out.with_suffix(".csv"), [r for rows in runs for r in rows] + global_rows)
    return last


if __name__ == "__main__":
    main()
