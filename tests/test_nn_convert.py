"""to_grassmann: rows kept as they are, outputs identical in train and eval mode with the
layers' own BatchNorm eps, rows the optimizers cannot step refused, idempotency, bad input."""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch
import torch.nn as nn

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.nn import (
    UntraceableModelError,
    find_scale_invariant,
    paper_optimizer,
    to_grassmann,
)
from rbn_geoopt.optim import SGDG, AdamG
from rbn_geoopt.optim._fused import limits
from tests import models as M

torch.set_num_threads(1)

EPSES = [1e-5, 1e-3]  # the layers' own BatchNorm eps (torch's default, and a large one)


@pytest.fixture(autouse=True)
def _seeded():
    """Models draw their initial weights from the global generator: make that repeatable."""
    torch.manual_seed(0)


def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64; every weight row times a random factor in [1e-3, 1e3] (log-uniform: rows of
    widely different norms, as after training); random BN affine."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                scale = torch.empty((p.shape[0],) + (1,) * (p.dim() - 1), dtype=p.dtype)
                p.mul_(10.0 ** scale.uniform_(-3.0, 3.0, generator=gen))
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


def assert_same_function(model, ref, x, exact=True):
    """Eval, then train (which updates the running stats of both), then eval again: the
    outputs and every buffer bit-identical (the conversion only retypes the weights).
    ``exact=False`` (CUDA, whose conv algorithms need not be deterministic): to 1e-12."""

    def same(a, b, what):
        if exact:
            assert torch.equal(a, b), (what, float((a - b).abs().max()))
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)

    for mode in ("eval", "train", "eval"):
        getattr(model, mode)()
        getattr(ref, mode)()
        same(model(x), ref(x), mode)
    for (name, buf), (_, old) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        same(buf, old, name)


def assert_kept(model, ref, names):
    """Every converted weight holds the old values bit for bit (dtype, layout, grad flag);
    every other parameter and buffer is untouched."""
    for name, old in ref.named_parameters():
        new = model.get_parameter(name)
        assert torch.equal(new.detach(), old.detach()), name
        assert (new.dtype, new.stride(), new.requires_grad) == (
            old.dtype,
            old.stride(),
            old.requires_grad,
        ), name
        assert isinstance(new, geoopt.ManifoldParameter) == (name in names), name
    for (name, buf), (_, old) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(buf, old), name


def grassmann_names(model):
    return sorted(n for n, p in model.named_parameters() if isinstance(p, geoopt.ManifoldParameter))


@pytest.mark.parametrize("factory", list(M.EXPECTED), ids=lambda f: f.__name__)
@pytest.mark.parametrize("all_shapes", [False, True])
@pytest.mark.parametrize("bn_eps", EPSES)
def test_outputs_kept_after_conversion(factory, all_shapes, bn_eps):
    """Rows of norms 1e-3..1e3 (as after training), the layers' own eps: the same weights,
    biases and running statistics, the same outputs bit for bit in train and eval mode."""
    shape, expected = M.EXPECTED[factory]
    model = scramble(factory(bn_eps=bn_eps))
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
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x)


def test_all_shapes_adds_the_tall_weights():
    assert "depthwise.weight" in to_grassmann(M.GroupedNet(), all_shapes=True)
    assert "layer2.short_conv.weight" in to_grassmann(M.PostActResNet(), all_shapes=True)


def test_flatten_and_token_layouts_with_example_inputs():
    shape = (5, 3, 4, 4)
    model = scramble(M.FlattenToBN(bn_eps=1e-3))
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
    """Not scale invariant (bias then ReLU): converted by name with a warning, outputs kept."""
    model = scramble(M.BiasPaths(bn_eps=1e-3))
    x = warm_up(model, (4, 3, 6, 6))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="bias_relu_bn.weight' is not scale invariant.*kept"):
        names = to_grassmann(model, include=["bias_relu_bn.weight"])
    assert "bias_relu_bn.weight" in names
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x)


