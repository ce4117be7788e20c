"""Image classification tasks: CIFAR-10 with ResNet-18 (``cifar10``) and a
synthetic CPU-sized task (``tiny_image``) with a small CNN.

Both follow :mod:`regtopk_fl.tasks.base`: a flat parameter vector [J], the
BatchNorm running statistics as flat buffers [B], and a stateless
``gradients``: the minibatch of worker n at round t (from 1), local step s is
a pure function of (seed, n, t, s). Worker n walks through per-epoch
permutations of its own partition; with g = (t - 1) * local_steps + s the
global step, its batch is slice ``g % steps_per_epoch`` of the permutation of
epoch ``g // steps_per_epoch``, that permutation drawn from a
``torch.Generator`` seeded by (seed, n, epoch). ``steps_per_epoch`` is
``len(partition) // batch_size`` (the last incomplete batch of an epoch is
dropped; a partition smaller than a batch is one batch). The optional
augmentation (random crop with zero padding + horizontal flip) is seeded by
(seed, n, g) the same way.

The switches of the authors' Fig. 3 code (``ResNet18-CIFAR10.py``), off by
default (every default leaves a run bitwise as before):

* ``resize``: inputs are resized to ``resize`` x ``resize`` (bilinear) after
  the augmentation and before the normalisation, for training and test
  batches alike (the authors: 224);
* ``normalize``: ``cifar`` (CIFAR-10's channel mean/std), ``imagenet``
  (torchvision's ImageNet mean/std, what pretrained weights expect) or
  ``none``; ``auto`` = imagenet with pretrained weights, else the task's own
  (cifar10: cifar, tiny_image: none);
* ``loss``: ``ce`` (cross-entropy of the logits) or ``softmax_ce``
  (cross-entropy of the softmax, i.e. a softmax applied twice, as the
  authors' code does); the test loss uses the same function;
* ``pretrained_weights`` (cifar10): a local torchvision ResNet-18 state_dict
  loaded over the seeded model, ``fc`` replaced (models.resnet18);
* ``eval_mode``: ``eval`` (the default: the global model's averaged BatchNorm
  statistics) or ``train`` (the authors' test: BatchNorm normalises each test
  batch by its own statistics, so the running statistics, averaged or not, are
  never read; ``eval_batch_size`` is then part of the measurement, the
  authors': 20).

Besides (issue #30): ``init_from`` starts the model from a file (a suite
run's ``model.pt`` or a state_dict of the same network, models.load_init)
instead of the seeded init; ``subset_offset`` (cifar10) skips the first n
training images of each class before ``subset_per_class`` takes its own, so
two runs can train on disjoint slices.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters

from .. import checks
from ..device import resolve_device
from ..paths import resolve_path
from ..reuse import BufferPool
from . import batched, graphed
from . import data as D
from .base import Task
from .models import (STEMS, buffer_tensors, check_pretrained, flat_buffers, flat_params,
                     load_init, read_state_dict, resnet18, tiny_cnn)

_TENSORS: dict = {}  # process-level: (data key, device) -> tensors on that device


def _seed_int(*words) -> int:
    """A 63-bit generator seed from non-negative integer words."""
    ss = np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF


_PERM, _AUG = 0x5045524D, 0x41554721  # stream tags ("PERM", "AUG!")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's
LOSSES = ("ce", "softmax_ce")
EVAL_MODES = ("eval", "train")
NORMALIZATIONS = ("auto", "cifar", "imagenet", "none")


def softmax_ce(logits, y, reduction="mean"):
    """The authors' loss: cross-entropy applied to softmax probabilities."""
    return F.cross_entropy(torch.softmax(logits, dim=1), y, reduction=reduction)


LOSS_FUNCTIONS = {"ce": F.cross_entropy, "softmax_ce": softmax_ce}


