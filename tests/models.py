"""Small test models (no torchvision) for the model-integration tests.

Every model takes ``bn_eps`` so the output-preservation tests can make BatchNorm's ``eps``
negligible, and builds in the default dtype (tests call ``.double()``). ``EXPECTED`` lists,
for each model, the exact set of weights ``to_grassmann`` must convert by default (fan-out <
fan-in, scale invariant, not tied) -- worked out by hand from docs/design.md, "Which
weights are scale invariant".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv3(cin: int, cout: int, stride: int = 1, bias: bool = False, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias, groups=groups)


# ------------------------------------------------------------- post-activation ResNet
class PostActBlock(nn.Module):
    """ResNet v1 basic block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)).

    ``shortcut``: "identity", "conv_bn" (1x1 conv then BN: BN-fed) or "conv" (1x1 conv added
    straight into the residual sum: NOT scale invariant).
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, bn_eps: float) -> None:
        super().__init__()
        self.conv1 = conv3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.conv2 = conv3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.kind = shortcut
        if shortcut == "conv_bn":
            self.short_conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.short_bn = nn.BatchNorm2d(cout, eps=bn_eps)
        elif shortcut == "conv":
            self.short_conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "conv_bn":
            short = self.short_bn(self.short_conv(x))
        elif self.kind == "conv":
            short = self.short_conv(x)
        else:
            short = x
        return F.relu(out + short)


class PostActResNet(nn.Module):
    def __init__(self, num_classes: int = 5, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = conv3(3, 8)
        self.bn = nn.BatchNorm2d(8, eps=bn_eps)
        self.layer1 = PostActBlock(8, 8, 1, "identity", bn_eps)
        self.layer2 = PostActBlock(8, 16, 2, "conv_bn", bn_eps)
        self.layer3 = PostActBlock(16, 12, 2, "conv", bn_eps)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------ pre-activation WRN
class WRNBlock(nn.Module):
    """Wide-ResNet pre-activation block (Zagoruyko & Komodakis, as in the paper's code)."""

    def __init__(self, cin: int, cout: int, stride: int, bn_eps: float, drop: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=bn_eps)
        self.conv1 = conv3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.drop = nn.Dropout(drop)
        self.conv2 = conv3(cout, cout)
        self.equal = cin == cout and stride == 1
        if not self.equal:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(F.relu(self.bn2(y))))
        return y + (x if self.equal else self.shortcut(o))


class PreActWRN(nn.Module):
    """WRN-(6n+4)-k with n = 1: conv, three groups of one block, bn, relu, pool, fc."""

    def __init__(
        self, width: int = 2, num_classes: int = 5, bn_eps: float = 1e-5, drop: float = 0.0
    ) -> None:
        super().__init__()
        w = [8, 8 * width, 16 * width, 32 * width]
        self.conv = conv3(3, w[0])
        self.block1 = WRNBlock(w[0], w[1], 1, bn_eps, drop)
        self.block2 = WRNBlock(w[1], w[2], 2, bn_eps, drop)
        self.block3 = WRNBlock(w[2], w[3], 2, bn_eps, drop)
        self.bn = nn.BatchNorm2d(w[3], eps=bn_eps)
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv(x))))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


