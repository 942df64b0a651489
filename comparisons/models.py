"""The networks of the studies: a VGG-style BN-CNN, a small pre-activation ResNet, an
ImageNet ResNet-18 and its conv-weight shapes (built here, no torchvision), and for the
study beyond BatchNorm (``--study gn``) the VGG net with GroupNorm and a tiny QK-norm
transformer.

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
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GNVGGNet",
    "MODELS",
    "PreActResNet",
    "QKNormViT",
    "ResNet18",
    "VGGNet",
    "build_model",
    "resnet18_conv_shapes",
]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class VGGNet(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (max-pool after the 2nd and 3rd), global average pool,
    one linear classifier. ``widths = (16, 32, 64, 64)`` has 61k parameters."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64), n_classes: int = 10) -> None:
        super().__init__()
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"{type(self).__name__} needs 4 positive widths, got {widths}")
        w1, w2, w3, w4 = (int(w) for w in widths)
        self.features = nn.Sequential(
            *self._conv_norm_relu(1, w1),
            *self._conv_norm_relu(w1, w2),
            nn.MaxPool2d(2),
            *self._conv_norm_relu(w2, w3),
            nn.MaxPool2d(2),
            *self._conv_norm_relu(w3, w4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w4, n_classes)

    def _conv_norm_relu(self, c_in: int, c_out: int) -> list[nn.Module]:
        return _conv_bn_relu(c_in, c_out)

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


def _conv_gn_relu(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    ]


class GNVGGNet(VGGNet):
    """:class:`VGGNet` with ``GroupNorm(groups, C)`` in place of every BatchNorm (convs
    without bias, same widths, pooling and classifier).

    GroupNorm normalises each sample over ``C / groups`` consecutive channels, so a conv
    weight is scale invariant in ``groups`` blocks of ``C / groups`` consecutive rows, each
    block jointly (``W.reshape(groups, -1)[k]`` times ``a_k > 0`` leaves the output
    unchanged; rows inside a block scaled unequally change it). ``find_scale_invariant``
    reports exactly that for the four convs (``points == groups``; ``invariant`` False:
    not row by row) and nothing for the classifier (tests/test_study_gn.py checks it
    against numerical ground truth). Every width must be a multiple of ``groups``.

    >>> net = GNVGGNet((8, 8, 16, 16), groups=4)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, widths: tuple[int, ...] = (16, 32, 64, 64), groups: int = 4, n_classes: int = 10
    ) -> None:
        if int(groups) < 1 or any(int(w) % int(groups) for w in widths):
            raise ValueError(f"GNVGGNet: every width of {widths} must be a multiple of {groups}")
        self.groups = int(groups)
        super().__init__(widths, n_classes)

    def _conv_norm_relu(self, c_in: int, c_out: int) -> list[nn.Module]:
        return _conv_gn_relu(c_in, c_out, self.groups)


class _QKNormAttention(nn.Module):
    """Multi-head self-attention with QK-norm: ``LayerNorm(head_dim)`` on each head of q and
    k (no bias on q, k: a bias before a LayerNorm over several channels breaks the
    invariance)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, L, heads, d)
        return t.unflatten(-1, (self.heads, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_norm(self._heads(self.q(x))).transpose(1, 2)
        k = self.k_norm(self._heads(self.k(x))).transpose(1, 2)
        v = self._heads(self.v(x)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).flatten(2))


class _PreLNBlock(nn.Module):
    """``x + attn(LN(x))``, then ``x + mlp(LN(x))`` (pre-LN, GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _QKNormAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class QKNormViT(nn.Module):
    """A tiny vision transformer on ``patch x patch`` patches of a 28x28 image (7x7: 16
    tokens of 49 pixels): linear patch embedding plus a learned position embedding,
    ``layers`` pre-LN blocks of ``heads``-head self-attention with QK-norm and a GELU MLP,
    a final LayerNorm, mean over tokens, linear classifier. ``dim=32, heads=2, layers=2``
    has 19,594 parameters.

    QK-norm makes the q and k projection weights scale invariant per head: each block of
    ``head_dim`` consecutive rows (one head) jointly, ``points == heads``. With
    ``example_inputs`` (the ``unflatten`` into heads needs the real shapes: without them the
    weights are refused, never assumed) ``find_scale_invariant`` reports exactly that for
    every ``q``/``k`` weight, and nothing else: ``v`` reaches the attention product, ``out``,
    the MLP and the embedding reach residual sums, the classifier the output
    (tests/test_study_gn.py checks it against numerical ground truth).
    :attr:`needs_example_inputs` tells the studies to pass a batch.

    >>> net = QKNormViT()
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    #: the scale-invariance analysis needs real shapes for this model (``example_inputs``)
    needs_example_inputs = True

    def __init__(
        self,
        dim: int = 32,
        heads: int = 2,
        layers: int = 2,
        patch: int = 7,
        mlp: int = 64,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        if min(dim, heads, layers, patch, mlp) < 1 or dim % heads or 28 % patch:
            raise ValueError(
                f"QKNormViT needs positive sizes, dim a multiple of heads and patch a "
                f"divisor of 28, got dim={dim}, heads={heads}, layers={layers}, patch={patch}"
            )
        self.patch, self.grid = patch, 28 // patch
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.grid**2, dim))
        self.blocks = nn.Sequential(*(_PreLNBlock(dim, heads, mlp) for _ in range(layers)))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, g = self.patch, self.grid
        tokens = x.reshape(x.shape[0], g, p, g, p).transpose(2, 3).flatten(3).flatten(1, 2)
        out = self.blocks(self.embed(tokens) + self.pos)
        return self.classifier(self.norm(out).mean(dim=1))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the shortcut a strided 1x1
    conv + BN when the shape changes (He et al. 2016; torchvision's ``BasicBlock``)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """The ImageNet ResNet-18 (torchvision's layout and parameter names, built here: a
    7x7 stride-2 stem + BN + max pool, four stages of two :class:`BasicBlock`, widths
    ``width * (1, 2, 4, 8)``, global average pool, linear); its conv weights are
    :func:`resnet18_conv_shapes`, each feeding a BatchNorm directly.

    >>> ResNet18(width=4, n_classes=10)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width: int = 64, n_classes: int = 1000) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"ResNet18 needs a positive width, got {width}")
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c_in = width
        for stage in range(4):
            c_out, stride = width * 2**stage, 1 if stage == 0 else 2
            blocks = [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


MODELS = {
    "vgg": VGGNet,
    "resnet18": ResNet18,
    "preact_resnet": PreActResNet,
    "gn_vgg": GNVGGNet,
    "qk_vit": QKNormViT,
}


def build_model(spec: dict, seed: int) -> nn.Module:
    """``spec = {"name": <a key of MODELS>, **kwargs}``, initialized from ``seed``."""
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
