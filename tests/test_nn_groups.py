"""Scale invariance beyond BatchNorm, at the right granularity (docs/design.md, "Which weights
are scale invariant"): GroupNorm, LayerNorm / RMSNorm over the channels (and per head),
InstanceNorm. Every verdict is checked against numerical ground truth (tests/ground_truth.py,
float64, eps made negligible): each block ``W.reshape(points, -1)[k]`` times its own positive
factor leaves the output unchanged, and each row times its own factor (rows inside a block
scaled unequally) changes it when the blocks hold several rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt.nn import find_scale_invariant, to_grassmann
from rbn_geoopt.nn.dataflow import Finding

from . import models as M
from .ground_truth import assert_no_false_positive, truly_block_invariant, truly_invariant


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _check_granularity(model: nn.Module, name: str, x, points: int, shapes: bool = True):
    """The finding for ``name`` has ``points`` blocks, and the numbers agree."""
    f = find_scale_invariant(model, example_inputs=x if shapes else None)[name]
    assert f.points == points, str(f)
    assert f.invariant == (points == f.rows)
    if points:
        assert truly_block_invariant(model, name, x, points), str(f)
    if points < f.rows:  # rows inside a block (or anywhere) scaled unequally
        assert not truly_invariant(model, name, x), str(f)
    return f


# --------------------------------------------------------------------------- GroupNorm
class GNNet(nn.Module):
    def __init__(self, groups: int, per: int, bias: bool = False) -> None:
        super().__init__()
        channels = groups * per
        self.conv = nn.Conv2d(3, channels, 3, bias=bias)
        self.gn = nn.GroupNorm(groups, channels)
        self.head = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.gn(self.conv(x))))


@settings(max_examples=12, deadline=None)
@given(groups=st.integers(1, 4), per=st.integers(1, 4), shapes=st.booleans())
def test_groupnorm_blocks_of_consecutive_rows(groups, per, shapes):
    torch.manual_seed(groups * 10 + per)
    model, x = GNNet(groups, per), _x(2, 3, 6, 6)
    f = _check_granularity(model, "conv.weight", x, groups, shapes)
    assert f.normalisers == ("gn",) and f.batchnorms == ()
    if per > 1:
        assert f"{groups} block" in f.reason and f"of {per} (GroupNorm 'gn')" in f.reason
        assert f"Grassmann1Blocks({groups})" in f.reason and f.selected(all_shapes=True)
    head = find_scale_invariant(model)["head.weight"]
    assert head.points == 0 and not head.invariant


@pytest.mark.parametrize("groups,per", [(2, 3), (4, 1), (1, 5)])
def test_groupnorm_bias_is_cancelled_only_by_one_channel_groups(groups, per):
    torch.manual_seed(0)
    model, x = GNNet(groups, per, bias=True), _x(2, 3, 6, 6)
    f = find_scale_invariant(model)["conv.weight"]
    if per == 1:  # GroupNorm(C, C): each channel's mean removes its bias
        assert f.invariant and f.points == f.rows and truly_invariant(model, "conv.weight", x)
    else:
        assert f.points == 0 and "bias" in f.reason and "GroupNorm 'gn'" in f.reason
        assert not truly_block_invariant(model, "conv.weight", x, 1)  # not even jointly


class Functional(nn.Module):
    """F.group_norm, F.layer_norm, F.rms_norm on bias-free convs."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-5  # the ground truth makes it negligible
        self.a = nn.Conv2d(3, 6, 3, bias=False)
        self.b = nn.Conv2d(3, 6, 3, bias=False)
        self.c = nn.Conv2d(3, 6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.group_norm(self.a(x), 3, eps=self.eps)
        b = F.layer_norm(self.b(x).permute(0, 2, 3, 1), (6,), eps=self.eps).permute(0, 3, 1, 2)
        c = F.rms_norm(self.c(x), (6, 4, 4), eps=self.eps)
        return a + b + c


@pytest.mark.parametrize("shapes", [False, True])
def test_functional_normalisers(shapes):
    torch.manual_seed(0)
    model, x = Functional(), _x(2, 3, 6, 6)
    _check_granularity(model, "a.weight", x, 3, shapes)
    _check_granularity(model, "b.weight", x, 1, shapes)
    _check_granularity(model, "c.weight", x, 1, shapes)


class Mixed(nn.Module):
    """One conv read by a BatchNorm and by a GroupNorm; another whose GroupNorm groups
    straddle it and a second source; a channel shuffle before a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.both = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.left = nn.Conv2d(3, 6, 3, bias=False)
        self.right = nn.Conv2d(3, 6, 3, bias=False)
        self.gn_cat = nn.GroupNorm(3, 12)  # groups of 4: the middle one mixes left and right
        self.shuffled = nn.Conv2d(3, 8, 3, bias=False)
        self.gn_shuffle = nn.GroupNorm(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.both(x)
        a = torch.cat([self.bn(z), self.gn(z)], 1)
        b = self.gn_cat(torch.cat([self.left(x), self.right(x)], 1))
        s = self.shuffled(x)
        n, c, h, w = s.shape
        s = s.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.cat([a, b[:, :4], self.gn_shuffle(s)], 1)


def test_partition_is_the_finest_over_all_normalisers_and_must_be_consecutive_blocks():
    torch.manual_seed(0)
    model, x = Mixed().train(), _x(2, 3, 6, 6)
    f = _check_granularity(model, "both.weight", x, 2)  # BN rows joined by GroupNorm blocks
    assert f.batchnorms == ("bn",) and f.normalisers == ("bn", "gn")
    findings = find_scale_invariant(model, example_inputs=x)
    for name in ("left.weight", "right.weight"):
        assert findings[name].points == 0 and "another source" in findings[name].reason
    shuffled = findings["shuffled.weight"]
    assert shuffled.points == 0 and "not blocks of consecutive rows" in shuffled.reason
    assert "rows [0, 4] together" in shuffled.reason
    assert not truly_block_invariant(model, "shuffled.weight", x, 4)  # blocks 0-1, 2-3, ...
    assert_no_false_positive(model, findings, x)


# ------------------------------------------------------------ LayerNorm / RMSNorm
class ChannelsLast(nn.Module):
    """Linear on (N, L, C) -> LayerNorm / RMSNorm over C (a transformer's channel dim)."""

    def __init__(self, norm: type = nn.LayerNorm, bias: bool = False, flat: bool = False):
        super().__init__()
        self.flat = flat
        self.fc = nn.Linear(8, 6, bias=bias)
        self.norm = norm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1) if self.flat else x
        return self.head(self.norm(self.fc(x)))


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_norm_over_the_channels_of_a_linear(norm):
    torch.manual_seed(0)
    model, x = ChannelsLast(norm), _x(2, 5, 8)
    f = _check_granularity(model, "fc.weight", x, 1)
    assert f"1 block of 6 ({norm.__name__} 'norm')" in f.reason
    # without example_inputs the rank of the Linear's input is unknown: never assumed
    bare = find_scale_invariant(model)["fc.weight"]
    assert bare.points == 0 and "example_inputs" in bare.reason
    # rank evidence (flatten to 2-D) decides it without shapes
    flat = ChannelsLast(norm, flat=True)
    _check_granularity(flat, "fc.weight", _x(4, 2, 4), 1, shapes=False)


@pytest.mark.parametrize("norm,word", [(nn.LayerNorm, "jointly"), (nn.RMSNorm, "mean")])
def test_bias_before_a_norm_over_the_channels_breaks_it(norm, word):
    torch.manual_seed(0)
    model, x = ChannelsLast(norm, bias=True), _x(2, 5, 8)
    f = find_scale_invariant(model, example_inputs=x)["fc.weight"]
    assert f.points == 0 and "bias" in f.reason and word in f.reason
    assert not truly_block_invariant(model, "fc.weight", x, 1)


class ConvNeXtish(nn.Module):
    """LayerNorm over channels of a conv (permute, as in ConvNeXt), over (C, H, W), and over
    W alone (each channel separately: every row is invariant)."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.perm = nn.Conv2d(3, 6, 3, bias=bias)
        self.ln_c = nn.LayerNorm(6)
        self.chw = nn.Conv2d(3, 6, 3, bias=bias)
        self.ln_chw = nn.LayerNorm([6, 4, 4])
        self.w_only = nn.Conv2d(3, 6, 3, bias=bias)
        self.ln_w = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.ln_c(self.perm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return a + self.ln_chw(self.chw(x)) + self.ln_w(self.w_only(x))


@pytest.mark.parametrize("shapes", [False, True])
def test_layernorm_on_conv_outputs(shapes):
    torch.manual_seed(0)
    model, x = ConvNeXtish(), _x(2, 3, 6, 6)
    _check_granularity(model, "perm.weight", x, 1, shapes)
    _check_granularity(model, "chw.weight", x, 1, shapes)
    f = _check_granularity(model, "w_only.weight", x, 6, shapes)
    assert f.reason == "it feeds LayerNorm 'ln_w'"
    biased = find_scale_invariant(ConvNeXtish(bias=True))
    assert biased["perm.weight"].points == 0 and "bias" in biased["perm.weight"].reason
    assert biased["chw.weight"].points == 0 and "bias" in biased["chw.weight"].reason
    assert biased["w_only.weight"].invariant  # one channel per group: its mean removes the bias


class QKNorm(nn.Module):
    """Attention-style projections normalised per head: LayerNorm / RMSNorm over head_dim."""

    def __init__(self, heads: int = 4, dim: int = 3, functional: bool = False) -> None:
        super().__init__()
        self.heads, self.functional, self.eps = heads, functional, 1e-5
        self.q = nn.Linear(8, heads * dim, bias=False)
        self.k = nn.Linear(8, heads * dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k_norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = self.q(x).view(n, length, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(n, length, self.heads, -1).transpose(1, 2)
        if self.functional:
            q = F.layer_norm(q, (q.shape[-1],), eps=self.eps)
            k = F.rms_norm(k, (3,), eps=self.eps)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1)


@settings(max_examples=6, deadline=None)
@given(heads=st.integers(1, 4), dim=st.integers(3, 4))  # LayerNorm(2) is a sign: degenerate
def test_qk_norm_one_block_per_head(heads, dim):
    torch.manual_seed(heads)
    model, x = QKNorm(heads, dim), _x(2, 5, 8)
    _check_granularity(model, "q.weight", x, heads)
    _check_granularity(model, "k.weight", x, heads)
    bare = find_scale_invariant(model)["q.weight"]  # the view needs real shapes
    assert bare.points == 0 and "example_inputs" in bare.reason


def test_qk_norm_functional_with_a_shape_computed_in_forward():
    torch.manual_seed(0)
    model, x = QKNorm(functional=True), _x(2, 5, 8)
    f = find_scale_invariant(model, example_inputs=x)
    assert f["q.weight"].points == 0 and "computed in forward" in f["q.weight"].reason
    _check_granularity(model, "k.weight", x, 4)


# ------------------------------------------------------------------ InstanceNorm
@pytest.mark.parametrize(
    "kwargs", [{}, {"affine": True}, {"track_running_stats": True, "affine": True}]
)
def test_instancenorm_each_row(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.InstanceNorm2d(6, **kwargs), nn.Conv2d(6, 2, 1))
    x = _x(2, 3, 6, 6)
    f = _check_granularity(model.train(), "0.weight", x, 6)  # its bias is cancelled
    assert f.reason == "it feeds InstanceNorm2d '1'" and f.selected(all_shapes=True)


def test_frozen_or_shared_instancenorm_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.InstanceNorm2d(6, track_running_stats=True))
    model.train()
    model[1].eval()  # running statistics: an affine map
    x = _x(2, 3, 6, 6)
    f = find_scale_invariant(model)["0.weight"]
    assert f.points == 0 and "frozen InstanceNorm2d '1'" in f.reason
    assert not truly_block_invariant(model, "0.weight", x, 1)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)
            self.norm = nn.InstanceNorm2d(4, track_running_stats=True)

        def forward(self, x):
            return self.norm(self.a(x)) * 2 + self.norm(self.b(x))

    f = find_scale_invariant(Shared())["a.weight"]
    assert f.points == 0 and "more than once" in f.reason


def test_instancenorm1d_on_a_2d_input_is_unbatched():
    """(N, F) into InstanceNorm1d is one unbatched (C, L) = (N, F): all features jointly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6, bias=False), nn.InstanceNorm1d(6))
    x = _x(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: num_features vs. dim 0
        _check_granularity(model, "1.weight", x, 1, shapes=False)
        _check_granularity(model, "1.weight", x, 1, shapes=True)


# ------------------------------------------------------- selection and conversion
def test_block_invariant_weights_are_selected_and_converted_in_blocks():
    torch.manual_seed(0)
    model = GNNet(2, 4)
    f = find_scale_invariant(model)["conv.weight"]
    assert str(f).startswith("conv.weight [8x27]: scale invariant in 2 blocks: its rows")
    assert f.point_length == 4 * 27 and f.wide and f.selected()
    old = model.conv.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted in blocks: no warning
        assert to_grassmann(model) == ["conv.weight"]
    assert repr(model.conv.weight.manifold) == "Grassmann1Blocks(points=2) manifold"
    assert torch.equal(model.conv.weight, old)


def test_finding_points_default_and_validation():
    f = Finding(name="w", invariant=True, reason="r", rows=4, row_length=3)
    assert f.points == 4
    assert Finding(name="w", invariant=False, reason="r", rows=4, row_length=3).points == 0
    with pytest.raises(ValueError, match="points"):
        Finding(name="w", invariant=True, reason="r", rows=4, row_length=3, points=2)
    with pytest.raises(ValueError, match="divide"):
        Finding(name="w", invariant=False, reason="r", rows=4, row_length=3, points=3)


@pytest.mark.parametrize("factory", list(M.EXPECTED), ids=lambda f: f.__name__)
def test_batchnorm_models_unchanged_points_equal_rows(factory):
    """The BatchNorm test models: every finding is row by row (points rows or 0)."""
    torch.manual_seed(0)
    model, (shape, _) = factory(bn_eps=1e-5).train(), M.EXPECTED[factory]
    findings = find_scale_invariant(model)
    for f in findings.values():
        assert f.points == (f.rows if f.invariant else 0), str(f)
        assert set(f.normalisers) == set(f.batchnorms)
    assert_no_false_positive(model, findings, _x(2, *shape[1:]))  # batch 2: fast


def test_instancenorm_fed_weights_convert_like_batchnorm_fed_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.InstanceNorm2d(6, affine=True), nn.ReLU())
    model.append(nn.Conv2d(6, 4, 1)).append(nn.GroupNorm(2, 4))
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    assert to_grassmann(model, all_shapes=True) == ["0.weight"]  # 3.weight: bias before GroupNorm
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_tiny_efficientnet_no_false_positive_at_any_granularity():
    from .test_nn_timm import _model
    from .test_nn_timm import _x as timm_x

    model, x = _model(), timm_x()
    findings = find_scale_invariant(model)
    for f in findings.values():
        assert f.points == (f.rows if f.invariant else 0), str(f)
    assert_no_false_positive(model, findings, x)


