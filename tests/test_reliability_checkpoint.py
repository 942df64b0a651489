"""Checkpoints: plain state, weights_only loading, bit-identical resume, clear refusals.

Model-level: a BatchNorm net converted by ``to_grassmann`` trained with the paper's recipe
(one optimizer, G(1,n) and plain groups, clipping, omega, stabilize), saved to a file and
resumed with ``torch.load(weights_only=True)``. Bad checkpoints (other shapes, missing or
unexpected keys, NaN state, other group layout) are refused before anything is loaded.
"""

from __future__ import annotations

import copy
import math

import geoopt
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rbn_geoopt import Grassmann1
from rbn_geoopt.nn import to_grassmann
from rbn_geoopt.optim import SGDG, AdamG

PLAIN_TYPES = (bool, int, float, str, type(None))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads would only contend for the cores (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)
        self.bn2 = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv(x))).mean(dim=(2, 3))
        return self.head(F.relu(self.bn2(self.fc(h))))


def _model(width: int = 6) -> _Net:
    torch.manual_seed(0)
    net = _Net(width)
    assert sorted(to_grassmann(net)) == ["conv.weight", "fc.weight"]
    return net


def _optimizer(net: nn.Module, method: str, stabilize: int | None = 3):
    named = dict(net.named_parameters())
    geometric = [(n, p) for n, p in named.items() if isinstance(p, geoopt.ManifoldParameter)]
    plain = [(n, p) for n, p in named.items() if not isinstance(p, geoopt.ManifoldParameter)]
    g_hyper = {"lr": 0.2, "momentum": 0.9} if method == "sgdg" else {"lr": 0.05}
    groups = [
        {"params": geometric, "grad_clip": 0.1, "omega": 0.1, **g_hyper},
        {"params": plain, "lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    ]
    cls = SGDG if method == "sgdg" else AdamG
    return cls(groups, lr=0.01, euclidean="sgd", stabilize=stabilize)


def _train(net, opt, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 3, 5, 5, generator=gen), torch.randint(0, 2, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def _walk(value, path="state_dict"):
    """Every leaf of a nested state dict, with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, PLAIN_TYPES), (path, k)
            yield from _walk(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_state_dict_holds_only_tensors_and_plain_values(method):
    net = _model()
    opt = _optimizer(net, method)
    _train(net, opt, range(2))
    leaves = list(_walk(opt.state_dict()))
    assert any(torch.is_tensor(v) for _, v in leaves)
    for path, value in leaves:
        assert type(value) is torch.Tensor or isinstance(value, PLAIN_TYPES), (path, value)


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_resume_from_a_weights_only_checkpoint_file_is_bit_identical(method, tmp_path):
    net = _model()
    opt = _optimizer(net, method)
    _train(net, opt, range(4))  # 4 steps: stabilize (every 3) has run once
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(net, opt, range(4, 10))

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = _optimizer(resumed, method)
    opt2.load_state_dict(checkpoint["opt"])
    assert isinstance(resumed.conv.weight, geoopt.ManifoldParameter)
    _train(resumed, opt2, range(4, 10))
    for (name, a), b in zip(net.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state[q][key]))


# ---------------------------------------------------------------- refused checkpoints
def _saved(method: str, width: int = 6) -> dict:
    net = _model(width)
    opt = _optimizer(net, method)
    _train(net, opt, range(2))
    return copy.deepcopy(opt.state_dict())


def _target(method: str):
    net = _model()
    opt = _optimizer(net, method)
    _train(net, opt, range(1))
    return net, opt, copy.deepcopy(opt.state_dict())


def _assert_load_refused(opt, before: dict, saved: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()  # nothing was loaded
    assert after["param_groups"] == before["param_groups"]
    for pid, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after["state"][pid][key]), torch.as_tensor(value))


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_state_for_differently_shaped_parameters_is_refused_naming_the_parameter(method):
    """Width 8 instead of 6: same number of parameters per group, other shapes."""
    saved = _saved(method, width=8)
    _, opt, before = _target(method)
    key = "momentum_buffer" if method == "sgdg" else "exp_avg"
    _assert_load_refused(
        opt,
        before,
        saved,
        rf"state '{key}' of parameter 'conv.weight' has shape \(8, 3, 3, 3\), expected "
        r"\(6, 3, 3, 3\)",
    )


def test_per_point_second_moment_of_the_wrong_shape_is_refused():
    saved = _saved("adamg")
    conv_id = saved["param_groups"][0]["params"][0]
    saved["state"][conv_id]["exp_avg_sq"] = torch.ones(6, 27)  # per coordinate, not per point
    _, opt, before = _target("adamg")
    _assert_load_refused(
        opt, before, saved, r"'exp_avg_sq' of parameter 'conv.weight' has shape \(6, 27\)"
    )


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_unnamed_parameter_is_named_by_group_index_and_shape(method):
    w = geoopt.ManifoldParameter(torch.randn(3, 5), manifold=Grassmann1())
    cls = SGDG if method == "sgdg" else AdamG
    opt = cls([w], lr=0.1, momentum=0.9) if method == "sgdg" else cls([w], lr=0.1)
    w.grad = torch.randn(3, 5)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    v = geoopt.ManifoldParameter(torch.randn(4, 5), manifold=Grassmann1())
    other = cls([v], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(4, 5\)\)"):
        other.load_state_dict(saved)


def test_entry_lacking_some_of_its_keys_is_refused():
    saved = _saved("adamg")
    fc_id = saved["param_groups"][0]["params"][1]
    del saved["state"][fc_id]["exp_avg"]
    _, opt, before = _target("adamg")
    _assert_load_refused(opt, before, saved, r"state of parameter 'fc.weight' lacks key\(s\)")


def test_state_from_another_optimizer_is_refused_by_its_keys():
    """An AdamG state loaded into SGDG (same groups) would silently lose the moments."""
    saved = _saved("adamg")
    _, opt, before = _target("sgdg")
    _assert_load_refused(opt, before, saved, r"'conv.weight' has unexpected key\(s\)")


def test_non_finite_saved_state_is_refused():
    saved = _saved("sgdg")
    fc_id = saved["param_groups"][0]["params"][1]
    saved["state"][fc_id]["momentum_buffer"][0, 0] = math.nan
    _, opt, before = _target("sgdg")
    _assert_load_refused(opt, before, saved, "'momentum_buffer' of parameter 'fc.weight' holds")


def test_other_group_layout_is_refused_with_counts():
    saved = _saved("sgdg")
    _, opt, before = _target("sgdg")
    fewer = copy.deepcopy(saved)
    fewer["param_groups"] = fewer["param_groups"][:1]
    _assert_load_refused(opt, before, fewer, r"different number of parameter groups \(1, .* 2\)")
    shorter = copy.deepcopy(saved)
    shorter["param_groups"][0]["params"] = shorter["param_groups"][0]["params"][:1]
    _assert_load_refused(opt, before, shorter, "group 0 holds 1 parameter.* and 2 here")


def test_saved_hyper_parameters_are_validated_before_loading():
    saved = _saved("sgdg")
    saved["param_groups"][0]["weight_decay"] = 1e-4  # projected away on G(1,n)
    _, opt, before = _target("sgdg")
    _assert_load_refused(opt, before, saved, "weight_decay=0.0001 on the Grassmann1 parameter")


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_parameter_missing_from_the_saved_state_starts_fresh_as_in_torch(method):
    """fc.weight's entry is removed: it resumes as in a fresh optimizer, the rest resume."""
    net = _model()
    opt = _optimizer(net, method, stabilize=None)
    _train(net, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    fc_id = saved["param_groups"][0]["params"][1]
    del saved["state"][fc_id]

    resumed = copy.deepcopy(net)
    opt2 = _optimizer(resumed, method, stabilize=None)
    opt2.load_state_dict(saved)
    assert resumed.fc.weight not in opt2.state
    fresh = copy.deepcopy(net)  # reference for fc.weight: new optimizer, same weights
    opt3 = _optimizer(fresh, method, stabilize=None)
    opt3.load_state_dict({**saved, "state": {}})  # same hyper-parameters and counters
    for model, optimizer in ((net, opt), (resumed, opt2), (fresh, opt3)):
        _train(model, optimizer, range(3, 4))  # same weights: same gradients
    assert torch.equal(resumed.conv.weight, net.conv.weight)  # its state was loaded
    assert not torch.equal(resumed.conv.weight, fresh.conv.weight)
    assert torch.equal(resumed.fc.weight, fresh.fc.weight)  # started fresh ...
    assert not torch.equal(resumed.fc.weight, net.fc.weight)  # ... so it lost its state
