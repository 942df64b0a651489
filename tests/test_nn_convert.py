"""to_grassmann: outputs kept in train and eval mode, unit rows, idempotency, bad input."""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch
import torch.nn as nn

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.nn import UntraceableModelError, find_scale_invariant, to_grassmann
from tests import models as M

torch.set_num_threads(1)

EPS = 1e-12  # BatchNorm eps in the output tests: outputs then agree to ~1e-8


@pytest.fixture(autouse=True)
def _seeded():
    """Models draw their initial weights from the global generator: make that repeatable."""
    torch.manual_seed(0)


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64; every weight row times a random factor in [0.1, 10]; random BN affine."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                scale = torch.empty((p.shape[0],) + (1,) * (p.dim() - 1), dtype=p.dtype)
                p.mul_(torch.exp(scale.uniform_(-2.3, 2.3, generator=gen)))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def warm_up(model: nn.Module, shape, seed: int = 1) -> torch.Tensor:
    """Fill the running statistics with a few train-mode passes; return a fresh input."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(3):
        model(torch.randn(shape, generator=gen, dtype=torch.float64))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def assert_same_function(model, ref, x, rtol=1e-6, atol=1e-7):
    """Eval, then train (which updates the running stats of both), then eval again."""
    for mode in ("eval", "train", "eval"):
        getattr(model, mode)()
        getattr(ref, mode)()
        torch.testing.assert_close(model(x), ref(x), rtol=rtol, atol=atol, msg=mode)


def grassmann_names(model):
    return sorted(n for n, p in model.named_parameters() if isinstance(p, geoopt.ManifoldParameter))


def assert_unit_rows(param, tol=1e-12):
    rows = param.detach().reshape(param.shape[0], -1)
    norms = torch.linalg.vector_norm(rows, dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=tol)


@pytest.mark.parametrize("factory", list(M.EXPECTED), ids=lambda f: f.__name__)
@pytest.mark.parametrize("all_shapes", [False, True])
def test_outputs_kept_after_conversion(factory, all_shapes):
    shape, expected = M.EXPECTED[factory]
    model = scramble(factory(bn_eps=EPS))
    x = warm_up(model, shape)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = to_grassmann(model, all_shapes=all_shapes)
    assert set(names) >= expected and (all_shapes or set(names) == expected)
    assert grassmann_names(model) == sorted(names)
    for name in names:
        param = model.get_parameter(name)
        assert isinstance(param.manifold, Grassmann1)
        assert param.manifold.ndim == param.dim() - 1
        assert param.dtype == torch.float64 and param.requires_grad
        assert_unit_rows(param)
        # each row is the old row rescaled by a positive factor
        old = ref.get_parameter(name).detach().reshape(param.shape[0], -1)
        r = torch.linalg.vector_norm(old, dim=1, keepdim=True)
        torch.testing.assert_close(param.detach().reshape(old.shape), old / r)
    assert_same_function(model, ref, x)


def test_all_shapes_adds_the_tall_weights():
    assert "depthwise.weight" in to_grassmann(M.GroupedNet(), all_shapes=True)
    assert "layer2.short_conv.weight" in to_grassmann(M.PostActResNet(), all_shapes=True)


def test_flatten_and_token_layouts_with_example_inputs():
    shape = (5, 3, 4, 4)
    model = scramble(M.FlattenToBN(bn_eps=EPS))
    x = warm_up(model, shape)
    ref = copy.deepcopy(model)
    # without shapes only the token Linear is proven (x.flatten(2) fixes its input rank)
    structural = copy.deepcopy(model)
    assert to_grassmann(structural) == ["tok.weight"]
    assert_same_function(structural, copy.deepcopy(ref), x)
    names = to_grassmann(model, example_inputs=x)
    assert names == ["conv.weight", "tok.weight"]
    assert_same_function(model, ref, x)


def test_bias_relu_weight_by_name_keeps_outputs():
    """Not scale invariant (bias then ReLU), but the path is followed: outputs are kept."""
    model = scramble(M.BiasPaths(bn_eps=EPS))
    x = warm_up(model, (4, 3, 6, 6))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="bias_relu_bn.weight' is not scale invariant.*kept"):
        names = to_grassmann(model, include=["bias_relu_bn.weight"])
    assert "bias_relu_bn.weight" in names
    assert_same_function(model, ref, x)


def test_tied_weights_by_name():
    model = scramble(M.TiedAndTransposed(bn_eps=EPS))
    x = warm_up(model, (3, 4, 6, 6))
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied but scale invariant: no warning
        names = to_grassmann(model, include=["twice.weight", "share_b.weight"])
    assert names == ["twice.weight", "share_a.weight", "plain.weight"]
    assert model.share_a.weight is model.share_b.weight
    assert isinstance(model.share_b.weight, geoopt.ManifoldParameter)
    assert_same_function(model, ref, x)


def test_transposed_by_name_warns_and_changes_outputs():
    model = scramble(M.TiedAndTransposed(bn_eps=EPS))
    x = warm_up(model, (3, 4, 6, 6))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="up.weight' is not scale invariant.*outputs change"):
        names = to_grassmann(model, include=["up.weight"])
    assert "up.weight" in names
    assert_unit_rows(model.up.weight)  # rows = dim 0, as for every weight
    model.eval()
    ref.eval()
    assert not torch.allclose(model(x), ref(x), atol=1e-3)


def test_wrn_by_name_like_the_papers_code_changes_outputs():
    model = scramble(M.PreActWRN(bn_eps=EPS))
    x = warm_up(model, (2, 3, 8, 8))
    ref = copy.deepcopy(model)
    by_name = [f"block{i}.conv2.weight" for i in (1, 2, 3)]
    with pytest.warns(UserWarning, match="conv2.weight' is not scale invariant"):
        names = to_grassmann(model, include=by_name)
    assert set(by_name) <= set(names)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(ref, mode)()
        assert not torch.allclose(model(x), ref(x), atol=1e-3), mode


def test_idempotent():
    model = scramble(M.DenseNet(bn_eps=EPS))
    warm_up(model, (2, 3, 8, 8))
    first = to_grassmann(model)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert to_grassmann(model) == first
    assert to_grassmann(model, all_shapes=True) == first  # nothing new is tall here
    findings = find_scale_invariant(model)
    assert {n for n, f in findings.items() if f.converted} == set(first)
    for n, p in model.named_parameters():
        assert p is params[n]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_earlier_named_conversion_is_listed_again():
    model = M.MLP()
    assert to_grassmann(model, include=["fc1.weight"], detect=False) == ["fc1.weight"]
    assert to_grassmann(model) == ["fc1.weight", "fc2.weight"]


def test_exclude_and_detect_false():
    model = M.MLP()
    assert to_grassmann(model, exclude=["fc1.weight"]) == ["fc2.weight"]
    model = M.MLP()
    with pytest.warns(UserWarning, match="unchanged"):
        assert to_grassmann(model, detect=False) == []
    assert grassmann_names(model) == []


def test_keeps_requires_grad_dtype_and_hooks():
    model = M.MLP().to(torch.bfloat16)
    model.fc1.weight.requires_grad_(False)
    names = to_grassmann(model)
    assert names == ["fc1.weight", "fc2.weight"]
    assert model.fc1.weight.requires_grad is False and model.fc2.weight.requires_grad
    assert model.fc1.weight.dtype == torch.bfloat16
    assert_unit_rows(model.fc1.weight.float(), tol=1e-2)
    assert model.fc1.weight in list(model.parameters())


def test_zero_row_raises_and_converts_nothing():
    model = M.MLP()
    with torch.no_grad():
        model.fc2.weight[3] = 0.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'fc2.weight': row 3 is zero"):
        to_grassmann(model)
    assert grassmann_names(model) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # excluding it converts the rest
    assert to_grassmann(model, exclude=["fc2.weight"]) == ["fc1.weight"]


def test_non_finite_row_raises():
    model = M.MLP()
    with torch.no_grad():
        model.fc1.weight[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"'fc1.weight': row 2 is not finite"):
        to_grassmann(model)
    assert grassmann_names(model) == []


def test_no_batchnorm_fed_weight_warns_and_leaves_model_alone():
    model = M.NoBN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no weight of NoBN feeds a BatchNorm"):
        assert to_grassmann(model) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert grassmann_names(model) == []


def test_only_tall_weights_warning_mentions_all_shapes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 8), nn.BatchNorm1d(8))
    with pytest.warns(UserWarning, match="all_shapes=True"):
        assert to_grassmann(model) == []
    assert to_grassmann(model, all_shapes=True) == ["1.weight"]


def test_untraceable_model():
    with pytest.raises(UntraceableModelError, match=r"include=\["):
        to_grassmann(M.Untraceable())
    model = scramble(M.Untraceable(bn_eps=EPS))
    x = warm_up(model, (6, 6))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="not rescaled"):
        assert to_grassmann(model, include=["fc.weight"], detect=False) == ["fc.weight"]
    model.train()
    ref.train()
    # train mode (batch statistics) is unchanged; only the running statistics are stale
    torch.testing.assert_close(model(x), ref(x), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": "fc1.weight"}, TypeError, "list of parameter names"),
        ({"include": [3]}, TypeError, "parameter names"),
        ({"include": ["fc1.wieght"]}, ValueError, "did you mean"),
        ({"exclude": ["nope"]}, ValueError, "no parameter 'nope'"),
        ({"include": ["fc1.weight"], "exclude": ["fc1.weight"]}, ValueError, "both"),
        ({"include": ["fc1.bias"]}, ValueError, "1 dimension"),
        ({"all_shapes": 1}, TypeError, "bool"),
        ({"detect": "yes"}, TypeError, "bool"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = M.MLP()
    with pytest.raises(error, match=match):
        to_grassmann(model, **kwargs)
    assert grassmann_names(model) == []


def test_bad_weights_by_name():
    with pytest.raises(TypeError, match="nn.Module"):
        to_grassmann(torch.zeros(3, 3))
    model = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="G\\(1,1\\)"):
        to_grassmann(model, include=["0.weight"])
    model = M.MLP()
    model.fc1.weight = geoopt.ManifoldParameter(
        torch.nn.functional.normalize(model.fc1.weight.detach(), dim=1), manifold=geoopt.Sphere()
    )
    with pytest.raises(ValueError, match="already a ManifoldParameter on Sphere"):
        to_grassmann(model, include=["fc1.weight"])
    assert to_grassmann(model) == ["fc2.weight"]  # a Sphere weight is left alone
    lazy = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="uninitialized"):
        to_grassmann(lazy, include=["0.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_stays_on_its_device():
    model = scramble(M.DenseNet(bn_eps=EPS))
    x = warm_up(model, (2, 3, 8, 8)).cuda()
    model.cuda()
    ref = copy.deepcopy(model)
    names = to_grassmann(model, example_inputs=x)
    for name in names:
        assert model.get_parameter(name).device == x.device
    for buf in model.buffers():
        assert buf.device == x.device
    assert_same_function(model, ref, x)
