"""Models of the image tasks, built with a deterministic seeded init.

* ``resnet18(stem="cifar")``: torchvision's ResNet-18 with the CIFAR stem
  (3x3 conv, stride 1, no max-pool); 11,173,962 parameters for 10 classes;
* ``resnet18(stem="imagenet")``: torchvision's ResNet-18 unchanged (7x7 conv,
  stride 2, max-pool); 11,181,642 parameters for 10 classes;
* ``TinyCNN``: two convolutions, one BatchNorm, a linear head (5,354
  parameters for 3 x 8 x 8 inputs, width 16 and 10 classes) for the
  CPU-sized ``tiny_image``.

No pretrained weights (they cannot be fetched here). The flat views used by
the tasks: ``flat_params`` / ``param_shapes`` in ``model.parameters()`` order,
``buffer_tensors`` = the float BatchNorm running statistics (running_mean,
running_var) in ``model.named_buffers()`` order; ``num_batches_tracked`` is
left out (an integer counter, unused when BatchNorm has a momentum).
"""
from __future__ import annotations

import torch
from torch import nn


def _seeded(seed: int, build):
    """Run ``build()`` with the global torch RNG seeded, leaving the caller's
    RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _narrow_resnet18(num_classes: int, width: int) -> nn.Module:
    """ResNet-18 (CIFAR stem) with base width ``width`` instead of 64: the same
    18-layer topology, every channel count scaled by width/64 (the CPU preset)."""
    from torchvision.models.resnet import BasicBlock, conv1x1

    def layer(inp, out, stride):
        down = None
        if stride != 1 or inp != out:
            down = nn.Sequential(conv1x1(inp, out, stride), nn.BatchNorm2d(out))
        return nn.Sequential(BasicBlock(inp, out, stride, down), BasicBlock(out, out))

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


def resnet18(num_classes: int = 10, stem: str = "cifar", seed: int = 0, width: int = 64) -> nn.Module:
    import torchvision

    if int(width) != 64:
        if stem != "cifar":
            raise ValueError(f"task.width={width}: a narrowed ResNet-18 needs stem=cifar")
        return _seeded(seed, lambda: _narrow_resnet18(num_classes, width))

    def build():
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
