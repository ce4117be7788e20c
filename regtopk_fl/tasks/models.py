"""Models of the image tasks, built with a deterministic seeded init.

* ``resnet18(stem="cifar")``: torchvision's ResNet-18 with the CIFAR stem
  (3x3 conv, stride 1, no max-pool); 11,173,962 parameters for 10 classes;
* ``resnet18(stem="imagenet")``: torchvision's ResNet-18 unchanged (7x7 conv,
  stride 2, max-pool); 11,181,642 parameters for 10 classes;
* ``TinyCNN``: two convolutions, one BatchNorm, a linear head (5,354
  parameters for 3 x 8 x 8 inputs, width 16 and 10 classes) for the
  CPU-sized ``tiny_image``.

Pretrained weights are never downloaded: ``resnet18(pretrained=PATH)`` (the
``task.pretrained_weights`` setting) loads a torchvision ResNet-18
``state_dict`` from a local file (e.g. torchvision's ``resnet18-f37072fd.pth``,
what ``ResNet18_Weights.IMAGENET1K_V1`` downloads) into torchvision's
ResNet-18 (``stem="imagenet"``, width 64) and keeps the model's own seeded
``fc`` for the 10 classes: the authors' ``ResNet18_cifar`` replaces ``fc``
the same way. The flat views used by
the tasks: ``flat_params`` / ``param_shapes`` in ``model.parameters()`` order,
``buffer_tensors`` = the float BatchNorm running statistics (running_mean,
running_var) in ``model.named_buffers()`` order; ``num_batches_tracked`` is
left out (an integer counter, unused when BatchNorm has a momentum).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

REPLACED = ("fc.weight", "fc.bias")  # the head a pretrained ResNet-18 gets anew


def _seeded(seed: int, build):
    """Run ``build()`` with the global torch RNG seeded, leaving the caller's
    RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


class _BasicBlock(nn.Module):
    """ResNet-18's residual block: 3x3 convolution, BatchNorm, ReLU, 3x3
    convolution, BatchNorm, plus the shortcut (``downsample`` or the input),
    ReLU. Its modules have torchvision's names and are made in torchvision's
    order, so the state_dict and the seeded init are torchvision's
    (tests/test_startup.py checks the network against one built from
    torchvision's block, bit for bit). Here so that the narrow network needs
    no torchvision, whose import loads torch._dynamo (torchvision.ops):
    about 1.2 s of a process's start (#34)."""

    def __init__(self, inp: int, out: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += x if self.downsample is None else self.downsample(x)
        return self.relu(y)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=1, stride=stride, bias=False)


def _narrow_resnet18(num_classes: int, width: int) -> nn.Module:
    """ResNet-18 (CIFAR stem) with base width ``width`` instead of 64: the same
    18-layer topology, every channel count scaled by width/64 (the CPU preset)."""
    block, conv1x1 = _BasicBlock, _conv1x1

    def layer(inp, out, stride):
        down = None
        if stride != 1 or inp != out:
            down = nn.Sequential(conv1x1(inp, out, stride), nn.BatchNorm2d(out))
        return nn.Sequential(block(inp, out, stride, down), block(out, out))

    w = int(width)
    m = nn.Sequential()
    m.conv1 = nn.Conv2d(3, w, kernel_size=3, stride=1, padding=1, bias=False)
    m.bn1, m.relu = nn.BatchNorm2d(w), nn.ReLU(inplace=True)
    m.layer1, m.layer2 = layer(w, w, 1), layer(w, 2 * w, 2)
    m.layer3, m.layer4 = layer(2 * w, 4 * w, 2), layer(4 * w, 8 * w, 2)
    m.avgpool, m.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
    m.fc = nn.Linear(8 * w, num_classes)
    for mod in m.modules():  # torchvision's ResNet init
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.constant_(mod.weight, 1)
            nn.init.constant_(mod.bias, 0)
    return m


STEMS = ("cifar", "imagenet")


