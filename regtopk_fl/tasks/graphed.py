"""The per-worker gradient pass of an image task, captured once as a CUDA
graph and replayed for every worker (``task.batched=graph``).

The per-worker loop on a GPU is bound by kernel launches, not by the GPU:
ResNet-18 on 20 CIFAR images is some 600 small kernels, each launched by
Python. Here one worker's whole step is recorded once per batch shape:

1. copy the worker's BatchNorm statistics into the model's buffers,
2. forward and loss,
3. backward,
4. gather the gradient, the updated statistics and the loss into flat
   static outputs,

and replayed per worker after copying its parameters, images and labels
into static inputs (the model's parameters are views of one static vector).
The kernels are the loop's own (same shapes, same cuDNN choice), so the
result is the loop's: bitwise where the loop itself is repeatable
(``deterministic=true``; measured on an H200 for the engine's one model), unlike
the vmap pass (tasks/batched.py), whose batched shapes make cuDNN choose other
algorithms. With a model per worker (local SGD) the loop reads row r of the
caller's tensor and the step its own aligned copy: libraries that choose by
alignment may round differently there. No host sync per worker.

A graph keeps the kernels chosen when it was recorded: the recording is
keyed by the batch shape and by the cuDNN/TF32/determinism settings in force.
Nothing else of the model may change between calls (this module owns the
model's parameter storage from the first call on; the task's other paths
re-point the parameters and leave the graph's storage alone).

On the CPU there are no graphs: :class:`EagerCapture` runs the same recorded
step eagerly, which is how the tests check the static inputs and outputs
against the loop. A step that cannot be recorded (an operation CUDA graphs
refuse) is logged once, and the task computes with its loop from then on.
"""
from __future__ import annotations

import logging

import torch
from torch.nn.utils import vector_to_parameters


log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The step could not be recorded: the caller computes with the loop."""


class CudaCapture:
    """Records ``step`` as a CUDA graph (after warm-up calls on a side
    stream, as torch requires) and returns its replay."""

    warmup = 3
    eager = False  # a replay runs the recorded kernels on the recorded addresses

    def __call__(self, step, device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay


class EagerCapture:
    """The CPU stand-in: the recorded step, run eagerly on every replay."""

    eager = True  # a replay reads the model's parameters where they point now

    def __call__(self, step, device):
        step()
        return step


def _settings() -> tuple:
    """What decides the kernels a graph records."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled())


class _Slot:
    """One recorded step: its static inputs and outputs and its replay."""

    def __init__(self, gg: "GraphedGradients", x, y):
        task = gg.task
        self.x = torch.empty_like(x)
        self.y = torch.empty_like(y)
        self.g = torch.empty(task.dim, dtype=task.dtype, device=task.device)
        self.loss = torch.zeros((), dtype=task.dtype, device=task.device)
        self.bufs_out = (torch.empty(task.num_buffers, dtype=task.dtype, device=task.device)
                         if task.num_buffers else None)
        self.x.copy_(x)
        self.y.copy_(y)
        self.replay = gg.capture(lambda: self.step(gg), task.device)

    def step(self, gg: "GraphedGradients") -> None:
        task, model = gg.task, gg.task.model
        if gg.bufs_in is not None:  # 1. the worker's statistics
            off = 0
            for t in task._buffers:
                k = t.numel()
                t.copy_(gg.bufs_in[off:off + k].view_as(t))
                off += k
        model.zero_grad(set_to_none=True)  # the backward writes fresh gradients
        with torch.enable_grad():
            loss = task.loss(model(self.x), self.y)  # 2.
            loss.backward()  # 3.
        torch.cat([p.grad.reshape(-1) if p.grad is not None  # 4.
                   else torch.zeros_like(p).reshape(-1) for p in task._params], out=self.g)
        self.loss.copy_(loss.detach())
        if self.bufs_out is not None:
            torch.cat([t.reshape(-1) for t in task._buffers], out=self.bufs_out)


class GraphedGradients:
    """``__call__(params, buffers, batches)`` -> (grads [R, J], losses [R]
    tensor, buffers [R, B] or None), as the task's per-worker loop computes
    them; ``batches`` is the list of R (images, labels)."""

    def __init__(self, task, capture=None):
        self.task = task
        self.capture = capture if capture is not None else (
            CudaCapture() if torch.device(task.device).type == "cuda" else EagerCapture())
        self.params = torch.empty(task.dim, dtype=task.dtype, device=task.device)
        self.bufs_in = (torch.empty(task.num_buffers, dtype=task.dtype, device=task.device)
                        if task.num_buffers else None)
        self.slots: dict = {}
        self.recorded = 0  # how many steps were recorded (one per shape and setting)
        self.failed = None  # why recording failed (then the task uses its loop)

    def _own_parameters(self) -> None:
        """The model's parameters as views of the static vector (the recorded
        kernels read them there)."""
        vector_to_parameters(self.params, self.task._params)

    def __call__(self, params: torch.Tensor, buffers, batches):
        task = self.task
        R = len(batches)
        grads = torch.empty(R, task.dim, dtype=task.dtype, device=task.device)
        losses = torch.empty(R, dtype=task.dtype, device=task.device)
        bufs_out = (torch.empty(R, task.num_buffers, dtype=task.dtype, device=task.device)
                    if task.num_buffers else None)
        one_model = params.dim() == 2 and params.stride(0) == 0  # rows of one model
        settings = _settings()
        task.model.train()
        if getattr(self.capture, "eager", True):  # evaluate() or the loop may have moved them
            self._own_parameters()
        for r, (x, y) in enumerate(batches):
            if r == 0 or not one_model:
                self.params.copy_(params[r])
            if self.bufs_in is not None:
                src = task._init_buffers if buffers is None else (
                    buffers if buffers.dim() == 1 else buffers[r])
                self.bufs_in.copy_(src)
            key = (tuple(x.shape), x.dtype, tuple(y.shape), settings)
            slot = self.slots.get(key)
            if slot is None:
                self._own_parameters()  # what the recording reads
                try:
                    slot = _Slot(self, x, y)  # recorded on this batch
                except Exception as exc:  # noqa: BLE001 - the loop computes the same
                    self.failed = f"{type(exc).__name__}: {exc}"
                    log.warning("task.batched: the gradient step could not be recorded as a "
                                "CUDA graph (%s); computing with the per-worker loop", self.failed)
                    task.model.zero_grad(set_to_none=True)
                    raise CaptureError(self.failed) from exc
                self.slots[key] = slot
                self.recorded += 1
            else:
                slot.x.copy_(x)
                slot.y.copy_(y)
            slot.replay()  # the step reads every input afresh: warm-ups leave no trace
            grads[r].copy_(slot.g)
            losses[r].copy_(slot.loss)
            if bufs_out is not None:
                bufs_out[r].copy_(slot.bufs_out)
        task.model.zero_grad(set_to_none=True)
        return grads, losses, bufs_out
