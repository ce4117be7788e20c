"""The paper's two-worker toy (Fig. 1): logistic regression with J = 2, zero
bias, worker data (x1 = [100, 1], y = 1) and (x2 = [-100, 1], y = 1), loss
log(1 + exp(-<w, x>)), w0 = [0, 1]. Top-1 sends the first coordinate from
both workers; the two cancel, and the model never moves."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks
from .base import Task


class ToyTask(Task):
    name = "toy"
    dtype = torch.float64

    @classmethod
    def check_settings(cls, cfg, num_workers, runtime):
        super().check_settings(cfg, num_workers, runtime)
        if num_workers != 2:
            checks.fail("num_workers", num_workers, "the toy task (Fig. 1) has exactly 2 workers")

    def __init__(self, w0=(0.0, 1.0), x1=(100.0, 1.0), x2=(-100.0, 1.0), seed: int = 0, **_):
        self.x = torch.tensor([list(x1), list(x2)], dtype=torch.float64)
        self.dim, self.num_workers = 2, 2
        self._w0 = torch.tensor(list(w0), dtype=torch.float64)

    def num_examples(self):
        return [1, 1]

    def init_params(self):
        return self._w0.clone()

    def gradients(self, params, buffers, workers, round, step):
        x = self.x[list(workers)]
        margin = (params * x).sum(1)
        loss = F.softplus(-margin)  # log(1 + exp(-<w, x>)), y = 1
        grads = -x * torch.sigmoid(-margin)[:, None]
        return grads, loss.tolist(), None

    def evaluate(self, params, buffers=None):
        margin = self.x @ params
        return {"loss": float(F.softplus(-margin).mean())}