def normalization(normalize: str, own):
    """(mean, std) or None for a ``normalize`` setting; ``own`` is the task's
    default ((mean, std) or None), which ``auto`` keeps."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"task.normalize={normalize!r}: one of {', '.join(NORMALIZATIONS)}")
    return {"auto": own, "cifar": (D.CIFAR10_MEAN, D.CIFAR10_STD),
            "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": None}[normalize]


class _ImageTask(Task):
    """The shared machinery; subclasses set up data, model and partitions
    through :meth:`_setup`."""

    dtype = torch.float32
    has_closed_form = False
    num_classes = 10
    pretrained = False  # task.pretrained_weights: has a torchvision ResNet-18 to load into

    # -- the settings (tasks/base.py's contract) ------------------------------------------
    @classmethod
    def check_settings(cls, cfg, num_workers, runtime):
        """The image tasks' shared keys, then the Fig. 3 switches."""
        super().check_settings(cfg, num_workers, runtime)
        checks.num(cfg, "task.batch_size", 1, integer=True, allowed="must be an integer >= 1")
        if checks.get(cfg, "task.batched") is not None:
            checks.choice(cfg, "task.batched", batched.MODES)
        checks.choice(cfg, "task.partition", D.PARTITION_SCHEMES)
        if checks.get(cfg, "task.partition") == "dirichlet":
            checks.num(cfg, "task.alpha", 0, lo_open=True, allowed="must be a finite number > 0")
        if checks.get(cfg, "task.partition") == "unequal":
            checks.num(cfg, "task.size_ratio", 1, allowed="must be >= 1")
        cls._check_fig3_switches(cfg)

    @classmethod
    def _check_fig3_switches(cls, cfg) -> None:
        """The authors' Fig. 3 switches (the module doc)."""
        if checks.get(cfg, "task.eval_mode") is not None:
            checks.choice(cfg, "task.eval_mode", EVAL_MODES)
        cls._check_init_from(cfg)
        if checks.get(cfg, "task.resize") is not None:
            checks.num(cfg, "task.resize", 8, integer=True,
                       allowed="must be null or an integer >= 8")
        if checks.get(cfg, "task.normalize") is not None:
            checks.choice(cfg, "task.normalize", NORMALIZATIONS)
        if checks.get(cfg, "task.loss") is not None:
            checks.choice(cfg, "task.loss", LOSSES)
        path = checks.get(cfg, "task.pretrained_weights")
        if path == "required":  # a preset's placeholder (??? would not override the group's null)
            checks.fail("task.pretrained_weights", path, "this preset needs the path of a local "
                        "torchvision ResNet-18 state_dict (or null: train from scratch, and say "
                        "so)")
        if path is None:
            return
        if not cls.pretrained:
            checks.fail("task.pretrained_weights", path,
                        "only task=cifar10 has a ResNet-18 to load into")
        if not isinstance(path, str) or not os.path.isfile(resolve_path(path)):
            checks.fail("task.pretrained_weights", path, "is not a file (a torchvision "
                        "ResNet-18 state_dict saved with torch.save; nothing is downloaded)")
        if checks.get(cfg, "task.stem") != "imagenet" or checks.get(cfg, "task.width") != 64:
            checks.fail("task.pretrained_weights", path, "needs torchvision's ResNet-18: "
                        "task.stem=imagenet and task.width=64")
        try:
            check_pretrained(resnet18(10, "imagenet", 0), read_state_dict(resolve_path(path)))
        except ValueError as exc:
            checks.fail("task.pretrained_weights", path, str(exc).split(": ", 1)[-1])

    @classmethod
    def _check_init_from(cls, cfg) -> None:
        """task.init_from: a file whose model fits this run's network exactly
        (models.load_init), checked on a model built as the task builds it."""
        path = checks.get(cfg, "task.init_from")
        if path is None:
            return
        if not isinstance(path, str) or not os.path.isfile(resolve_path(path)):
            checks.fail("task.init_from", path, "is not a file (a run's model.pt, or a "
                        "state_dict of this network saved with torch.save)")
        model = cls._init_model(cfg, path)
        if model is None:
            return
        try:
            load_init(model, resolve_path(path))
        except ValueError as exc:
            checks.fail("task.init_from", path, str(exc).split(": ", 1)[-1])

    @classmethod
    def _init_model(cls, cfg, path):
        """The network as this config builds it, seeded arbitrarily (None: the
        config's own error about the network comes from the task)."""
        size = checks.get(cfg, "task.resize") or checks.get(cfg, "task.image_size", 8)
        return tiny_cnn(3, 10, checks.get(cfg, "task.width", 16), size, 0)

    def _setup(self, x_train, y_train, x_test, y_test, model, *, num_workers, seed,
               batch_size, local_steps, partition, alpha, size_ratio, min_partition_size,
               augment, eval_batch_size, device, mean=None, std=None, resize=None,
               loss="ce", batched_mode="auto", init_from=None, eval_mode="eval",
               partition_cache=None):
        """x_*: uint8 or float tensors [N, C, H, W] already on ``device``; y_*: int64.
        ``batched_mode``: the ``batched`` setting (auto | true | false; tasks/batched.py);
        ``init_from``: a file the model starts from (models.load_init)."""
        if loss not in LOSS_FUNCTIONS:
            raise ValueError(f"task.loss={loss!r}: one of {', '.join(LOSSES)}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"task.eval_mode={eval_mode!r}: one of {', '.join(EVAL_MODES)}")
        self.eval_mode = eval_mode
        self.init_from = init_from
        if init_from is not None:
            load_init(model, init_from)
        if batched_mode not in batched.MODES:
            raise ValueError(f"batched={batched_mode!r}: must be auto, true, false or graph")
        self.loss_name, self._loss = loss, LOSS_FUNCTIONS[loss]
        self.resize = None if resize is None else int(resize)
        self.batched = batched_mode
        self._batched_fn = None
        self._graphed_fn = None
        self._grads_pool = BufferPool(2)  # the loop's [R, J] gradients, round after round
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.local_steps = int(local_steps)
        self.augment = bool(augment)
        self.eval_batch_size = int(eval_batch_size)
        self.device = device
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        if mean is not None:
            self._mean = torch.tensor(mean, dtype=self.dtype, device=device).view(1, -1, 1, 1)
            self._std = torch.tensor(std, dtype=self.dtype, device=device).view(1, -1, 1, 1)
        else:
            self._mean = self._std = None
        parts = D.partition_indices(y_train.cpu().numpy(), self.num_workers, partition,
                                    seed=self.seed, alpha=alpha,
                                    min_partition_size=min_partition_size,
                                    size_ratio=size_ratio, cache_dir=partition_cache)
        self.partitions = [torch.from_numpy(p) for p in parts]
        self.partition_scheme = partition
        self.model = model.to(device=device, dtype=self.dtype)
        self._params = list(self.model.parameters())
        self._buffers = buffer_tensors(self.model)
        self._init_params = flat_params(self.model)
        self._init_buffers = flat_buffers(self.model)
        self.dim = self._init_params.numel()
        self.num_buffers = 0 if self._init_buffers is None else self._init_buffers.numel()
        self._perm_cache: dict = {}

    # -- the Task interface ---------------------------------------------------------
    def num_examples(self) -> list:
        return [len(p) for p in self.partitions]

    def init_params(self) -> torch.Tensor:
        return self._init_params.clone()

    def init_buffers(self):
        return None if self._init_buffers is None else self._init_buffers.clone()

    def gradients(self, params, buffers, workers, round, step):
        if not 0 <= int(step) < self.local_steps:
            raise ValueError(
                f"step {step} outside 0..{self.local_steps - 1}: this task was built with "
                f"local_steps={self.local_steps}, which fixes the batch schedule")
        workers = [int(n) for n in workers]
        R = len(workers)
        if params.dim() == 1:
            params = params.unsqueeze(0).expand(R, -1)
        # every batch first: a blocking host-to-device copy of the indices then
        # never waits for a worker's backward pass (CUDA)
        batches = [self.batch(n, round, step) for n in workers]
        path = batched.path_for(self.batched, self.device, R)
        if path == "graph":
            if self._graphed_fn is None:
                self._graphed_fn = graphed.GraphedGradients(self)
            if self._graphed_fn.failed is None:  # else: the loop (logged once)
                try:
                    grads, losses, bufs_out = self._graphed_fn(params, buffers, batches)
                    return grads, losses.tolist(), bufs_out
                except graphed.CaptureError:
                    pass
        if path == "vmap" and len({tuple(x.shape) for x, _ in batches}) == 1:  # else unequal
            return self._batched_gradients(params, buffers, batches)
        grads = self._grads_pool.take((R, self.dim), self.dtype, self.device)  # reuse.py
        bufs_out = (torch.empty(R, self.num_buffers, dtype=self.dtype, device=self.device)
                    if self.num_buffers else None)
        losses = []
        model = self.model
        model.train()
        for r, (x, y) in enumerate(batches):
            b = None if buffers is None else (buffers if buffers.dim() == 1 else buffers[r])
            self._load(params[r], b)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = self.loss(model(x), y)
                loss.backward()
            torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                       for p in self._params], out=grads[r])
            if bufs_out is not None:
                torch.cat([t.reshape(-1) for t in self._buffers], out=bufs_out[r])
            losses.append(loss.detach())
        model.zero_grad(set_to_none=True)
        return grads, torch.stack(losses).tolist(), bufs_out  # one host sync, not one per worker

    def loss(self, logits, y):
        """The training loss of one worker's batch (both gradient paths):
        ``task.loss`` (ce, or the authors' softmax_ce)."""
        return self._loss(logits, y)

    def _batched_gradients(self, params, buffers, batches):
        """All rows in one pass (tasks/batched.py); same results as the loop
        within float rounding."""
        R = len(batches)
        if self._batched_fn is None:
            self._batched_fn = batched.BatchedGradients(self.model)
        # the engine's local_steps=1 rows are one model expanded: compute on it once
        shared = params[0] if params.dim() == 2 and params.stride(0) == 0 else params
        shared = shared.to(device=self.device, dtype=self.dtype)
        bufs = None
        if self.num_buffers:
            src = self._init_buffers if buffers is None else buffers
            src = src.to(device=self.device, dtype=self.dtype)
            bufs = src.unsqueeze(0).expand(R, -1) if src.dim() == 1 else src
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        grads, losses, bufs_out = self._batched_fn(shared, bufs, x, y, self.loss)
        return grads, losses.tolist(), bufs_out

    @torch.no_grad()
    def evaluate(self, params, buffers) -> dict:
        """Test accuracy (%) and mean test loss (the training loss function) of
        the model in eval mode (``eval_mode=train``: in train mode, each test
        batch normalised by its own statistics, as the authors' code tests).
        ``buffers=None`` evaluates with the initial BatchNorm statistics."""
        self._load(params, buffers)
        self.model.train(self.eval_mode == "train")
        n = self.y_test.numel()
        correct, total = 0, 0.0
        for i in range(0, n, self.eval_batch_size):
            x = self._prepare(self.x_test[i:i + self.eval_batch_size])
            y = self.y_test[i:i + self.eval_batch_size]
            logits = self.model(x)
            total += float(self._loss(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return {"accuracy": 100.0 * correct / max(n, 1), "test_loss": total / max(n, 1)}

    # -- batches --------------------------------------------------------------------------
    def steps_per_epoch(self, worker: int) -> int:
        m = len(self.partitions[worker])
        return max(1, m // min(self.batch_size, m))

    def _perm(self, worker: int, epoch: int) -> torch.Tensor:
        key = (worker, epoch)
        p = self._perm_cache.get(key)
        if p is None:
            if len(self._perm_cache) > 4 * self.num_workers:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(_seed_int(self.seed, _PERM, worker, epoch))
            p = torch.randperm(len(self.partitions[worker]), generator=g)
            self._perm_cache[key] = p
        return p

    def batch_indices(self, worker: int, round: int, step: int) -> torch.Tensor:
        """Training-set indices of worker ``worker``'s minibatch at (round, step)."""
        part = self.partitions[worker]
        bsz = min(self.batch_size, len(part))
        g = (int(round) - 1) * self.local_steps + int(step)
        epoch, pos = divmod(g, self.steps_per_epoch(worker))
        return part[self._perm(worker, epoch)[pos * bsz:(pos + 1) * bsz]]

    def batch(self, worker: int, round: int, step: int):
        """(inputs, labels) on the task's device, augmented and normalised."""
        idx = self.batch_indices(worker, round, step).to(self.device)
        x, y = self.x_train[idx], self.y_train[idx]
        if self.augment:
            g = (int(round) - 1) * self.local_steps + int(step)
            x = self._augment(x, _seed_int(self.seed, _AUG, worker, g))
        return self._prepare(x), y

    def _augment(self, x, seed):
        """Random crop (zero padding of H/8 pixels) and horizontal flip."""
        b, _, h, w = x.shape
        pad = max(1, h // 8)
        gen = torch.Generator().manual_seed(seed)
        off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
        flip = (torch.rand(b, generator=gen) < 0.5).tolist()
        xp = F.pad(x, (pad, pad, pad, pad))
        out = torch.stack([xp[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off)])
        if any(flip):
            fl = torch.tensor(flip, device=x.device)
            out[fl] = out[fl].flip(-1)
        return out

    def _prepare(self, x):
        x = x.contiguous()
        if x.dtype == torch.uint8:
            x = x.to(self.dtype).div_(255.0)
        if self.resize is not None and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                              align_corners=False, antialias=True)
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return x

    # -- flat vectors <-> model -------------------------------------------------------------
    def _load(self, params, buffers):
        """Point the model's parameters at ``params`` (no copy; nothing
        writes into them) and copy ``buffers`` into the BatchNorm statistics
        (train-mode BatchNorm updates those in place)."""
        vec = params.detach().to(device=self.device, dtype=self.dtype)
        vector_to_parameters(vec, self._params)
        if self.num_buffers:
            src = self._init_buffers if buffers is None else buffers
            src = src.detach().to(device=self.device, dtype=self.dtype)
            off = 0
            for t in self._buffers:
                k = t.numel()
                t.copy_(src[off:off + k].view_as(t))
                off += k


class ImageTask(_ImageTask):
    """CIFAR-10 with ResNet-18 (``stem``: cifar | imagenet), from the offline
    archive by default (see :func:`regtopk_fl.tasks.data.load_cifar10`)."""

    name = "cifar10"
    pretrained = True

    @classmethod
    def check_settings(cls, cfg, num_workers, runtime):
        super().check_settings(cfg, num_workers, runtime)
        n = num_workers
        checks.choice(cfg, "task.stem", STEMS)
        cls._check_source(cfg)
        off = checks.num(cfg, "task.subset_offset", 0, 4999, integer=True, required=False,
                         allowed="must be an integer in [0, 4999] (images per class skipped)")
        sub = checks.get(cfg, "task.subset_per_class")
        if sub is not None:
            checks.num(cfg, "task.subset_per_class", 1, integer=True,
                       allowed="must be an integer >= 1")
            if off and off + sub > 5000:
                checks.fail("task.subset_per_class", sub, f"with task.subset_offset={off} it "
                            f"must be <= {5000 - off} (5,000 training images per class)")
            if n > 10 * sub:
                checks.fail("num_workers", n, f"more workers than data points ({10 * sub})")
        elif n > 50000:
            checks.fail("num_workers", n, "more workers than data points (50000)")

    @classmethod
    def _check_source(cls, cfg) -> None:
        """task.data_path exists, or task.download can fetch CIFAR-10: ``true``
        always tries; ``auto`` (the default) needs torchvision's copy in
        task.cache_dir or a reachable host; ``false`` needs the path."""
        path = checks.get(cfg, "task.data_path")
        try:
            download = D.download_mode(checks.get(cfg, "task.download", False))
        except ValueError:
            checks.fail("task.download", checks.get(cfg, "task.download"),
                        "must be one of true, false, auto")
        if download is True or (path is not None and os.path.exists(resolve_path(path))):
            return
        where = "point it at cifar10-jpeg.tar.gz or a torchvision CIFAR-10 folder"
        if download is False:
            checks.fail("task.data_path", path, f"does not exist ({where}, or go online with "
                        "task.download=auto or true to fetch it with torchvision)")
        root = D.auto_root(checks.get(cfg, "task.cache_dir"))
        if (root / "cifar-10-batches-py").is_dir():
            return  # fetched there before (torchvision checks the files)
        blocker = D.download_blocker()
        if blocker is not None:
            checks.fail("task.data_path", path, f"does not exist, and task.download=auto "
                        f"cannot fetch CIFAR-10 offline ({blocker}): {where}, or go online to "
                        f"let task.download=auto fetch it with torchvision into {root}")

    @classmethod
    def _init_model(cls, cfg, path):
        if checks.get(cfg, "task.pretrained_weights") is not None:
            checks.fail("task.init_from", path, "set task.init_from or "
                        "task.pretrained_weights, not both")
        stem, width = checks.get(cfg, "task.stem"), checks.get(cfg, "task.width")
        if int(width) != 64 and stem != "cifar":
            return None  # task.width's own error comes from the task
        return resnet18(10, stem, 0, width)

    def __init__(self, num_workers: int = 10, seed: int = 0, batch_size: int = 20,
                 local_steps: int = 1, partition: str = "iid", alpha: float = 0.5,
                 size_ratio: float = 5.0, min_partition_size: int = 10,
                 data_path: str | None = None, cache_dir: str | None = None,
                 subset_per_class: int | None = None, test_subset: int | None = None,
                 stem: str = "cifar", augment: bool = False, eval_batch_size: int = 500,
                 device: str = "cpu", download: bool = False, name: str | None = None,
                 width: int = 64, pretrained_weights: str | None = None,
                 resize: int | None = None, loss: str = "ce", normalize: str = "auto",
                 batched="auto", init_from: str | None = None, eval_mode: str = "eval",
                 subset_offset: int = 0):
        dev = torch.device(resolve_device(device))  # name: the config's task name, not used
        norm = normalization(normalize, (IMAGENET_MEAN, IMAGENET_STD) if pretrained_weights
                             else (D.CIFAR10_MEAN, D.CIFAR10_STD))
        arrs = D.load_cifar10(data_path, cache_dir, subset_per_class, test_subset, download,
                              subset_offset=subset_offset)
        key = (id(arrs), str(dev))
        if key not in _TENSORS or _TENSORS[key][0] is not arrs:
            def t(x):  # uint8 HWC numpy -> uint8 [N, C, H, W] on the device (on the CPU a
                # view of the cached array: no second copy; batches are made contiguous)
                return torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)

            _TENSORS[key] = (arrs, t(arrs.x_train), torch.from_numpy(arrs.y_train).to(dev),
                             t(arrs.x_test), torch.from_numpy(arrs.y_test).to(dev))
        _, xtr, ytr, xte, yte = _TENSORS[key]
        self.stem = stem
        self.source = arrs.source
        self.pretrained_weights = pretrained_weights
        self._setup(xtr, ytr, xte, yte, resnet18(10, stem, seed, width, pretrained_weights),
                    num_workers=num_workers, seed=seed, batch_size=batch_size,
                    local_steps=local_steps, partition=partition, alpha=alpha,
                    size_ratio=size_ratio, min_partition_size=min_partition_size,
                    augment=augment, eval_batch_size=eval_batch_size, device=dev,
                    mean=norm and norm[0], std=norm and norm[1], resize=resize, loss=loss,
                    batched_mode=batched, init_from=init_from, eval_mode=eval_mode,
                    partition_cache=cache_dir if cache_dir is not None else D.DEFAULT_CACHE_DIR)


def make_tiny_images(num_train: int = 2000, num_test: int = 500, image_size: int = 8,
                     num_classes: int = 10, noise: float = 1.0, seed: int = 0):
    """Synthetic 3-channel images: a smooth random pattern per class (4x4
    noise upsampled to ``image_size``), scaled by a random contrast in
    [0.5, 1.5], shifted by up to one pixel, plus Gaussian pixel noise of std
    ``noise``. Labels are balanced and interleaved (0, 1, ..., C-1, 0, ...).
    Returns float32 x_train [N, 3, S, S], y_train, x_test, y_test."""
    g = torch.Generator().manual_seed(_seed_int(seed, 0x54494E59))
    protos = torch.randn(num_classes, 3, 4, 4, generator=g)
    protos = F.interpolate(protos, size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) \
        / protos.std(dim=(1, 2, 3), keepdim=True)

    def make(n):
        y = torch.arange(n) % num_classes
        contrast = torch.rand(n, 1, 1, 1, generator=g) + 0.5
        x = protos[y] * contrast
        shifts = torch.randint(-1, 2, (n, 2), generator=g).tolist()
        x = torch.stack([torch.roll(x[i], shifts=(sy, sx), dims=(1, 2))
                         for i, (sy, sx) in enumerate(shifts)])
        x = x + noise * torch.randn(x.shape, generator=g)
        return x.float().contiguous(), y.long()

    xtr, ytr = make(num_train)
    xte, yte = make(num_test)
    return xtr, ytr, xte, yte


class TinyImageTask(_ImageTask):
    """Synthetic 10-class images (made in-process from the seed) and a small
    CNN with one BatchNorm: a CPU-sized stand-in for CIFAR-10 that trains in
    seconds. ``samples``: training-set size (balanced over 10 classes);
    ``num_test`` (or ``test_subset``): test-set size; ``noise``: pixel noise
    std (1.0: ~95 % test accuracy after 50 dense rounds; 2.0 is harder). The
    CIFAR-only options (data_path, cache_dir, stem, ...) and the config's
    ``name`` are accepted and ignored so one config can switch tasks."""

    name = "tiny_image"

    @classmethod
    def check_settings(cls, cfg, num_workers, runtime):
        super().check_settings(cfg, num_workers, runtime)
        per = checks.num(cfg, "task.samples", 1, integer=True, allowed="must be an integer >= 1")
        if num_workers > per:
            checks.fail("num_workers", num_workers, f"more workers than data points ({per})")

    def __init__(self, num_workers: int = 4, seed: int = 0, batch_size: int = 20,
                 local_steps: int = 1, partition: str = "iid", alpha: float = 0.5,
                 size_ratio: float = 5.0, min_partition_size: int = 10,
                 augment: bool = False, eval_batch_size: int = 500, device: str = "cpu",
                 samples: int = 2000, num_test: int = 500, image_size: int = 8,
                 noise: float = 1.0, width: int = 16, data_seed: int | None = None,
                 data_path=None, cache_dir=None, subset_per_class=None, test_subset=None,
                 stem=None, download=False, name: str | None = None,
                 resize: int | None = None, loss: str = "ce", normalize: str = "auto",
                 batched="auto", init_from: str | None = None, eval_mode: str = "eval",
                 subset_offset=None):
        dev = torch.device(resolve_device(device))
        norm = normalization(normalize, None)
        if test_subset is not None:
            num_test = int(test_subset)
        ds = seed if data_seed is None else data_seed
        key = ("tiny", int(ds), int(samples), int(num_test), int(image_size), float(noise),
               str(dev))
        if key not in _TENSORS:
            _TENSORS[key] = tuple(t.to(dev) for t in make_tiny_images(
                samples, num_test, image_size, 10, noise, ds))
        xtr, ytr, xte, yte = _TENSORS[key]
        seen = image_size if resize is None else int(resize)  # the CNN's input size
        self._setup(xtr, ytr, xte, yte, tiny_cnn(3, 10, width, seen, seed),
                    num_workers=num_workers, seed=seed, batch_size=batch_size,
                    local_steps=local_steps, partition=partition, alpha=alpha,
                    size_ratio=size_ratio, min_partition_size=min_partition_size,
                    augment=augment, eval_batch_size=eval_batch_size, device=dev,
                    mean=norm and norm[0], std=norm and norm[1], resize=resize, loss=loss,
                    batched_mode=batched, init_from=init_from, eval_mode=eval_mode)
