"""The GPU checks of issue #21, one step per call; scripts/gpu_checks.sh runs
the steps in order under a time budget. Every step writes its results into
``<out>/gpu_summary.json`` as it finishes (one key per step, partial results
of a step as they come) and renders ``<out>/gpu_summary.md`` from it.

    python scripts/gpu_bench.py env       --out DIR
    python scripts/gpu_bench.py inprocess --out DIR [--rounds 30]   # (b) floor, loop vs batched; (a)'s twins
    python scripts/gpu_bench.py flower    --out DIR [--rounds 30]   # (a) Flower at Fig. 3, (c) memory
    python scripts/gpu_bench.py many      --out DIR                 # (d) N=64, m=16, width 16
    python scripts/gpu_bench.py skip NAME --out DIR --why "not run: budget"

(a) ``runtime=flower`` at Fig. 3's settings (ResNet-18, N = 8, S = 0.001,
Top-k and RegTop-k) for a fixed number of rounds beside ``runtime=inprocess``
over the same rounds: s/round of each (median of the rounds between the
first and the last, which carry start-up and the final evaluation) and the
final models' agreement (largest relative difference, and whether bitwise)
with ``deterministic=true``. (b) The compute floor: one forward + backward of
a plain ResNet-18 over N x 20 images (one batch of 160), and the in-process
round in multiples of it, with the per-worker loop and the batched
gradients (``task.batched``). (c) Peak GPU memory per Flower client (from
``nvidia-smi``, per process, the CUDA context included) and the
``runtime.client_gpus`` that ``auto`` chose. (d) Flower with many clients:
ResNet-18 at width 16, N = 64, m = 16 sampled per round: s/round.

On a machine without CUDA (``--device cpu``, the smoke test) every step
runs on the CPU and the GPU numbers read "not measured: no GPU".
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

NO_GPU = "not measured: no GPU"
# the gradient paths (task.batched): the per-worker loop, the vmap pass, the
# recorded per-worker step (a CUDA graph; auto's choice on CUDA)
MODES = {"loop": "false", "batched": "true", "graph": "graph"}


# -- results file --------------------------------------------------------------------
def _load(out: Path) -> dict:
    f = out / "gpu_summary.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def record(out: Path, step: str, data: dict) -> None:
    """Merge ``data`` into the step's entry, write the JSON atomically, render the Markdown."""
    allres = _load(out)
    allres.setdefault(step, {}).update(data)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_summary.json.tmp"
    tmp.write_text(json.dumps(allres, indent=1, default=str))
    os.replace(tmp, out / "gpu_summary.json")
    (out / "gpu_summary.md").write_text(render(allres))


def _fmt(v, unit="", nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}{unit}"
    return f"{v}{unit}"