# ----------------------------------------------------------------------- VGG
class VGG(nn.Module):
    """VGG-style: conv(bias)-BN-ReLU stacks, max pooling, a BN-fed linear, a head."""

    def __init__(self, num_classes: int = 5, bn_eps: float = 1e-5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (8, "M", 16, 16, "M"):
            if cout == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [conv3(cin, cout, bias=True), nn.BatchNorm2d(cout, eps=bn_eps), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 24),
            nn.BatchNorm1d(24, eps=bn_eps),
            nn.ReLU(inplace=True),
            nn.Dropout(0.0),
            nn.Linear(24, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ----------------------------------------------------------------------- MLP
class MLP(nn.Module):
    def __init__(self, sizes=(20, 16, 12, 3), bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.bn1 = nn.BatchNorm1d(sizes[1], eps=bn_eps)
        self.fc2 = nn.Linear(sizes[1], sizes[2], bias=False)
        self.bn2 = nn.BatchNorm1d(sizes[2], eps=bn_eps)
        self.head = nn.Linear(sizes[2], sizes[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(1): the graph then proves that fc1 sees 2-D inputs (issue 12, item 5)
        x = F.relu(self.bn1(self.fc1(x.flatten(1))))
        x = F.leaky_relu(self.bn2(self.fc2(x)), 0.1)
        return self.head(x)


# --------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_eps: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin, eps=bn_eps)
        self.conv = conv3(cin, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    """Stem, a dense block (each BN sees every earlier conv through concatenation), a
    transition (BN-ReLU-1x1 conv-avgpool), a second dense layer, BN, head."""

    def __init__(self, num_classes: int = 5, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.stem = conv3(3, 8)
        self.dense1 = DenseLayer(8, 6, bn_eps)
        self.dense2 = DenseLayer(14, 6, bn_eps)
        self.trans_bn = nn.BatchNorm2d(20, eps=bn_eps)
        self.trans_conv = nn.Conv2d(20, 10, 1, bias=False)
        self.dense3 = DenseLayer(10, 6, bn_eps)
        self.bn = nn.BatchNorm2d(16, eps=bn_eps)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense2(self.dense1(self.stem(x)))
        x = F.avg_pool2d(self.trans_conv(F.relu(self.trans_bn(x))), 2)
        x = F.relu(self.bn(self.dense3(x)))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------ grouped / depthwise
class GroupedNet(nn.Module):
    """Grouped conv (each filter one point), depthwise conv (fan-in 9 < fan-out 16: only
    with all_shapes=True), pointwise conv."""

    def __init__(self, num_classes: int = 5, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.grouped = conv3(8, 16, groups=4)
        self.bn1 = nn.BatchNorm2d(16, eps=bn_eps)
        self.depthwise = conv3(16, 16, groups=16)
        self.bn2 = nn.BatchNorm2d(16, eps=bn_eps)
        self.pointwise = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8, eps=bn_eps)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.grouped(x)))
        x = F.relu(self.bn2(self.depthwise(x)))
        x = F.relu(self.bn3(self.pointwise(x)))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------- bias paths
class BiasPaths(nn.Module):
    """Which biases and ops pass on the way to a BatchNorm (3 input channels)."""

    def __init__(self, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.bias_bn = conv3(3, 4, bias=True)  # bias -> BN: passes
        self.bn_a = nn.BatchNorm2d(4, eps=bn_eps)
        self.bias_relu_bn = conv3(3, 4, bias=True)  # bias -> ReLU -> BN: blocks
        self.bn_b = nn.BatchNorm2d(4, eps=bn_eps)
        self.relu_bn = conv3(3, 4)  # no bias -> ReLU -> BN: passes
        self.bn_c = nn.BatchNorm2d(4, eps=bn_eps)
        self.bias_pool_bn = conv3(3, 4, bias=True)  # bias -> maxpool -> BN: passes
        self.bn_d = nn.BatchNorm2d(4, eps=bn_eps)
        self.leaky_avg_bn = conv3(3, 4)  # LeakyReLU -> padded avg pool -> *2 -> BN: passes
        self.bn_e = nn.BatchNorm2d(4, eps=bn_eps)
        self.sigmoid_bn = conv3(3, 4)  # sigmoid -> BN: blocks (not homogeneous)
        self.bn_f = nn.BatchNorm2d(4, eps=bn_eps)
        self.gelu_bn = conv3(3, 4)  # GELU -> BN: blocks
        self.bn_g = nn.BatchNorm2d(4, eps=bn_eps)
        self.gated = conv3(3, 4)  # multiplied by another tensor -> BN: blocks
        self.bn_h = nn.BatchNorm2d(4, eps=bn_eps)
        self.to_output = conv3(3, 4)  # feeds a BN AND the output: blocks
        self.bn_i = nn.BatchNorm2d(4, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn_a(self.bias_bn(x))
        b = self.bn_b(F.relu(self.bias_relu_bn(x)))
        c = self.bn_c(F.relu(self.relu_bn(x)))
        d = self.bn_d(F.max_pool2d(self.bias_pool_bn(x), 3, 1, 1))
        e = self.bn_e(2.0 * F.avg_pool2d(F.leaky_relu(self.leaky_avg_bn(x), 0.2), 3, 1, 1))
        f = self.bn_f(torch.sigmoid(self.sigmoid_bn(x)))
        g = self.bn_g(F.gelu(self.gelu_bn(x)))
        h = self.bn_h(self.gated(x) * torch.sigmoid(x.mean(1, keepdim=True)))
        y = self.to_output(x)
        i = self.bn_i(y)
        return torch.cat([a, b, c, d, e, f, g, h, i, y], 1)


# ------------------------------------------------------------- tied / transposed
class TiedAndTransposed(nn.Module):
    """A conv applied twice (tied rows, both paths BN-fed), two modules sharing one
    weight, and a transposed conv followed by BN: all left alone unless named."""

    def __init__(self, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.twice = conv3(4, 4)
        self.bn_t1 = nn.BatchNorm2d(4, eps=bn_eps)
        self.bn_t2 = nn.BatchNorm2d(4, eps=bn_eps)
        self.share_a = conv3(4, 6)
        self.share_b = conv3(4, 6)
        self.share_b.weight = self.share_a.weight
        self.bn_sa = nn.BatchNorm2d(6, eps=bn_eps)
        self.bn_sb = nn.BatchNorm2d(6, eps=bn_eps)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2, bias=False)
        self.bn_up = nn.BatchNorm2d(3, eps=bn_eps)
        self.plain = conv3(4, 5)
        self.bn_p = nn.BatchNorm2d(5, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.bn_t1(self.twice(x)) + self.bn_t2(self.twice(x.flip(-1)))
        s = torch.cat([self.bn_sa(self.share_a(x)), self.bn_sb(self.share_b(x))], 1)
        u = self.bn_up(self.up(x)).mean((2, 3))
        p = self.bn_p(self.plain(x))
        return torch.cat([t.mean((2, 3)), s.mean((2, 3)), u, p.mean((2, 3))], 1)


# ---------------------------------------------------------- functional / layout
class FunctionalConv(nn.Module):
    """Weights used through F.conv2d / F.linear, and BN-fed flatten/reshape layouts."""

    def __init__(self, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)
        self.bn = nn.BatchNorm2d(6, eps=bn_eps)
        self.pooled = nn.Conv2d(6, 5, 3, bias=False)  # -> adaptive pool(1) -> flatten -> BN1d(5)
        self.bn_pooled = nn.BatchNorm1d(5, eps=bn_eps)
        self.lin = nn.Parameter(torch.randn(4, 5) * 0.3)
        self.bn_lin = nn.BatchNorm1d(4, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(F.conv2d(x, self.w, self.b, padding=1)))
        z = self.bn_pooled(torch.flatten(F.adaptive_max_pool2d(self.pooled(y), 1), 1))
        return self.bn_lin(F.linear(z, self.lin))


class FlattenToBN(nn.Module):
    """conv (2x2 map) -> flatten -> BatchNorm1d(C*4): each BN channel fed by one row, but
    checking that needs the real shapes (example_inputs); plus a Linear on (N, L, F) tokens
    whose output is transposed to (N, C, L) for BatchNorm1d. Input: (N, 3, 4, 4)."""

    def __init__(self, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm1d(16, eps=bn_eps)
        self.tok = nn.Linear(3, 2, bias=True)
        self.bn_tok = nn.BatchNorm1d(2, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (N, 4, 2, 2)
        a = self.bn(y.view(y.size(0), -1))
        tokens = x.flatten(2).transpose(1, 2)  # (N, 16 positions, 3 features)
        b = self.bn_tok(self.tok(tokens).transpose(1, 2))  # (N, 2, 16)
        return torch.cat([a, b.flatten(1)], 1)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.fc(x))
        if y.sum() > 0:
            y = -y
        return y


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


#: model factory -> (input shape, exact default conversion set)
EXPECTED = {
    PostActResNet: (
        (6, 3, 8, 8),
        {
            "conv.weight",
            "layer1.conv1.weight",
            "layer1.conv2.weight",
            "layer2.conv1.weight",
            "layer2.conv2.weight",
            # layer2.short_conv: 8 -> 16 is BN-fed but fan-out 16 >= fan-in 8
            "layer3.conv1.weight",
            "layer3.conv2.weight",
            # layer3.short_conv: added into the residual before any BN
        },
    ),
    PreActWRN: (
        (6, 3, 8, 8),
        {
            # the stem feeds block1.bn1 only (block1 has a projection shortcut on relu(bn1))
            "conv.weight",
            "block1.conv1.weight",
            "block2.conv1.weight",
            "block3.conv1.weight",
            # conv2 of each block: summed with the shortcut before the next BN
        },
    ),
    VGG: (
        (6, 3, 8, 8),
        {
            "features.0.weight",
            "features.4.weight",
            "features.7.weight",
            "classifier.1.weight",
        },
    ),
    MLP: ((8, 20), {"fc1.weight", "fc2.weight"}),
    DenseNet: (
        (6, 3, 8, 8),
        {
            "stem.weight",
            "dense1.conv.weight",
            "dense2.conv.weight",
            "trans_conv.weight",
            "dense3.conv.weight",
        },
    ),
    GroupedNet: ((2, 8, 6, 6), {"grouped.weight", "pointwise.weight"}),
    BiasPaths: (
        (2, 3, 6, 6),
        {"bias_bn.weight", "relu_bn.weight", "bias_pool_bn.weight", "leaky_avg_bn.weight"},
    ),
    TiedAndTransposed: ((2, 4, 6, 6), {"plain.weight"}),
    FunctionalConv: ((4, 3, 6, 6), {"w", "pooled.weight", "lin"}),
}
