"""The R workers' minibatch gradients of an image task in one batched pass.

``torch.func``: the model as a function of (parameters, buffers), its
gradient (``grad_and_value``) mapped over the workers with ``vmap``. Each
worker keeps its own BatchNorm statistics: the running mean/var go in as a
[R, ...] batch and come back updated per worker, as the per-worker loop
leaves them. The losses come back as one [R] tensor: no host sync per worker.

Two forms, by what the workers compute on:

* one model for all (``local_steps=1``: the engine passes the server's model
  expanded to R rows): the parameters are not batched, so every convolution
  runs once over the R x batch images with the shared weights and BatchNorm
  normalises each worker's images with their own statistics;
* one model per worker (local SGD's steps): the parameters are batched as
  well (grouped convolutions).

Which path runs where is the task's ``batched`` setting (tasks/images.py,
:func:`path_for`): ``true`` runs this wherever R > 1; ``auto`` (the default)
runs the recorded per-worker step (``graph``, tasks/graphed.py) on CUDA, in
the in-process engine and in every Flower client alike, and the per-worker
loop on the CPU; ``false`` always the loop. This pass and the loop agree
within float rounding, not bitwise (other kernels: README "Which equalities
are bitwise"); on an H200 cuDNN's choices for the batched shapes made them
differ by up to 5e-3 (L2) in fp32, where the recorded step is the loop bit
for bit. On the GPU this pass was the fastest gradient of the three
(results/README.md, "Flower clients on the GPU"); it is kept for that.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

MODES = ("auto", True, False, "graph")


def path_for(mode, device, rows: int) -> str:
    """Which path computes ``rows`` workers' gradients: ``"graph"`` (the
    per-worker step recorded as a CUDA graph, tasks/graphed.py), ``"vmap"``
    (:class:`BatchedGradients`) or ``"loop"`` (the task's per-worker loop)."""
    if mode == "graph" or (mode == "auto" and torch.device(device).type == "cuda"):
        return "graph"
    if mode is True and rows >= 2:
        return "vmap"
    return "loop"


def _split(flat: torch.Tensor, names, shapes) -> dict:
    """[R, J] (or [J]) -> {name: [R, *shape]} (or [*shape]) views of ``flat``."""
    out, off, lead = {}, 0, tuple(flat.shape[:-1])
    for name, shape in zip(names, shapes):
        k = shape.numel()
        out[name] = flat[..., off:off + k].view(*lead, *shape)
        off += k
    return out


class BatchedGradients:
    """``__call__(params, buffers, x, y, loss)`` for one model: the gradients
    [R, J], the losses [R] and the updated float buffers [R, B] (None without
    BatchNorm), in the flat orders of tasks/models.py (``parameters()``, and
    ``buffer_tensors``: the float buffers in ``named_buffers()`` order)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.p_names = [n for n, _ in model.named_parameters()]
        self.p_shapes = [p.shape for p in model.parameters()]
        buffers = dict(model.named_buffers())
        self.b_names = [n for n, b in buffers.items()
                        if b.is_floating_point() and not n.endswith("num_batches_tracked")]
        self.b_shapes = [buffers[n].shape for n in self.b_names]
        # the counters BatchNorm increments in place: one per worker, thrown away
        self.counters = {n: b for n, b in buffers.items() if n not in self.b_names}

    def _loss_fn(self, loss):
        model = self.model

        def fn(params, buffers, x, y):
            buffers = {k: v.clone() for k, v in buffers.items()}  # BatchNorm writes into these
            out = functional_call(model, (params, buffers), (x,))
            return loss(out, y), buffers

        return fn

    def __call__(self, params: torch.Tensor, buffers, x: torch.Tensor, y: torch.Tensor, loss):
        """``params``: [J] (one model for all) or [R, J]; ``buffers``: [R, B]
        (None only for a model without float buffers); ``x``: [R, b, C, H, W];
        ``y``: [R, b]."""
        R = x.shape[0]
        shared = params.dim() == 1
        p = _split(params.detach(), self.p_names, self.p_shapes)
        b = {} if buffers is None else _split(buffers.detach(), self.b_names, self.b_shapes)
        b.update({n: t.expand(R, *t.shape) for n, t in self.counters.items()})
        was_training = self.model.training
        self.model.train()
        try:
            grads, (losses, bufs) = vmap(grad_and_value(self._loss_fn(loss), has_aux=True),
                                         in_dims=(None if shared else 0, 0, 0, 0))(p, b, x, y)
        finally:
            self.model.train(was_training)
        flat_g = torch.cat([grads[n].reshape(R, -1) for n in self.p_names], dim=1)
        flat_b = (torch.cat([bufs[n].reshape(R, -1) for n in self.b_names], dim=1)
                  if self.b_names else None)
        return flat_g, losses.detach(), flat_b
