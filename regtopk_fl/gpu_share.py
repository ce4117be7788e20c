"""How much of a GPU each Flower client asks Ray for (``runtime.client_gpus``).

A client that asks Ray for no GPU (``num_gpus=0``) is placed without regard
to GPU memory, and Ray hides the GPUs from it unless
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (which simulation/ sets by default;
Ray's own default hides them, and the client then trains on the CPU). So
with the run's device on CUDA every client asks for a share, and the shares
decide how many clients Ray runs on one GPU at once (at most
``floor(1 / share)`` per GPU).

The rule for ``auto`` (the default), as Flower's guide suggests (run one
client, measure its memory, give each 1/k of a GPU), measured once per run
in the launcher's process before Ray starts:

1. **one client's memory** ``c``: one local update of worker 0 (the task's
   data and model on the GPU, the gradient, error feedback and the
   sparsifier on a scratch memory) under ``torch.cuda.max_memory_reserved``
   (what the caching allocator holds at its peak, so fragmentation is in),
   plus this process's CUDA context (device memory in use that the
   allocator does not hold; on a GPU shared with other programs this also
   counts theirs, which only makes the rule more careful);
2. **how many fit** ``k = floor(0.9 * free / c)`` per GPU, ``free`` being
   the GPU's free memory at that moment (the server's own use is already
   taken), 10 % kept back;
3. **how many run at once** ``n = min(m, CPUs / runtime.client_cpus)``: m the
   clients of a round (``num_workers``, or ``participation.clients_per_round``);
4. **the share** ``1 / a`` with ``a = min(k, ceil(n / GPUs))`` clients per GPU
   (rounded down to 1e-4, Ray's resolution, so that a clients still fit).

Ray's actor pool then holds ``min(CPUs / client_cpus, GPUs * a)`` actors,
each of which may build the task once: at most ``k`` per GPU, so they fit.
``k = 0`` (one client does not fit in the free memory) is refused.

Refused with one line (exit status 2), since no client could run as asked:
``runtime.client_cpus`` above this machine's CPUs; an explicit share with no
GPU visible; and ``client_gpus=0`` with the run's device on CUDA (the clients
would silently train on the CPU). With ``device`` on the CPU the clients ask
for no GPU, whatever the setting.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass

from .settings import ConfigError

log = logging.getLogger(__name__)

HEADROOM = 0.9  # the part of a GPU's free memory the clients may take
RESOLUTION = 1e-4  # Ray's resolution for fractional resources
GIB = float(1 << 30)


@dataclass
class Measurement:
    """One client's GPU memory, from :func:`measure_client` (or a test)."""

    peak_bytes: int  # allocator's peak (reserved) over one local update, data and model included
    context_bytes: int  # the CUDA context: device memory in use outside the allocator
    free_bytes: int  # the GPU's free memory when measured
    total_bytes: int

    @property
    def client_bytes(self) -> int:
        return int(self.peak_bytes + self.context_bytes)


@dataclass
class Share:
    """The share each client asks for and why (logged, and in summary.json)."""

    fraction: float
    why: str
    measurement: Measurement | None = None
    per_gpu: int | None = None  # clients that fit on one GPU (k)
    at_once: int | None = None  # clients that run at once (n)

    def record(self) -> dict:
        out = {"client_gpus": self.fraction, "client_gpus_rule": self.why}
        if self.measurement is not None:
            out["client_gpu_bytes"] = self.measurement.client_bytes
            out["client_gpu_measurement"] = asdict(self.measurement)
        return out


def _fail(key: str, value, why: str):
    raise ConfigError(f"{key}={value!r}: {why}")


