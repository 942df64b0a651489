"""The networks of the studies: a VGG-style BN-CNN, a small pre-activation ResNet, and the
conv-weight shapes of a ResNet-18 (built here, no torchvision).

In the VGG net every conv feeds a BatchNorm directly, so each conv weight row is scale
invariant (a point of G(1, n)). In the pre-activation ResNet only the first conv of each
block feeds a BN directly; the second conv's output is added to the shortcut, which breaks
the invariance (``docs/design.md``, "Which weights are scale invariant") --
``rbn_geoopt.nn.to_grassmann`` decides which is which.

Example::

    >>> net = VGGNet((16, 32, 64, 64))
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGGNet", "PreActResNet", "build_model", "resnet18_conv_shapes", "MODELS"]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class VGGNet(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (max-pool after the 2nd and 3rd), global average pool,
    one linear classifier. ``widths = (16, 32, 64, 64)`` has 61k parameters."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), n_classes: int = 10) -> None:
        super().__init__()
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"VGGNet needs 4 positive widths, got {widths}")
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w1),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w3, w4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    """``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``, with a 1x1 conv shortcut when the shape
    changes (He et al. 2016, identity mappings)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """A small pre-activation ResNet: a 3x3 stem, one stage per width (stride 2 from the
    second on), ``blocks`` blocks per stage, BN-ReLU, global average pool, linear."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, n_classes: int = 10
    ) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths) or blocks < 1:
            raise ValueError(f"PreActResNet needs positive widths and blocks, got {widths}")
        self.stem = nn.Conv2d(1, widths[0], 3, padding=1, bias=False)
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(PreActBlock(c_in, width, stride))
                c_in = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.classifier = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        out = torch.relu(self.bn(out)).mean(dim=(2, 3))
        return self.classifier(out)


MODELS = {"vgg": VGGNet, "preact_resnet": PreActResNet}


def build_model(spec: dict, seed: int) -> nn.Module:
    """``spec = {"name": "vgg" | "preact_resnet", **kwargs}``, initialized from ``seed``."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](**spec)


def resnet18_conv_shapes(width: int = 64) -> list[tuple[int, int, int, int]]:
    """The 20 conv weight shapes of an ImageNet ResNet-18 (He et al. 2016), stem included.

    ``width = 64`` gives 11,166,912 parameters; a smaller width scales every layer.
    """
    shapes = [(width, 3, 7, 7)]
    c_in = width
    for stage in range(4):
        c_out = width * 2**stage
        for block in range(2):
            first = block == 0
            shapes.append((c_out, c_in if first else c_out, 3, 3))
            shapes.append((c_out, c_out, 3, 3))
            if first and stage > 0:
                shapes.append((c_out, c_in, 1, 1))
        c_in = c_out
    return shapes