def _render_flower(key: str, fl: dict) -> list:
    """The Markdown of one Flower step (``flower`` or ``flower_mps``)."""
    lines = []
    if fl and "skipped" not in fl:
        lines += [f"## (a) Flower vs in-process at Fig. 3's settings, (c) memory"
                  + (" (under CUDA MPS)" if key == "flower_mps" else ""), "",
                  "All with deterministic=true; in-process: the `-det` runs above. Clients: "
                  f"{fl.get('clients_on', '-')}.", "",
                  "| method | Flower s/round | in-process s/round (loop / batched / graph) | "
                  "Flower ÷ in-process (best) | final models: max rel. diff (loop / batched / "
                  "graph) | "
                  "bitwise | client_gpus (auto) | peak per client |",
                  "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        for sp, row in fl.get("runs", {}).items():
            lines.append(
                f"| {sp} | {_fmt(row.get('s_per_round'))} | "
                + " / ".join(_fmt(row.get(f"inprocess_{m}_s")) for m in MODES)
                + f" | {_fmt(row.get('ratio'), 'x', 3)} | "
                + " / ".join(_fmt(row.get(f"maxrel_{m}")) for m in MODES) + " | "
                f"{row.get('bitwise')} | {_fmt(row.get('client_gpus'))} | "
                f"{row.get('peak_per_client', NO_GPU)} |")
        for sp, row in fl.get("tick", {}).items():
            lines.append(f"\n{sp} with Flower's own 0.1 s message tick "
                         f"(`runtime.prompt_delivery=false`): {_fmt(row.get('s_per_round'))} "
                         f"s/round; final model bitwise equal to the prompt run's: "
                         f"{row.get('bitwise_vs_prompt')} (max rel. diff "
                         f"{_fmt(row.get('maxrel_vs_prompt'))})")
        for sp, row in fl.get("pageable", {}).items():
            lines.append(f"\n{sp} with the clients' state files pageable (`REGTOPK_PIN_STATE=0`): "
                         f"{_fmt(row.get('s_per_round'))} s/round; bitwise equal to the pinned "
                         f"run: {row.get('bitwise_vs_pinned')}; a client's message (medians, ms): "
                         + ", ".join(f"{k} {1e3 * v:.1f}"
                                     for k, v in (row.get("client_timing_s") or {}).items()))
        for sp, row in fl.get("runs", {}).items():
            if row.get("client_gpus_rule"):
                lines.append(f"\n{sp}: {row['client_gpus_rule']}")
        for sp, row in fl.get("runs", {}).items():
            if row.get("client_timing_s"):  # where a client's message went (client_timing.csv)
                lines.append(f"\n{sp}, a Flower client's train message (medians, ms): " + ", ".join(
                    f"{k} {1e3 * v:.1f}" for k, v in row["client_timing_s"].items()))
        lines.append("")
    return lines


def render(r: dict) -> str:
    """The Markdown summary of whatever steps have results so far."""
    lines = ["# GPU checks (issue #21)", ""]
    env = r.get("env", {})
    if env:
        lines += [f"Machine: {env.get('gpu', NO_GPU)}; torch {env.get('torch')}, "
                  f"CUDA {env.get('cuda')}; {env.get('cpus')} CPUs; flwr {env.get('flwr')}, "
                  f"ray {env.get('ray')}; device={env.get('device')}; {env.get('date')}.", ""]
    for step in ("inprocess", "flower", "flower_mps", "many"):
        for key in ("skipped", "stopped"):
            if key in r.get(step, {}):
                lines += [f"**{step}**: {r[step][key]}", ""]
    ip = r.get("inprocess", {})
    if ip and "skipped" not in ip:
        fl = ip.get("floor", {})
        lines += ["## (b) In-process round vs the compute floor", "",
                  f"Floor: one forward + backward of ResNet-18 (width {ip.get('width')}) over "
                  f"{ip.get('floor_images')} images = **{_fmt(fl.get('batch_ms'), ' ms')}** "
                  f"(the same images as {ip.get('workers')} batches of 20, one after another: "
                  f"{_fmt(fl.get('sequential_ms'), ' ms')}). Gradients of the {ip.get('workers')} "
                  f"workers alone: " + ", ".join(f"{m} {_fmt(fl.get(f'grad_{m}_ms'), ' ms')}"
                                                  for m in MODES)
                  + (f" (all fp32; with TF32, `tf32=true`: floor {_fmt(fl.get('batch_tf32_ms'), ' ms')}, "
                     + ", ".join(f"{m} {_fmt(fl.get(f'grad_{m}_tf32_ms'), ' ms')}" for m in MODES)
                     + ")" if fl.get("grad_batched_tf32_ms") else "")
                  + ("." if fl.get("equal_batches", True) else
                     " (unequal batches: the batched runs fell back to the loop)."), "",
                  "`-det`: deterministic=true (the Flower runs' twins); without: torch's defaults.",
                  "", "| run | s/round | x floor | final accuracy |", "| --- | ---: | ---: | ---: |"]
        for name, row in ip.get("runs", {}).items():
            lines.append(f"| {name} | {_fmt(row.get('s_per_round'))} | "
                         f"{_fmt(row.get('x_floor'), 'x', 3)} | {_fmt(row.get('accuracy'))} |")
        rep = ip.get("repeat")
        if rep:
            lines += ["", f"deterministic=true, the same in-process run twice: {rep}"]
        lines.append("")
    for key in ("flower", "flower_mps"):
        lines += _render_flower(key, r.get(key, {}))
    many = r.get("many", {})
    if many and "skipped" not in many:
        lines += ["## (d) Flower with many clients", "",
                  f"ResNet-18 width {many.get('width')}, N = {many.get('workers')}, "
                  f"m = {many.get('per_round')} per round, {many.get('rounds')} rounds: "
                  f"**{_fmt(many.get('s_per_round'))} s/round** (in-process: "
                  f"{_fmt(many.get('inprocess_s_per_round'))}); client_gpus "
                  f"{_fmt(many.get('client_gpus'))}; peak per client "
                  f"{many.get('peak_per_client', NO_GPU)}."
                  + (f" With Flower's own 0.1 s message tick (`runtime.prompt_delivery=false`): "
                     f"{_fmt(many.get('tick_s_per_round'))} s/round."
                     if many.get("tick_s_per_round") else ""), ""]
    errs = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and v.get("error")}
    for k, v in errs.items():
        lines.append(f"**{k} failed**: {v}")
    return "\n".join(lines) + "\n"


