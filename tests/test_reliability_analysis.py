"""The dataflow analysis never calls a weight scale invariant when it is not (issue 12).

Every verdict here is checked against the numerical ground truth of tests/ground_truth.py
(each row times its own random positive factor, float64, train mode): items 5 (a Linear's
input rank), 6 (frozen BatchNorm, models in eval mode) and 16 (torch.compile'd models).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rbn_geoopt.nn import find_scale_invariant, to_grassmann
from tests.ground_truth import assert_no_false_positive, truly_invariant

torch.set_num_threads(1)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------- item 5: a Linear's input rank
def test_linear_on_3d_input_is_not_invariant_without_example_inputs():
    """(N, C, L) -> Linear(L, 4) -> BatchNorm1d(C = 4): BN normalises dim 1, not the rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    x = _randn(8, 4, 6)
    assert not truly_invariant(model, "0.weight", x)
    f = find_scale_invariant(model)["0.weight"]
    assert not f.invariant
    assert "rank" in f.reason and "example_inputs" in f.reason and "Linear '0'" in f.reason
    f = find_scale_invariant(model, example_inputs=x)["0.weight"]
    assert not f.invariant and "more than one row" in f.reason
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no weight"):
        assert to_grassmann(model) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_linear_on_2d_input_needs_example_inputs_or_rank_evidence():
    torch.manual_seed(0)
    x = _randn(8, 6)
    bare = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    assert truly_invariant(bare, "0.weight", x)
    assert not find_scale_invariant(bare)["0.weight"].invariant  # the rank is unknown
    assert find_scale_invariant(bare, example_inputs=x)["0.weight"].invariant
    assert to_grassmann(bare, example_inputs=x) == ["0.weight"]

    flat = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    f = find_scale_invariant(flat)["1.weight"]
    assert f.invariant and f.batchnorms == ("2",)
    for shape in ((8, 6), (8, 2, 3)):  # flatten(1) makes both 2-D
        assert truly_invariant(flat, "1.weight", _randn(*shape))


class _Viewed(nn.Module):
    """view(N, -1), then two Linear -> BatchNorm1d stages (the second inherits the rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5, bias=False)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)
        self.bn2 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.fc1(x.view(x.size(0), -1))))
        return self.bn2(self.fc2(y))


class _Tokens(nn.Module):
    """x.flatten(2) proves a 3-D input: the Linear's rows land on dim -1, BatchNorm1d
    normalises dim 1 (the positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, 2, 2)
        return self.bn(self.fc(x.flatten(2)))


def test_rank_evidence_from_the_graph():
    _Viewed().train()(_randn(8, 2, 3))
    findings = find_scale_invariant(_Viewed())
    assert findings["fc1.weight"].invariant and findings["fc2.weight"].invariant
    assert_no_false_positive(_Viewed().train(), findings, _randn(8, 2, 3))

    x = _randn(8, 4, 2, 2)
    assert not find_scale_invariant(_Tokens())["fc.weight"].invariant
    f = find_scale_invariant(_Tokens(), example_inputs=x)["fc.weight"]
    assert not f.invariant and "more than one row" in f.reason
    assert not truly_invariant(_Tokens().train(), "fc.weight", x)


_INPUTS = {2: (8, 5), 3: (8, 4, 5), 4: (8, 4, 2, 5)}  # dim 1 = 4 = out_features


class _Chain(nn.Module):
    """x -> pre -> Linear(., 4) -> post -> BatchNorm1d(dim 1): a small grammar of layouts."""

    def __init__(self, rank: int, pre: str, post: str, bias: bool) -> None:
        super().__init__()
        self.pre_op, self.post_op = pre, post
        self.flatten = nn.Flatten()
        x = self.pre(torch.zeros(_INPUTS[rank]))
        self.fc = nn.Linear(x.shape[-1], 4, bias=bias)
        y = self.post(self.fc(x))
        if y.dim() not in (2, 3):
            raise ValueError("BatchNorm1d needs 2-D or 3-D")
        self.bn = nn.BatchNorm1d(y.shape[1])

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        op = self.pre_op
        if op == "flatten1":
            return x.flatten(1)
        if op == "Flatten":
            return self.flatten(x)
        if op == "view":
            return x.view(x.size(0), -1)
        if op == "flatten2":
            return torch.flatten(x, 2)
        if op == "transpose":
            return x.transpose(1, 2)
        return x

    def post(self, y: torch.Tensor) -> torch.Tensor:
        op = self.post_op
        if op == "relu":
            return F.relu(y)
        if op == "transpose":
            return y.transpose(1, 2)
        if op == "flatten1":
            return y.flatten(1)
        if op == "mean":
            return y.mean(1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.post(self.fc(self.pre(x))))


