"""What every task gives the runtimes: a flat model, its data split, local
updates and a central evaluation. Both runtimes (Flower and in-process) call
exactly these methods, which is what makes their trajectories equal.

Conventions:
* the model is a flat vector ``params`` [J] (dtype ``task.dtype``); tasks with
  normalisation statistics (BatchNorm) also have flat ``buffers`` [B], which
  are averaged, not sparsified;
* ``local_update`` is stateless: which minibatch worker n uses at round t and
  local step s is a pure function of (seed, n, t, s), so both runtimes, a
  resumed run and a re-run all see the same batches.
* what a worker uploads after ``local_steps`` > 1 steps is the task's
  ``upload`` (the top-level ``upload`` setting, set by runner.build for both
  runtimes): ``model_change`` (default), the pseudo-gradient
  (w_start - w_end) / local_lr; ``last_gradient``, the gradient of the last
  local minibatch, taken at the model after the first local_steps - 1 steps
  (the authors' ``ResNet18-CIFAR10.py``: it sparsifies ``param.grad`` after
  its 40 local steps). With one local step both are the gradient.

**The contract with the settings.** A task is an option of the ``task``
config group: ``conf/task/<name>.yaml`` names its class (``_target_``) and
holds its own keys, which the constructor takes (keys of other tasks are
ignored through ``**_``). :meth:`Task.check_settings` checks those keys in a
config before any work (``settings.validate`` calls it, and knows no task by
name), and ``runtimes`` / ``devices`` say where the task runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import checks


@dataclass
class LocalResult:
    grad: torch.Tensor  # [R, J] gradient (local_steps=1) or pseudo-gradient
    loss: list  # [R] mean training loss over the local steps
    buffers: torch.Tensor | None = None  # [R, B] buffers after the local steps


UPLOADS = ("model_change", "last_gradient")


class Task:
    """A model, its data split across workers, local updates and evaluation.

    Class attributes: ``name`` (the stem of its conf/task/*.yaml),
    ``runtimes`` (where it runs: ``inprocess``, ``flower``), ``devices``
    (``cpu``, ``cuda``: where its tensors may live), ``dtype``, ``upload``,
    ``has_closed_form``."""

    name = "task"
    runtimes = ("inprocess", "flower")
    devices = ("cpu", "cuda")
    dtype = torch.float32
    upload = "model_change"  # or "last_gradient" (see the module doc)
    dim: int
    num_workers: int
    has_closed_form = False  # a known minimiser w*, so the gap ||w - w*|| is reported

    @classmethod
    def check_settings(cls, cfg, num_workers: int, runtime: str) -> None:
        """Check the ``task.*`` keys of ``cfg`` (and ``num_workers``, the
        runtime and the device against what the task supports); raise
        :class:`regtopk_fl.checks.ConfigError` with the one-line message. A
        task with keys of its own extends this (``super().check_settings``
        first)."""
        if runtime not in cls.runtimes:
            checks.fail("task", cls.name, f"runs on runtime={' or '.join(cls.runtimes)}")
        device = checks.get(cfg, "device")
        if device in ("cpu", "cuda") and device not in cls.devices:
            checks.fail("device", device, f"task={cls.name} runs on "
                        f"{' or '.join(cls.devices)}")

    def num_examples(self) -> list:
        raise NotImplementedError

    def share(self, folder) -> dict:
        """Leave what this process built in ``folder`` for the clients that
        build the same task in other processes (the simulation's Ray actors),
        and return the ``task.*`` settings under which they read it instead of
        building it again; {} (the default): nothing to share."""
        return {}

    def init_params(self) -> torch.Tensor:
        raise NotImplementedError

    def init_buffers(self):
        return None

    def gradients(self, params: torch.Tensor, buffers, workers: list, round: int, step: int):
        """Minibatch gradients of the given workers at ``params`` ([R, J], one
        row per worker). Returns (grads [R, J], losses [R], buffers [R, B] | None)."""
        raise NotImplementedError

    def local_update(self, params, buffers, workers, round, local_steps=1, local_lr=None):
        """One gradient (local_steps=1, the paper's distributed SGD), or after
        local SGD the pseudo-gradient (w_start - w_end) / local_lr
        (``upload="model_change"``) or the last step's gradient
        (``upload="last_gradient"``)."""
        if local_steps == 1:
            rows = params.unsqueeze(0).expand(len(workers), -1)
            grads, losses, bufs = self.gradients(rows, buffers, workers, round, 0)
            return LocalResult(grads, list(losses), bufs)
        w = params.unsqueeze(0).repeat(len(workers), 1)
        total = [0.0] * len(workers)
        bufs = None if buffers is None else buffers.unsqueeze(0).repeat(len(workers), 1)
        last = self.upload == "last_gradient"
        for step in range(local_steps):
            grads, losses, bufs = self.gradients(w, bufs, workers, round, step)
            total = [t + float(l) for t, l in zip(total, losses)]
            if last and step == local_steps - 1:  # the step itself would be discarded
                return LocalResult(grads, [t / local_steps for t in total], bufs)
            w.sub_(grads, alpha=local_lr)
        pseudo = (params.unsqueeze(0) - w) / local_lr
        return LocalResult(pseudo, [t / local_steps for t in total], bufs)

    def evaluate(self, params, buffers) -> dict:
        """Central metrics of the global model: any of loss, gap, accuracy."""
        raise NotImplementedError
