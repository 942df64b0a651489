"""Which weights the dataflow analysis finds scale invariant (rbn_geoopt.nn.dataflow)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rbn_geoopt.nn import Finding, UntraceableModelError, find_scale_invariant
from tests import models as M

torch.set_num_threads(1)


def selected(model: nn.Module, **kwargs) -> set[str]:
    return {n for n, f in find_scale_invariant(model, **kwargs).items() if f.selected()}


@pytest.mark.parametrize("factory", list(M.EXPECTED), ids=lambda f: f.__name__)
def test_exact_default_selection(factory):
    shape, expected = M.EXPECTED[factory]
    model = factory()
    model(torch.randn(shape))  # the model really runs on that input
    assert selected(model) == expected
    # the same answer from the real shapes
    assert selected(model, example_inputs=torch.randn(shape)) == expected


def test_post_act_resnet_reasons():
    f = find_scale_invariant(M.PostActResNet())
    assert f["layer3.short_conv.weight"].invariant is False
    assert "add" in f["layer3.short_conv.weight"].reason
    # BN-fed but fan-out 16 >= fan-in 8: invariant, not selected unless all_shapes
    short = f["layer2.short_conv.weight"]
    assert short.invariant and not short.wide
    assert not short.selected() and short.selected(all_shapes=True)
    assert f["fc.weight"].reason == "its output reaches the model output without a BatchNorm"
    assert f["layer1.conv2.weight"].batchnorms == ("layer1.bn2",)


def test_wrn_second_conv_is_not_invariant():
    """The paper's code converts conv2 by name; its output is summed before the next BN."""
    f = find_scale_invariant(M.PreActWRN())
    for block in ("block1", "block2", "block3"):
        assert f[f"{block}.conv1.weight"].invariant
        conv2 = f[f"{block}.conv2.weight"]
        assert not conv2.invariant and conv2.wide and "add" in conv2.reason
        assert not f[f"{block}.shortcut.weight"].invariant
    assert not f["fc.weight"].invariant


def test_wrn_identity_shortcut_blocks_the_stem():
    """With an identity shortcut the block input is also added: the layer feeding it is out."""
    model = M.PreActWRN()
    model.block1 = M.WRNBlock(8, 8, 1, 1e-5, 0.0)
    model.block2 = M.WRNBlock(8, 32, 2, 1e-5, 0.0)
    f = find_scale_invariant(model)
    assert not f["conv.weight"].invariant and "add" in f["conv.weight"].reason
    assert f["block1.conv1.weight"].invariant


def test_densenet_concat_maps_channels():
    f = find_scale_invariant(M.DenseNet())
    assert f["stem.weight"].batchnorms == ("dense1.bn", "dense2.bn", "trans_bn")
    assert f["dense2.conv.weight"].batchnorms == ("trans_bn",)
    assert f["trans_conv.weight"].batchnorms == ("dense3.bn", "bn")


def test_grouped_and_depthwise():
    f = find_scale_invariant(M.GroupedNet())
    assert (f["grouped.weight"].rows, f["grouped.weight"].row_length) == (16, 18)
    depthwise = f["depthwise.weight"]
    assert depthwise.invariant and (depthwise.rows, depthwise.row_length) == (16, 9)
    assert not depthwise.selected() and depthwise.selected(all_shapes=True)


def test_bias_paths():
    f = find_scale_invariant(M.BiasPaths())
    assert "bias" in f["bias_relu_bn.weight"].reason
    assert f["bias_relu_bn.weight"].batchnorms == ("bn_b",)  # the path itself is followed
    for name, word in [
        ("sigmoid_bn.weight", "sigmoid"),
        ("gelu_bn.weight", "gelu"),
        ("gated.weight", "mul"),
        ("to_output.weight", "model output"),
    ]:
        assert not f[name].invariant and word in f[name].reason


def test_tied_and_transposed_left_alone():
    f = find_scale_invariant(M.TiedAndTransposed())
    assert "share_b.weight" not in f  # named_parameters() names a tied parameter once
    for name in ("twice.weight", "share_a.weight"):
        assert f[name].tied and f[name].invariant and not f[name].selected()
    assert "transposed" in f["up.weight"].reason and not f["up.weight"].invariant
    assert not f["plain.weight"].tied


def test_inplace_relu_after_bias_blocks():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=True)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            F.relu(y, inplace=True)  # mutates y: the BN sees relu(y + b)
            return self.bn(y)

    f = find_scale_invariant(InPlace())["conv.weight"]
    assert not f.invariant and "bias" in f.reason
    model = InPlace()
    model.conv.bias = None
    assert find_scale_invariant(model)["conv.weight"].invariant


def test_batchnorm_called_twice_blocks():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    f = find_scale_invariant(Shared())
    assert not f["a.weight"].invariant and "more than once" in f["a.weight"].reason


