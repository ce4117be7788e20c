"""The ``deterministic`` switch (top-level config key, default false).

On: ``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic
algorithms without autotuning (``cudnn.deterministic``, no
``cudnn.benchmark``), and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS
reads when it first runs (before any CUDA work of the process: the launcher
applies it right after validation, :func:`regtopk_fl.runner.run_experiment`
before building the task, every Flower client before building its own). A
GPU run can then be repeated bit for bit on the same machine and software.

``warn_only``: CUDA has no deterministic ``adaptive_avg_pool2d`` backward
(ResNet-18's global average pool); torch warns once instead of failing. That
kernel adds each input's gradient exactly once (a 1x1 output pools disjoint
windows), so its atomics add to zeros and the order does not matter.

Off (the default): torch's own defaults, set explicitly, so a process that
ran a deterministic run before (a test session, a reused Ray actor) goes back
to them. On the CPU the switch changes no result of this suite's kernels.

``tf32`` (top-level key, default false) is applied here too: whether CUDA's
convolutions (``cudnn.allow_tf32``, which torch turns on by default) and
matmuls may compute in TF32, a 10-bit mantissa. On an H200 at Fig. 3's settings
TF32 made the batched and the per-worker gradients differ by 5-7 % in norm
(fp32: at most 0.5 %), and their top-k masks in about 400 of 11,174 entries per
worker (fp32: 0 to 44); it made the batched gradients 1.4-1.7x faster and the
loop up to 1.5x (results/README.md, "Flower clients on the GPU"). Exact by
default, fast on request. The CPU has no TF32: the switch changes nothing
there.
"""
from __future__ import annotations

import os
import sys

import torch

CUBLAS_WORKSPACE = ":4096:8"


def apply(enabled: bool, tf32: bool = False) -> None:
    enabled = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if (enabled != torch.are_deterministic_algorithms_enabled()
            or (enabled and not torch.is_deterministic_algorithms_warn_only_enabled())
            or "torch._inductor.config" in sys.modules):
        # torch.use_deterministic_algorithms imports torch._inductor.config
        # (and with it torch._dynamo and sympy: about 1.2 s of a process's
        # start, #34) to set inductor's switch too; where the process is
        # already in the asked state and inductor is not loaded, there is
        # nothing to set (inductor's own default is off)
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def of(cfg) -> bool:
    """The switch as a config sets it (absent: off)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, "deterministic", default=False))


def tf32_of(cfg) -> bool:
    """``tf32`` as a config sets it (absent: off, true fp32)."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(cfg, "tf32", default=False))


def apply_cfg(cfg) -> None:
    """Both switches as ``cfg`` sets them."""
    apply(of(cfg), tf32_of(cfg))


def state() -> dict:
    """What is in force in this process (for logs and tests)."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