# ------------------------------------- weights normalised themselves before use
class StdConv(nn.Module):
    """timm's StdConv2d / ScaledStdConv2d (weight standardisation), written out."""

    def __init__(self, how: str = "std") -> None:
        super().__init__()
        self.how, self.eps = how, 1e-6
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.gain = nn.Parameter(torch.rand(4) + 0.5)
        self.head = nn.Conv2d(4, 2, 1)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, 4, -1)
        if self.how == "std":
            w = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=self.eps)
        elif self.how == "scaled":
            gain = (self.gain * 0.5).view(-1)
            w = F.batch_norm(flat, None, None, weight=gain, training=True, eps=self.eps)
        elif self.how == "normalize":  # a cosine layer: each row divided by its norm
            w = F.normalize(self.weight.flatten(1), dim=1)
        elif self.how == "layer_norm":  # all rows jointly
            w = F.layer_norm(self.weight, (4, 3, 3, 3), eps=self.eps)
        elif self.how == "columns":  # normalised over rows: all rows jointly
            w = F.normalize(self.weight, dim=0)
        else:  # "eval": batch statistics not used
            w = F.batch_norm(flat, self.mean, self.var, training=False)
        return self.head(F.relu(F.conv2d(x, w.reshape_as(self.weight))))


@pytest.mark.parametrize(
    "how,points", [("std", 4), ("scaled", 4), ("normalize", 4), ("layer_norm", 1), ("columns", 1)]
)
def test_weight_standardisation_and_normalised_weights(how, points):
    torch.manual_seed(0)
    model, x = StdConv(how), _x(2, 3, 6, 6)
    f = _check_granularity(model, "weight", x, points, shapes=False)
    assert not f.tied and f.selected(all_shapes=True)
    if points == 4:
        assert f.reason.startswith("it is normalised row by row before use")
    with torch.no_grad():
        before = model(x)
    assert "weight" in to_grassmann(model, all_shapes=True)  # rows, or one block (points 1)
    assert model.weight.manifold.point_shape(tuple(model.weight.shape))[0] == points
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_weight_not_normalised_with_batch_statistics_is_not_invariant():
    torch.manual_seed(0)
    model, x = StdConv("eval"), _x(2, 3, 6, 6)
    f = find_scale_invariant(model)["weight"]
    assert f.points == 0 and not truly_block_invariant(model, "weight", x, 1)