# -- helpers -------------------------------------------------------------------------------
def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from regtopk_fl.settings import CONF_DIR, validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.progress = False
    validate(cfg)
    return cfg


def per_round(run_dir: Path):
    """Median s/round of the rounds between the first (start-up) and the
    last (final evaluation); all rounds after the first when there are few."""
    with open(run_dir / "metrics.csv") as fh:
        wall = [float(r["wall_s"]) for r in csv.DictReader(fh)]
    steps = [b - a for a, b in zip(wall[1:], wall[2:])]  # rounds 2..R
    if len(steps) > 2:
        steps = steps[:-1]
    return statistics.median(steps) if steps else None


def final_accuracy(run_dir: Path):
    with open(run_dir / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["accuracy"]]
    return float(rows[-1]["accuracy"]) if rows else None


def agreement(a_dir: Path, b_dir: Path) -> dict:
    """Largest relative difference (max |a - b| / max |b|, parameters and
    buffers) of two runs' final models, and whether they are bitwise equal."""
    import torch

    a = torch.load(a_dir / "model.pt", weights_only=True, map_location="cpu")
    b = torch.load(b_dir / "model.pt", weights_only=True, map_location="cpu")
    rel, equal = 0.0, True
    for key in ("params", "buffers"):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        equal = equal and torch.equal(x, y)
        rel = max(rel, float((x.double() - y.double()).abs().max() / y.double().abs().max()))
    return {"maxrel": rel, "bitwise": equal}


class GpuMemory:
    """Peak GPU memory per process (nvidia-smi, every 0.5 s) while a run goes."""

    def __init__(self):
        self.peak: dict = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._t = None
        self.visible = None

    def __enter__(self):
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        import torch

        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory",
                     "--format=csv,noheader,nounits"], capture_output=True, text=True,
                    timeout=5).stdout
                for line in out.strip().splitlines():
                    pid, mib = [s.strip() for s in line.split(",")[:2]]
                    self.peak[int(pid)] = max(self.peak.get(int(pid), 0), int(float(mib)))
                self.visible = bool(self.peak) or self.visible
            except Exception:  # noqa: BLE001 - no nvidia-smi: the totals below only
                pass
            try:
                free, total = torch.cuda.mem_get_info()
                self.total_peak = max(self.total_peak, int(total - free))
            except Exception:  # noqa: BLE001
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=10)

    def summary(self, clients_expected: int) -> dict:
        me = os.getpid()
        clients = {p: v for p, v in self.peak.items() if p != me}
        out = {"gpu_used_peak_gib": round(self.total_peak / 2**30, 3),
               "server_mib": self.peak.get(me)}
        if clients:
            vals = sorted(clients.values())
            out.update({"client_processes": len(vals), "client_peak_mib_max": vals[-1],
                        "client_peak_mib_median": statistics.median(vals),
                        "peak_per_client": f"{vals[-1] / 1024:.2f} GiB max, "
                                           f"{statistics.median(vals) / 1024:.2f} median over "
                                           f"{len(vals)} processes (nvidia-smi)"})
        else:
            out["peak_per_client"] = ("per-process memory not visible; GPU in use at peak "
                                      f"{self.total_peak / 2**30:.2f} GiB (server + clients)")
        return out