def test_tied_weights_by_name():
    model = scramble(M.TiedAndTransposed(bn_eps=1e-3))
    x = warm_up(model, (3, 4, 6, 6))
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied but scale invariant: no warning
        names = to_grassmann(model, include=["twice.weight", "share_b.weight"])
    assert names == ["twice.weight", "share_a.weight", "plain.weight"]
    assert model.share_a.weight is model.share_b.weight
    assert isinstance(model.share_b.weight, geoopt.ManifoldParameter)
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x)


@pytest.mark.parametrize(
    ("factory", "shape", "by_name"),
    [
        (M.TiedAndTransposed, (3, 4, 6, 6), ["up.weight"]),
        # the paper's code picks weights by name, conv2 included (summed into the residual)
        (M.PreActWRN, (2, 3, 8, 8), [f"block{i}.conv2.weight" for i in (1, 2, 3)]),
    ],
    ids=["transposed", "wrn-by-name"],
)
def test_not_invariant_by_name_warns_that_the_norm_is_frozen_and_keeps_outputs(
    factory, shape, by_name
):
    model = scramble(factory(bn_eps=1e-3))
    x = warm_up(model, shape)
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"weight' is not scale invariant.*keep each row's norm"):
        names = to_grassmann(model, include=by_name)
    assert set(by_name) <= set(names)
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x)


def test_idempotent():
    model = scramble(M.DenseNet(bn_eps=1e-3))
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
    ref = copy.deepcopy(model)
    names = to_grassmann(model)
    assert names == ["fc1.weight", "fc2.weight"]
    assert model.fc1.weight.requires_grad is False and model.fc2.weight.requires_grad
    assert model.fc1.weight.dtype == torch.bfloat16
    assert torch.equal(model.fc1.weight, ref.fc1.weight)  # bfloat16 rows kept as they are
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
    model = scramble(M.Untraceable(bn_eps=1e-3))
    x = warm_up(model, (6, 6))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="scale invariance was not checked"):
        assert to_grassmann(model, include=["fc.weight"], detect=False) == ["fc.weight"]
    assert_kept(model, ref, ["fc.weight"])
    assert_same_function(model, ref, x)


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
    model = scramble(M.DenseNet(bn_eps=1e-3))
    x = warm_up(model, (2, 3, 8, 8)).cuda()
    model.cuda()
    ref = copy.deepcopy(model)
    names = to_grassmann(model, example_inputs=x)
    for name in names:
        assert model.get_parameter(name).device == x.device
    for buf in model.buffers():
        assert buf.device == x.device
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x, exact=False)


# ------------------------------------------------- trained-looking models, norm-keeping steps
@pytest.mark.parametrize(
    ("factory", "widths", "shape"),
    [("VGGNet", (4, 8, 8, 8), (6, 1, 28, 28)), ("PreActResNet", (4, 8, 8), (6, 1, 12, 12))],
)
def test_study_models_keep_outputs_with_their_own_eps(factory, widths, shape):
    """The comparison studies' nets (a VGG, a pre-activation ResNet with residual blocks),
    BatchNorm at torch's default eps 1e-5, rows of norms 1e-3..1e3: outputs bit-identical."""
    from comparisons import models as CM

    model = scramble(getattr(CM, factory)(widths))
    x = warm_up(model, shape)
    ref = copy.deepcopy(model)
    names = to_grassmann(model, all_shapes=True)
    assert len(names) >= 3
    assert_kept(model, ref, names)
    assert_same_function(model, ref, x)