@pytest.mark.parametrize("dim,points", [(0, 4), (1, 1), (None, 1)])
def test_weight_norm_direction(dim, points):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3), dim=dim), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x, name = _x(2, 3, 6, 6), "0.parametrizations.weight.original1"
    f = _check_granularity(model, name, x, points, shapes=False)
    assert "weight_norm in ParametrizedConv2d '0'" in f.reason
    magnitude = find_scale_invariant(model).get("0.parametrizations.weight.original0")
    assert magnitude is None or not magnitude.invariant or magnitude.rows == 1
    with torch.no_grad():  # converted (rows, or one block), outputs kept
        before = model(x)
    assert to_grassmann(model) == [name]
    with torch.no_grad():
        assert torch.equal(model(x), before)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_norm_subclass_with_its_own_forward_counts_only_traced_into():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), LayerNorm2d(4), nn.Conv2d(4, 2, 1))
    x = _x(2, 3, 6, 6)
    _check_granularity(model, "0.weight", x, 1, shapes=False)
    leaf = find_scale_invariant(model, leaf_modules=["1"])["0.weight"]
    assert leaf.points == 0 and "LayerNorm2d '1'" in leaf.reason  # its forward is not torch's


def test_weight_norm_direction_read_through_the_parametrized_attribute():
    """``F.conv2d(x, self.conv.weight)`` traces to a call of the ParametrizationList."""
    from torch.nn.utils.parametrizations import weight_norm

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = weight_norm(nn.Conv2d(3, 4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.relu(x), self.conv.weight)

    torch.manual_seed(0)
    model, x = Functional(), _x(2, 3, 6, 6)
    _check_granularity(model, "conv.parametrizations.weight.original1", x, 4, shapes=False)
