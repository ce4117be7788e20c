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

Which path runs where is the task's ``batched`` setting (tasks/images.py):
``auto`` (the default) runs this on CUDA when more than one worker's gradient
is asked for (the in-process engine on a GPU) and the per-worker loop on the
CPU and for a single worker (a Flower client); ``true`` runs this wherever
R > 1 (the CPU tests); ``false`` always the loop. The two agree within float
rounding, not bitwise (other kernels: README "Which equalities are bitwise").
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

MODES = ("auto", True, False)


def uses_batched(mode, device, rows: int) -> bool:
    """Whether ``rows`` workers' gradients go through :class:`BatchedGradients`."""
    if rows < 2 or mode is False:
        return False
    if mode is True:
        return True
    return torch.device(device).type == "cuda"


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