def _row_norms(param: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(param.detach().reshape(param.shape[0], -1).double(), dim=1)


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind.startswith("paper-"):
        return paper_optimizer(model, kind.removeprefix("paper-"))
    g = [p for p in model.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    rest = [p for p in model.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    if kind == "sgdg":
        return SGDG([{"params": g, "grad_clip": 0.1}, {"params": rest}], lr=0.2, momentum=0.9)
    return AdamG([{"params": g, "omega": 0.1}, {"params": rest}], lr=0.05)


@pytest.mark.parametrize("kind", ["paper-sgdg", "paper-adamg", "sgdg", "adamg"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_a_converted_model_keeps_each_rows_norm(kind, dtype):
    """Rows of norms 1e-3..1e3 stay at their norms (to float rounding) while they turn."""
    model = scramble(M.PostActResNet(bn_eps=1e-5)).to(dtype)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}  # before conversion
    names = to_grassmann(model)
    before = {n: trained[n] for n in names}
    opt = _optimizer(kind, model)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(6, 3, 8, 8, generator=gen).to(dtype)
        target = torch.randint(0, 5, (6,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    turned = []
    for name in names:
        after = model.get_parameter(name)
        old, new = _row_norms(before[name]), _row_norms(after)
        assert float(((new - old) / old).abs().max()) <= rtol, name
        cos = (before[name].double() * after.detach().double()).reshape(len(old), -1).sum(1)
        turned.append(float((1 - (cos / (old * new)).clamp(-1, 1)).max()))
    assert max(turned) > 1e-4  # the rows really moved


# ------------------------------------------------------------ rows the optimizers cannot step
def _mlp_with_row(dtype: torch.dtype, norm: float) -> nn.Module:
    """A warmed-up MLP whose fc2 row 3 has Euclidean norm ``norm``."""
    model = M.MLP().to(dtype)
    with torch.no_grad():
        model(torch.randn(8, 20, dtype=dtype))  # running statistics away from 0/1
        row = model.fc2.weight[3].double()
        model.fc2.weight[3] = (row * (norm / row.norm())).to(dtype)
    return model


@pytest.mark.parametrize(
    ("dtype", "norm", "side"),
    [
        (torch.float32, 1e-22, "below the smallest"),
        (torch.float32, 1e21, "above the largest"),
        (torch.float64, 1e-170, "below the smallest"),
        (torch.bfloat16, 1e-22, "below the smallest"),
    ],
)
def test_row_too_small_or_large_to_step_is_refused_and_nothing_changes(dtype, norm, side):
    model = _mlp_with_row(dtype, norm)
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"'fc2.weight': row 3 has norm .*{side}") as err:
        to_grassmann(model)
    message = str(err.value)
    assert "exclude=['fc2.weight']" in message and "Rescale" in message
    # the norm is computed without underflow/overflow: the true one, to its 3 digits
    reported = float(message.split("has norm ")[1].split(",")[0])
    assert reported == pytest.approx(norm, rel=2e-2 if dtype == torch.bfloat16 else 5e-3)
    # nothing changed: fc1 (checked first, fine) is not converted either
    assert grassmann_names(model) == []
    for name, p in model.named_parameters():
        assert p is params[name]
    assert_kept(model, ref, [])
    # excluding it converts the rest
    assert to_grassmann(model, exclude=["fc2.weight"]) == ["fc1.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("end", ["low", "high"])
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_conversion_refuses_exactly_the_rows_the_optimizers_refuse(dtype, end, factor):
    """One source of truth: just inside the step guard's range a row converts and steps;
    just outside both refuse it."""
    lo2, hi2, _ = limits(dtype)
    norm = (lo2 if end == "low" else hi2) ** 0.5 * factor
    outside = factor < 1 if end == "low" else factor > 1
    model = _mlp_with_row(dtype, norm)
    if outside:
        with pytest.raises(ValueError, match="row 3 has norm"):
            to_grassmann(model)
    else:
        assert to_grassmann(model) == ["fc1.weight", "fc2.weight"]
    point = geoopt.ManifoldParameter(model.fc2.weight.detach().clone(), manifold=Grassmann1())
    point.grad = torch.zeros_like(point)
    opt = SGDG([point], lr=0.1)
    if outside:
        with pytest.raises(ValueError, match="row 3"):
            opt.step()
    else:
        opt.step()