def clients_at_once(num_workers: int, per_round: int | None, cpus: int,
                    client_cpus: float) -> int:
    """How many clients the simulation runs at once: a round's clients, at
    most as many as the CPUs hold actors."""
    m = int(per_round) if per_round else int(num_workers)
    return max(1, min(m, int(cpus // float(client_cpus))))


def fraction_for(per_gpu: int, at_once: int, gpus: int) -> float:
    """The share 1/a, a = min(per_gpu, ceil(at_once / gpus)) (rounded down to
    Ray's resolution, so that floor(1 / share) >= a)."""
    a = max(1, min(int(per_gpu), math.ceil(int(at_once) / max(1, int(gpus)))))
    return math.floor((1.0 / a) / RESOLUTION + 1e-9) * RESOLUTION


def choose(setting, device: str, gpus: int, cpus: int, client_cpus: float, at_once: int,
           measure=None) -> Share:
    """The share for ``runtime.client_gpus=setting`` on a machine with
    ``gpus`` visible GPUs and ``cpus`` CPUs; ``measure()`` returns a
    :class:`Measurement` and is called only for ``auto`` on CUDA."""
    if float(client_cpus) > cpus:
        _fail("runtime.client_cpus", client_cpus, f"this machine has {cpus} CPUs, so no "
              "client could be scheduled")
    if device != "cuda":
        return Share(0.0, f"device={device}: clients ask for no GPU")
    if setting != "auto":
        f = float(setting)
        if f <= 0.0:
            _fail("runtime.client_gpus", setting, "the run's device is cuda, but clients "
                  "without a GPU share are placed regardless of GPU memory (or see no GPU): "
                  "use auto or a fraction in (0, 1]")
        if gpus < 1:
            _fail("runtime.client_gpus", setting, "no GPU is visible here, so no client "
                  "could be scheduled: use 0 or device=cpu")
        return Share(f, f"as set: {int(1 // f + 1e-9)} clients per GPU at most")
    if gpus < 1:
        _fail("runtime.client_gpus", setting, "no GPU is visible here: use device=cpu")
    try:
        m = measure()
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not stop the run
        f = fraction_for(at_once, at_once, gpus)
        log.warning("runtime.client_gpus=auto: measuring one client failed (%s: %s); "
                    "splitting each GPU evenly", type(exc).__name__, exc)
        return Share(f, f"auto: measuring one client failed ({type(exc).__name__}); "
                        f"{at_once} at once on {gpus} GPU(s) share them evenly -> {f:g} each")
    k = int(HEADROOM * m.free_bytes // max(1, m.client_bytes))
    if k < 1:
        _fail("runtime.client_gpus", setting,
              f"one client needs {m.client_bytes / GIB:.2f} GiB of GPU memory (peak "
              f"{m.peak_bytes / GIB:.2f} + CUDA context {m.context_bytes / GIB:.2f}), but only "
              f"{m.free_bytes / GIB:.2f} GiB is free: use fewer or smaller clients")
    f = fraction_for(k, at_once, gpus)
    why = (f"auto: one client {m.client_bytes / GIB:.2f} GiB (peak {m.peak_bytes / GIB:.2f} + "
           f"context {m.context_bytes / GIB:.2f}), {k} fit in 90% of {m.free_bytes / GIB:.1f} "
           f"GiB free per GPU; {at_once} at once on {gpus} GPU(s) -> {f:g} of a GPU each")
    return Share(f, why, m, k, at_once)


def measure_client(task, sparsifier, cfg, device="cuda") -> Measurement:
    """One client's GPU memory, measured in this process (CUDA): one local
    update of worker 0 with a scratch memory and a copy of the sparsifier,
    so nothing of the run changes."""
    import torch

    from .fedround import worker_round
    from .memory import ErrorFeedbackMemory

    dev = torch.device(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    memory = ErrorFeedbackMemory(1, task.dim, task.dtype, dev)
    buffers = task.init_buffers()
    worker_round(task, memory, copy.deepcopy(sparsifier), task.init_params().to(dev),
                 None if buffers is None else buffers.to(dev), [None], [0], 1,
                 int(cfg.local_steps), float(cfg.local_lr), weights=[1.0])
    torch.cuda.synchronize()
    peak = int(torch.cuda.max_memory_reserved(dev))
    del memory
    free, total = torch.cuda.mem_get_info(dev)
    context = max(0, int(total - free) - int(torch.cuda.memory_reserved(dev)))
    return Measurement(peak, context, int(free), int(total))


def client_share(cfg, device: str, task=None, sparsifier=None, on_cluster: bool = False,
                 measure=None) -> Share:
    """The share for this run's simulation (simulation/ calls it before Ray
    starts). On a Ray cluster the GPUs are the worker nodes': an explicit
    share is passed as it is (``auto`` is measured here when this machine
    has one, else no GPU)."""
    import os

    import torch
    from omegaconf import OmegaConf

    from .participation import clients_per_round
    from .ray_cluster import ray_local_cpus

    setting = OmegaConf.select(cfg, "runtime.client_gpus", default="auto")
    client_cpus = OmegaConf.select(cfg, "runtime.client_cpus", default=1)
    if on_cluster and setting != "auto":
        return Share(float(setting), "as set (Ray cluster: the worker nodes' GPUs)")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    cpus = ray_local_cpus(cfg).get("num_cpus") or os.cpu_count() or 1  # what Ray will count
    if on_cluster:
        cpus = max(cpus, int(math.ceil(float(client_cpus))))  # the cluster's CPUs are not ours to count
    m = clients_per_round(int(cfg.num_workers),
                          OmegaConf.select(cfg, "participation.clients_per_round", default=None),
                          OmegaConf.select(cfg, "participation.fraction", default=None))
    n = clients_at_once(int(cfg.num_workers), m, cpus, float(client_cpus))
    if measure is None:
        measure = lambda: measure_client(task, sparsifier, cfg)  # noqa: E731
    share = choose(setting, device, gpus, cpus, client_cpus, n, measure)
    log.info("runtime.client_gpus=%s -> %g (%s)", setting, share.fraction, share.why)
    return share