@settings(max_examples=40, deadline=None)
@given(
    rank=st.sampled_from([2, 3, 4]),
    pre=st.sampled_from(["none", "flatten1", "Flatten", "view", "flatten2", "transpose"]),
    post=st.sampled_from(["none", "relu", "transpose", "flatten1", "mean"]),
    bias=st.booleans(),
)
@example(rank=3, pre="none", post="none", bias=True)  # issue 12, item 5 as filed
def test_linear_layouts_against_ground_truth(rank, pre, post, bias):
    """Structural verdicts never claim more than the truth; with shapes they are exact."""
    torch.manual_seed(rank)
    try:
        model = _Chain(rank, pre, post, bias).train()
    except (RuntimeError, IndexError, ValueError):
        return  # this combination does not run
    x = _randn(*_INPUTS[rank])
    truth = truly_invariant(model, "fc.weight", x)
    structural = find_scale_invariant(model)["fc.weight"]
    assert not structural.invariant or truth, structural.reason
    exact = find_scale_invariant(model, example_inputs=x)["fc.weight"]
    assert exact.invariant == truth, exact.reason


# ---------------------------------------------------------- item 6: frozen BatchNorm
def _conv_net(track: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4, track_running_stats=track),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.Flatten(),
    )


def test_frozen_batchnorm_is_an_affine_map():
    x = _randn(6, 3, 6, 6)
    model = _conv_net().train()
    model(x)  # running statistics away from their initial values
    model[1].eval()  # frozen, as when fine-tuning
    assert not truly_invariant(model, "0.weight", x)
    findings = find_scale_invariant(model)
    f = findings["0.weight"]
    assert not f.invariant and "frozen BatchNorm" in f.reason and "affine map" in f.reason
    assert findings["3.weight"].invariant
    assert_no_false_positive(model, findings, x)
    assert not find_scale_invariant(model, example_inputs=x)["0.weight"].invariant
    assert to_grassmann(model, all_shapes=True) == ["3.weight"]
    assert not model[1].training and model.training  # the flags are left as they were


def test_batchnorm_without_running_stats_normalises_in_eval():
    x = _randn(6, 3, 6, 6)
    model = _conv_net(track=False).train()
    model[1].eval()  # no running statistics: batch statistics in eval mode too
    assert truly_invariant(model, "0.weight", x)
    assert find_scale_invariant(model)["0.weight"].invariant


def test_model_in_eval_mode_is_analysed_as_trained_with_a_warning():
    x = _randn(6, 3, 6, 6)
    model = _conv_net().train()
    model(x)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    for kwargs in ({}, {"example_inputs": x}):
        with pytest.warns(UserWarning, match="eval mode: analysed as model.train") as record:
            findings = find_scale_invariant(model, **kwargs)
        assert record[0].filename == __file__  # points at the caller
        assert findings["0.weight"].invariant and findings["3.weight"].invariant
        assert not any(m.training for m in model.modules())  # still in eval mode
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert_no_false_positive(copy.deepcopy(model).train(), findings, x)


class _Functional(nn.Module):
    """conv -> F.batch_norm with the given ``training`` on its own running statistics."""

    def __init__(self, training: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.training_arg = training
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(
            self.conv(x), self.mean, self.var, training=self.training_arg, eps=self.eps
        )
        return y.flatten(1)


@pytest.mark.parametrize("training", [False, True])
def test_functional_batch_norm(training):
    x = _randn(6, 3, 5, 5)
    model = _Functional(training).train()
    assert truly_invariant(model, "conv.weight", x) is training
    for kwargs in ({}, {"example_inputs": x}):
        f = find_scale_invariant(model, **kwargs)["conv.weight"]
        assert f.invariant is training, f.reason
        if training:
            assert f.batchnorms == ("batch_norm",)  # statistics of the root: the node name
        else:
            assert "frozen BatchNorm" in f.reason and "affine map" in f.reason


# --------------------------------------------------------- item 16: torch.compile
def test_compiled_model_is_unwrapped():
    x = _randn(6, 3, 6, 6)
    model = _conv_net().train()
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # compiled once before the conversion
    findings = find_scale_invariant(compiled)
    names = [n for n, p in compiled.named_parameters() if p.dim() >= 2]
    assert list(findings) == names == ["_orig_mod.0.weight", "_orig_mod.3.weight"]
    assert all(f.invariant and f.name in names for f in findings.values())
    ref = copy.deepcopy(model)
    assert to_grassmann(compiled, all_shapes=True) == names
    assert to_grassmann(compiled, include=["_orig_mod.0.weight"]) == names  # idempotent
    torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=0)  # rows kept: outputs too
    for mode in ("train", "eval"):
        getattr(compiled, mode)()
        out = compiled(x)  # recompiled for the new parameters: the same as eager
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