def median_ms(fn, reps: int, sync, warmup: int = 2) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` calls,
    each timed up to ``sync()`` (the device's queue drained)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def _cuda(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_available()


def fig3(a, sp: str, runtime: str, det: bool = True) -> list:
    """Fig. 3's settings for ``a.rounds`` rounds, evaluated only at the end."""
    return ["experiment=fig3_cifar10", f"sparsifier={sp}", f"runtime={runtime}",
            f"num_workers={a.workers}", f"rounds={a.rounds}", f"eval_every={10 ** 6}",
            f"task.width={a.width}", f"task.data_path={a.data}", f"task.cache_dir={a.cache}",
            f"task.test_subset={a.test_subset}", f"device={a.device}", "checkpoint.every=0",
            f"deterministic={'true' if det else 'false'}"]


def _run(cfg, run_dir: Path) -> dict:
    import shutil

    from regtopk_fl.runner import run_experiment

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_experiment(cfg, run_dir)
    return {"s_per_round": per_round(run_dir), "accuracy": final_accuracy(run_dir),
            "total_s": round(time.perf_counter() - t0, 2), "rounds": summary["rounds"],
            "client_gpus": summary.get("client_gpus"),
            "client_gpus_rule": summary.get("client_gpus_rule"),
            "client_gpu_bytes": summary.get("client_gpu_bytes"),
            "client_timing_s": summary.get("client_timing_s")}


# -- steps ------------------------------------------------------------------------------------
def step_env(a) -> None:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": a.device,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "python": sys.version.split()[0]}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else NO_GPU
    for mod in ("flwr", "ray", "hydra", "omegaconf", "flwr_datasets", "datasets"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - what is missing is the result
            info[mod] = f"missing: {type(exc).__name__}: {exc}"
    print(json.dumps(info, indent=1))
    record(a.out, "env", info)


def floor(a) -> dict:
    """The compute floor and the workers' gradients alone (ms, median)."""
    import torch
    import torch.nn.functional as F

    from regtopk_fl.tasks.models import resnet18

    from regtopk_fl import determinism

    determinism.apply(False)  # what the in-process runs below compute with (tf32=false: fp32)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n_img = 20 * a.workers
    model = resnet18(10, "cifar", 0, a.width).to(dev).train()
    x = torch.randn(n_img, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (n_img,), device=dev)

    def timed(fn, reps):
        return median_ms(fn, reps, sync)

    def fwd_bwd(xs, ys):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()

    reps = a.reps
    out = {"batch_ms": timed(lambda: fwd_bwd(x, y), reps),
           "sequential_ms": timed(lambda: [fwd_bwd(x[i:i + 20], y[i:i + 20])
                                           for i in range(0, n_img, 20)], reps)}
    # the task's own gradient call, both paths (round 1's batches)
    from regtopk_fl.runner import build

    for name, mode in MODES.items():
        cfg = compose(fig3(a, "topk", "inprocess") + [f"task.batched={mode}"])
        task, _ = build(cfg)
        w = task.init_params().to(dev)
        rows = w.unsqueeze(0).expand(a.workers, -1)
        b = task.init_buffers().to(dev)
        ws = list(range(a.workers))
        out[f"grad_{name}_ms"] = timed(lambda: task.gradients(rows, b, ws, 1, 0), reps)
        if dev.type == "cuda":  # what TF32 (tf32=true, torch's cuDNN default) would give
            determinism.apply(False, tf32=True)
            try:
                out[f"grad_{name}_tf32_ms"] = timed(
                    lambda: task.gradients(rows, b, ws, 1, 0), reps)
                if mode == "true":
                    out["batch_tf32_ms"] = timed(lambda: fwd_bwd(x, y), reps)
            finally:
                determinism.apply(False)
    out = {k: round(v, 3) for k, v in out.items()}
    # a partition smaller than a batch makes unequal batches: the batched path
    # then falls back to the loop (tasks/images.py)
    out["equal_batches"] = len({len(task.batch_indices(n, 1, 0)) for n in ws}) == 1
    return out


def step_inprocess(a) -> None:
    record(a.out, "inprocess", {"width": a.width, "workers": a.workers, "rounds": a.rounds,
                                "floor_images": 20 * a.workers})
    fl = floor(a)
    print("floor:", fl, flush=True)
    record(a.out, "inprocess", {"floor": fl})
    floor_s = fl["batch_ms"] / 1e3
    runs = {}
    # speed with torch's defaults first, then the deterministic twins that the
    # Flower runs are compared with (and what determinism costs)
    for det in (False, True):
        for sp in a.sparsifiers:
            for mode, value in MODES.items():
                name = f"{sp}-{mode}" + ("-det" if det else "")
                cfg = compose(fig3(a, sp, "inprocess", det) + [f"task.batched={value}"])
                row = _run(cfg, a.runs / f"inprocess-{name}")
                if row["s_per_round"]:
                    row["x_floor"] = round(row["s_per_round"] / floor_s, 2)
                runs[name] = row
                print(name, row, flush=True)
                record(a.out, "inprocess", {"runs": runs})
    # deterministic=true: the same run again, bit for bit?
    sp = a.sparsifiers[-1]
    cfg = compose(fig3(a, sp, "inprocess") + ["task.batched=false"])
    _run(cfg, a.runs / f"inprocess-{sp}-loop-det-repeat")
    ag = agreement(a.runs / f"inprocess-{sp}-loop-det-repeat", a.runs / f"inprocess-{sp}-loop-det")
    rep = (f"{sp} (loop) bitwise equal: {ag['bitwise']} (max rel. diff {ag['maxrel']:.3g})")
    print(rep, flush=True)
    record(a.out, "inprocess", {"repeat": rep})


def step_flower(a) -> None:
    """(a) and (c); ``--tag mps``: the same under CUDA MPS (gpu_checks.sh
    starts the daemon), recorded as ``flower_mps``, without the tick twin."""
    runs = {}
    key = "flower" + (f"_{a.tag}" if a.tag else "")
    record(a.out, key, {"clients_on": "task.batched=auto: "
                        + ("the recorded step (a CUDA graph)" if _cuda(a.device) else "the loop")
                        + ("; CUDA MPS on" if a.tag == "mps" else "")})
    for sp in a.sparsifiers:
        cfg = compose(fig3(a, sp, "flower"))
        run_dir = a.runs / (f"flower-{sp}" + (f"-{a.tag}" if a.tag else ""))
        with GpuMemory() as mem:
            row = _run(cfg, run_dir)
        if _cuda(a.device):
            row.update(mem.summary(a.workers))
        else:
            row["peak_per_client"] = NO_GPU
        for mode in MODES:
            twin = a.runs / f"inprocess-{sp}-{mode}-det"  # both deterministic=true
            if (twin / "model.pt").exists():
                ag = agreement(run_dir, twin)
                row[f"maxrel_{mode}"] = ag["maxrel"]
                row[f"bitwise_{mode}"] = ag["bitwise"]
                row[f"inprocess_{mode}_s"] = per_round(twin)
        row["bitwise"] = " / ".join(str(row.get(f"bitwise_{m}", "-")) for m in MODES)
        best = [row[f"inprocess_{m}_s"] for m in MODES if row.get(f"inprocess_{m}_s")]
        if best and row.get("s_per_round"):
            row["ratio"] = round(row["s_per_round"] / min(best), 3)
        runs[sp] = row
        print(sp, row, flush=True)
        record(a.out, key, {"runs": runs})
    if a.tag:
        return
    # the same first run with Flower's own 0.1 s message tick
    # (runtime.prompt_delivery=false, simulation/delivery.py)
    sp = a.sparsifiers[0]
    row = _run(compose(fig3(a, sp, "flower") + ["runtime.prompt_delivery=false"]),
               a.runs / f"flower-{sp}-tick")
    ag = agreement(a.runs / f"flower-{sp}-tick", a.runs / f"flower-{sp}")
    tick = {"s_per_round": row["s_per_round"], "bitwise_vs_prompt": ag["bitwise"],
            "maxrel_vs_prompt": ag["maxrel"]}
    print(f"{sp} with Flower's tick", tick, flush=True)
    record(a.out, "flower", {"tick": {sp: tick}})
    # and with the clients' state files left pageable (clients/state_files.py)
    os.environ["REGTOPK_PIN_STATE"] = "0"  # the Ray workers started by this run inherit it
    try:
        row = _run(compose(fig3(a, sp, "flower")), a.runs / f"flower-{sp}-pageable")
    finally:
        del os.environ["REGTOPK_PIN_STATE"]
    ag = agreement(a.runs / f"flower-{sp}-pageable", a.runs / f"flower-{sp}")
    pageable = {"s_per_round": row["s_per_round"], "client_timing_s": row["client_timing_s"],
                "bitwise_vs_pinned": ag["bitwise"]}
    print(f"{sp} with pageable state files", pageable, flush=True)
    record(a.out, "flower", {"pageable": {sp: pageable}})


def step_many(a) -> None:
    base = ["task=cifar10", "sparsifier=regtopk", "sparsifier.sparsity=0.001", "sparsifier.mu=5",
            f"num_workers={a.many_n}", f"participation.clients_per_round={a.many_m}",
            f"rounds={a.many_rounds}", f"eval_every={10 ** 6}", f"task.width={a.many_width}",
            f"task.data_path={a.data}", f"task.cache_dir={a.cache}",
            f"task.test_subset={a.test_subset}", f"device={a.device}", "checkpoint.every=0",
            "task.partition=iid"]
    info = {"workers": a.many_n, "per_round": a.many_m, "rounds": a.many_rounds,
            "width": a.many_width}
    record(a.out, "many", info)
    with GpuMemory() as mem:
        row = _run(compose(base + ["runtime=flower"]), a.runs / "many-flower")
    info.update({k: row[k] for k in ("s_per_round", "client_gpus", "client_gpus_rule",
                                     "total_s")})
    info.update(mem.summary(a.many_m) if _cuda(a.device) else {"peak_per_client": NO_GPU})
    print("many flower", info, flush=True)
    record(a.out, "many", info)
    ip = _run(compose(base + ["runtime=inprocess"]), a.runs / "many-inprocess")
    record(a.out, "many", {"inprocess_s_per_round": ip["s_per_round"]})
    tick = _run(compose(base + ["runtime=flower", "runtime.prompt_delivery=false"]),
                a.runs / "many-flower-tick")
    record(a.out, "many", {"tick_s_per_round": tick["s_per_round"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("env", "inprocess", "flower", "many", "skip"))
    ap.add_argument("name", nargs="?", help="skip: the step skipped")
    ap.add_argument("--why", default="not run: budget")
    ap.add_argument("--stopped", action="store_true", help="skip: it ran, but out of time")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/regtopk_gpu_runs"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", default=str(ROOT / ".gpu" / "cifar10-small.tar.gz"))
    ap.add_argument("--cache", default="/tmp/regtopk_gpu_cache")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--sparsifiers", nargs="+", default=["topk", "regtopk"])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions of the floor")
    ap.add_argument("--many-n", type=int, default=64)
    ap.add_argument("--many-m", type=int, default=16)
    ap.add_argument("--many-width", type=int, default=16)
    ap.add_argument("--many-rounds", type=int, default=20)
    ap.add_argument("--tag", default="", help="flower: record as flower_TAG (mps: under CUDA MPS)")
    a = ap.parse_args(argv)
    if a.step == "skip":  # a step not run, or (--stopped) stopped by its time cap
        record(a.out, a.name, {"stopped" if a.stopped else "skipped": a.why})
        print(f"== {a.name}: {a.why}")
        return 0
    a.runs.mkdir(parents=True, exist_ok=True)
    try:
        {"env": step_env, "inprocess": step_inprocess, "flower": step_flower,
         "many": step_many}[a.step](a)
    except Exception as exc:  # the other steps go on; the error is a result too
        import traceback

        traceback.print_exc()
        record(a.out, a.step, {"error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