def test_concat_with_model_input_needs_shapes():
    class CatInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(torch.cat([x, self.conv(x)], 1))

    x = torch.randn(2, 3, 4, 4)
    f = find_scale_invariant(CatInput())["conv.weight"]
    assert not f.invariant and "example_inputs" in f.reason
    assert find_scale_invariant(CatInput(), example_inputs=x)["conv.weight"].invariant


def test_concat_along_space_blocks():
    class CatSpace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(torch.cat([x, self.conv(x)], 2))  # BN channel mixes both

    x = torch.randn(2, 3, 4, 4)
    assert not find_scale_invariant(CatSpace())["conv.weight"].invariant
    assert not find_scale_invariant(CatSpace(), example_inputs=x)["conv.weight"].invariant


def test_flatten_layouts_need_example_inputs():
    x = torch.randn(5, 3, 4, 4)
    f = find_scale_invariant(M.FlattenToBN())
    assert not f["conv.weight"].invariant and "example_inputs" in f["conv.weight"].reason
    # x.flatten(2) proves the tokens are 3-D: the Linear's rows land on dim -1, the
    # transpose moves them to the BatchNorm1d channel dim, without example_inputs
    assert f["tok.weight"].invariant
    f = find_scale_invariant(M.FlattenToBN(), example_inputs=x)
    assert f["conv.weight"].invariant and f["tok.weight"].invariant


def test_pooling_across_channels_blocks():
    class PoolChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(F.max_pool1d(self.fc(x).unsqueeze(1), 2).squeeze(1))

    x = torch.randn(3, 6)
    f = find_scale_invariant(PoolChannels(), example_inputs=x)["fc.weight"]
    assert not f.invariant and "across channels" in f.reason


def test_transposed_layout_to_wrong_batchnorm_channel_blocks():
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):  # x: (N, 4, 6) -> (N, 4, 4); BN channel = dim 1 = positions
            return self.bn(self.fc(x))

    x = torch.randn(3, 4, 6)
    f = find_scale_invariant(Swapped(), example_inputs=x)["fc.weight"]
    assert not f.invariant and "more than one row" in f.reason


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_opaque_leaf_module_blocks():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), _Wrap(nn.BatchNorm1d(4)))
    assert find_scale_invariant(model)["1.weight"].batchnorms == ("2.inner",)
    f = find_scale_invariant(model, leaf_modules=["2"])["1.weight"]
    assert not f.invariant and "_Wrap '2'" in f.reason
    with pytest.raises(ValueError, match="no submodule"):
        find_scale_invariant(model, leaf_modules=["nope"])


def test_untraceable_model_says_how_to_name_weights():
    with pytest.raises(UntraceableModelError, match=r"include=\[") as info:
        find_scale_invariant(M.Untraceable())
    assert isinstance(info.value, TypeError)
    assert "detect=False" in str(info.value)
    # with the untraceable part kept opaque, the rest can still be analysed
    wrapped = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), M.Untraceable())
    f = find_scale_invariant(wrapped, leaf_modules=["3"])
    assert f["1.weight"].invariant and not f["3.fc.weight"].invariant


def test_weight_also_used_elsewhere_blocks():
    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4, bias=False)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x)) * self.fc.weight.norm()

    f = find_scale_invariant(Reg())["fc.weight"]
    assert not f.invariant and "norm" in f.reason


def test_finding_str_and_bad_input():
    f = find_scale_invariant(M.MLP())["fc1.weight"]
    assert isinstance(f, Finding)
    assert str(f) == "fc1.weight [16x20]: scale invariant: it feeds BatchNorm 'bn1'"
    with pytest.raises(TypeError, match="nn.Module"):
        find_scale_invariant([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="example_inputs"):
        find_scale_invariant(M.MLP(), example_inputs=torch.randn(4, 7))


def test_example_inputs_leave_model_state_alone():
    model = M.VGG()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_scale_invariant(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mean_over_space_passes_but_not_over_channels():
    class Means(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, bias=True)
            self.bn_a = nn.BatchNorm1d(4)
            self.b = nn.Conv2d(3, 4, 3, bias=False)
            self.bn_b = nn.BatchNorm2d(1)
            self.c = nn.Conv2d(3, 4, 3, bias=False)
            self.bn_c = nn.BatchNorm1d(4)

        def forward(self, x):
            a = self.bn_a(self.a(x).mean((2, 3)))  # bias and all: mean is affine
            b = self.bn_b(self.b(x).mean(1, keepdim=True))  # mixes the rows
            c = self.bn_c(torch.mean(self.c(x), dim=-1).mean(-1))
            return torch.cat([a, b.flatten(1), c], 1)

    x = torch.randn(3, 3, 5, 5)
    for kwargs in ({}, {"example_inputs": x}):
        f = find_scale_invariant(Means(), **kwargs)
        assert f["a.weight"].invariant and f["c.weight"].invariant
        assert not f["b.weight"].invariant and "across channels" in f["b.weight"].reason
