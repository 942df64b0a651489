"""timm's BatchNormAct2d and an EfficientNet-like model (issue 12, item 7).

timm cannot be imported here (it needs torchvision, whose only reachable wheel is a CUDA build
that cannot load its C ops with CPU torch), so this file holds a small replica written after
timm's source (timm/layers/norm_act.py, timm/models/_efficientnet_blocks.py): a
``BatchNorm2d`` subclass whose forward checks the rank, calls ``F.batch_norm`` itself (so
torch.fx traces INTO it: the graph holds a functional batch norm, not the module), then a
drop layer and an activation; squeeze-excitation with SiLU and a sigmoid gate; depthwise
separable and inverted residual blocks. Every verdict is checked against the numerical
ground truth (tests/ground_truth.py).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from rbn_geoopt.nn import find_scale_invariant, to_grassmann
from tests.ground_truth import truly_invariant

torch.set_num_threads(1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNorm + activation: BatchNorm2d's own forward, inlined, then drop, act."""

    def __init__(self, num_features: int, act_layer=nn.SiLU, apply_act: bool = True) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class DepthwiseSeparable(nn.Module):
    """conv_dw -> BNAct -> SE -> conv_pw -> BN (no act), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.has_skip = cin == cout
        self.conv_dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.bn1 = BatchNormAct2d(cin)
        self.se = SqueezeExcite(cin, max(1, cin // 4))
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return x + shortcut if self.has_skip else x


class InvertedResidual(nn.Module):
    """conv_pw -> BNAct -> depthwise conv -> BNAct -> SE -> conv_pwl -> BN (no act)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.aa = nn.Identity()
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
        return self.drop_path(x) + shortcut if self.has_skip else x


class TinyEfficientNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(8, 8),
            InvertedResidual(8, 12, stride=2),
            InvertedResidual(12, 12, stride=1),
        )
        self.conv_head = nn.Conv2d(12, 32, 1, bias=False)
        self.bn2 = BatchNormAct2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.classifier(self.flatten(self.pool(self.bn2(self.conv_head(x)))))


BN_FED = {
    "conv_stem.weight",
    "blocks.0.conv_dw.weight",
    "blocks.0.conv_pw.weight",
    "conv_head.weight",
} | {f"blocks.{i}.{c}.weight" for i in (1, 2) for c in ("conv_pw", "conv_dw", "conv_pwl")}


def _model() -> TinyEfficientNet:
    torch.manual_seed(0)
    return TinyEfficientNet().train()


def _x() -> torch.Tensor:
    return torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(1))


def _bn_act_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)]


def test_traced_into_batchnorm_act_counts():
    model, x = _model(), _x()
    findings = find_scale_invariant(model)
    assert {n for n, f in findings.items() if f.invariant} == BN_FED
    assert findings["blocks.1.conv_pwl.weight"].batchnorms == ("blocks.1.bn3",)
    assert "silu" in findings["blocks.1.se.conv_reduce.weight"].reason.lower()
    for name, finding in findings.items():  # every verdict is the numerical truth
        assert truly_invariant(model, name, x) is finding.invariant, name
    shaped = find_scale_invariant(model, example_inputs=x)
    assert {n for n, f in shaped.items() if f.invariant} == BN_FED


def test_leaf_batchnorm_subclass_counts():
    model = _model()
    leaves = _bn_act_names(model)
    assert len(leaves) == 10
    findings = find_scale_invariant(model, leaf_modules=leaves)
    assert {n for n, f in findings.items() if f.invariant} == BN_FED
    assert findings["conv_stem.weight"].batchnorms == ("bn1",)


def test_frozen_batchnorm_act_blocks():
    """Fine-tuning with the first blocks' BatchNorms frozen: their convs are not invariant."""
    model, x = _model(), _x()
    model(x)
    frozen = ("bn1", "blocks.0.bn1", "blocks.0.bn2")
    for name in frozen:
        model.get_submodule(name).eval()
    for kwargs in ({}, {"leaf_modules": _bn_act_names(model)}):
        findings = find_scale_invariant(model, **kwargs)
        free = BN_FED - {"conv_stem.weight", "blocks.0.conv_dw.weight", "blocks.0.conv_pw.weight"}
        assert {n for n, f in findings.items() if f.invariant} == free
        assert "affine map" in findings["conv_stem.weight"].reason
        for name in ("conv_stem.weight", "blocks.0.conv_pw.weight"):
            assert not truly_invariant(model, name, x)


def test_example_inputs_leave_statistics_alone_and_conversion_keeps_outputs():
    """The graph traced into BatchNormAct2d calls F.batch_norm(training=True) and
    num_batches_tracked.add_(1): the shape propagation must not move any buffer."""
    model, x = _model(), _x()
    for name in _bn_act_names(model):
        model.get_submodule(name).eps = 1e-12  # outputs kept to rounding after conversion
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_scale_invariant(model, example_inputs=x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    ref = copy.deepcopy(model)
    assert set(to_grassmann(model, all_shapes=True, example_inputs=x)) == BN_FED
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