def read_state_dict(path) -> dict:
    """The tensors of a ``state_dict`` file (or of its ``"state_dict"`` entry);
    ValueError naming the file when it holds something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
        raise ValueError(f"{path}: not a torch state_dict file ({type(e).__name__})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return dict(state)


def check_pretrained(model: nn.Module, state: dict, path="the state_dict") -> None:
    """ValueError unless ``state`` fills every entry of ``model`` but ``fc``
    with a tensor of the same shape (a torchvision ResNet-18 state_dict)."""
    own = model.state_dict()
    body = {k: v for k, v in state.items() if k not in REPLACED}
    missing = sorted(set(own) - set(body) - set(REPLACED))
    unexpected = sorted(set(body) - set(own))
    shapes = sorted(k for k in set(body) & set(own) if body[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        what = [f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("other shape", shapes)) if keys]
        raise ValueError(f"{path}: not a torchvision ResNet-18 state_dict ({'; '.join(what)})")


def load_pretrained(model: nn.Module, path) -> nn.Module:
    """Load a torchvision ResNet-18 ``state_dict`` file into ``model`` in place,
    every parameter and BatchNorm buffer but ``fc``, which keeps its own init."""
    state = read_state_dict(path)
    check_pretrained(model, state, path)
    model.load_state_dict({k: v for k, v in state.items() if k not in REPLACED}, strict=False)
    return model


def load_init(model: nn.Module, path) -> nn.Module:
    """Start ``model`` from a file (``task.init_from``), in place: a suite run's
    ``model.pt`` (``{"params": [J], "buffers": [B] | None}``, the flat vectors in
    the model's own order), or a ``state_dict`` of this very architecture (every
    parameter and float buffer, same names and shapes; ``fc`` included, unlike
    ``pretrained_weights``). ValueError naming the file and what does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
        raise ValueError(f"{path}: not a torch file ({type(e).__name__})") from None
    params = list(model.parameters())
    bufs = buffer_tensors(model)
    if isinstance(state, Mapping) and "params" in state and "buffers" in state:  # model.pt
        flat, fbuf = state["params"], state["buffers"]
        dim, nbuf = sum(p.numel() for p in params), sum(b.numel() for b in bufs)
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.numel() != dim:
            got = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
            raise ValueError(f"{path}: its params have shape {got}, this model has [{dim}] "
                             "(another network or width)")
        if (fbuf is None) != (nbuf == 0) or (fbuf is not None and (
                not isinstance(fbuf, torch.Tensor) or fbuf.numel() != nbuf)):
            got = None if fbuf is None else getattr(fbuf, "shape", type(fbuf).__name__)
            raise ValueError(f"{path}: its buffers have shape {got}, this model has [{nbuf}]")
        with torch.no_grad():
            vector_to_parameters(flat.to(params[0].dtype), params)
            off = 0
            for b in bufs:
                b.copy_(fbuf[off:off + b.numel()].view_as(b))
                off += b.numel()
        return model
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ValueError(f"{path}: neither a model.pt of this suite nor a state_dict")
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        what = [f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("other shape", shapes)) if keys]
        raise ValueError(f"{path}: does not fit this model ({'; '.join(what)})")
    model.load_state_dict(state, strict=False)
    return model


def resnet18(num_classes: int = 10, stem: str = "cifar", seed: int = 0, width: int = 64,
             pretrained=None) -> nn.Module:
    """ResNet-18 with a seeded init; ``pretrained``: a local torchvision
    state_dict file loaded over it (all but ``fc``; needs stem=imagenet, width 64)."""
    if pretrained is not None:
        if stem != "imagenet" or int(width) != 64:
            raise ValueError(f"pretrained weights need torchvision's ResNet-18: stem=imagenet "
                             f"and width=64 (got stem={stem}, width={width})")
        return load_pretrained(resnet18(num_classes, stem, seed, width), pretrained)
    if int(width) != 64:
        if stem != "cifar":
            raise ValueError(f"task.width={width}: a narrowed ResNet-18 needs stem=cifar")
        return _seeded(seed, lambda: _narrow_resnet18(num_classes, width))

    def build():
        import torchvision  # width 64: torchvision's own network

        m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if stem == "cifar":
            m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # torchvision's init for its convolutions
            nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
            m.maxpool = nn.Identity()
        elif stem != "imagenet":
            raise ValueError(f"unknown ResNet stem {stem!r} ({' | '.join(STEMS)})")
        return m

    return _seeded(seed, build)


class TinyCNN(nn.Module):
    """conv3x3(c->w) - BN - ReLU - maxpool2 - conv3x3(w->w) - ReLU - flatten -
    linear(w * (S/2)^2 -> classes), for S x S inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                 image_size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width * (image_size // 2) ** 2, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def tiny_cnn(in_channels: int = 3, num_classes: int = 10, width: int = 16,
             image_size: int = 8, seed: int = 0) -> nn.Module:
    return _seeded(seed, lambda: TinyCNN(in_channels, num_classes, width, image_size))


def build_model(name: str, num_classes: int = 10, seed: int = 0, **kw) -> nn.Module:
    if name == "resnet18":
        return resnet18(num_classes, kw.get("stem", "cifar"), seed, kw.get("width", 64))
    if name == "tiny_cnn":
        return tiny_cnn(kw.get("in_channels", 3), num_classes, kw.get("width", 16),
                        kw.get("image_size", 8), seed)
    raise ValueError(f"unknown model {name!r}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def buffer_tensors(model: nn.Module) -> list:
    """The float buffers (BatchNorm running mean/var) in a fixed order."""
    return [b for name, b in model.named_buffers()
            if b.is_floating_point() and not name.endswith("num_batches_tracked")]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def flat_buffers(model: nn.Module):
    bufs = buffer_tensors(model)
    if not bufs:
        return None
    return torch.cat([b.detach().reshape(-1) for b in bufs]).clone()
