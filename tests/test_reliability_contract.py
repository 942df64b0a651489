"""Issue 12 cases settled with the new optimizer layout: each test fails on the old code."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch

from rbn_geoopt import Grassmann1
from rbn_geoopt.optim import SGDG, AdamG


def _w(seed: int = 0, shape=(4, 6)) -> geoopt.ManifoldParameter:
    gen = torch.Generator().manual_seed(seed)
    return geoopt.ManifoldParameter(torch.randn(shape, generator=gen), manifold=Grassmann1())


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_compiled_step_is_refused_before_anything_changes(cls):
    w = _w()
    opt = cls([w], lr=0.1)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    with pytest.raises(Exception, match="torch.compile"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()
    assert torch.equal(w.detach(), before) and not opt.state


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_one_cycle_momentum_reaches_every_rule_of_the_group(cls):
    """OneCycleLR writes betas[0] (SGDG and AdamG declare betas): SGD-G's momentum and a
    plain group's SGD momentum follow it as torch.optim.SGD's would."""
    w, b = _w(), torch.nn.Parameter(torch.zeros(4))
    ref = torch.nn.Parameter(torch.zeros(4))
    opt = cls([{"params": [w]}, {"params": [b], "euclidean": "sgd", "momentum": 0.9}], lr=0.1)
    torch_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (opt, torch_opt)
    ]
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        g = torch.randn(4, generator=gen)
        w.grad, b.grad, ref.grad = torch.randn(4, 6, generator=gen), g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        for s in scheds:
            s.step()
        assert torch.equal(b, ref)  # the scheduled momentum, not the constructor's 0.9
    assert opt.param_groups[0]["betas"][0] != 0.95  # it cycled


def test_sgdg_manifold_momentum_follows_a_cycling_scheduler():
    w1, w2 = _w(), _w()
    a = SGDG([w1], lr=0.1, momentum=0.9)
    b = SGDG([w2], lr=0.1, momentum=0.5)
    a.param_groups[0]["max_momentum"] = 0.95  # as CyclicLR / OneCycleLR leave it
    a.param_groups[0]["betas"] = (0.5, 0.99)  # the momentum they set
    for _ in range(3):
        g = torch.randn(4, 6)
        w1.grad, w2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_grad_clip_must_be_positive_at_construction_and_in_add_param_group(cls, bad):
    with pytest.raises(ValueError, match="grad_clip"):
        cls([_w()], lr=0.1, grad_clip=bad)
    opt = cls([_w()], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*grad_clip"):
        opt.add_param_group({"params": [_w(1)], "grad_clip": bad})
    assert len(opt.param_groups) == 1


def test_adamg_eps_must_be_positive():
    with pytest.raises(ValueError, match="eps"):
        AdamG([_w()], lr=0.1, eps=0.0)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_the_same_tensor_twice_in_a_group_is_refused(cls):
    w = _w()
    # torch's add_param_group warns first (a future error); ours refuses the group
    with (
        pytest.warns(UserWarning, match="duplicate"),
        pytest.raises(ValueError, match="same tensor"),
    ):
        cls([w, w], lr=0.1)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_tensor_hyper_parameters_are_accepted(cls):
    w = _w()
    opt = cls([w], lr=torch.tensor(0.1), betas=(torch.tensor(0.9), 0.99))
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_deepcopy_keeps_stabilize_for_added_groups(cls):
    opt = copy.deepcopy(cls([_w()], lr=0.1, stabilize=5))
    opt.add_param_group({"params": [_w(1)]})
    assert opt.param_groups[1]["stabilize"] == 5


def test_adam_step_saved_as_a_number_is_loaded_as_a_tensor():
    w = _w()
    opt = AdamG([w], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = 1  # older torch checkpoints
    opt.load_state_dict(saved)
    assert torch.is_tensor(opt.state[w]["step"])
    w.grad = torch.randn_like(w)
    opt.step()
    assert float(opt.state[w]["step"]) == 2


def test_meta_parameters_are_refused_clearly():
    w = geoopt.ManifoldParameter(torch.empty(4, 6, device="meta"), manifold=Grassmann1())
    opt = SGDG([w], lr=0.1)
    w.grad = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        opt.step()


def test_lr_zero_with_momentum_keeps_moving_and_without_changes_no_bit():
    """The paper's rule d = momentum * tau - lr * h: lr = 0 does not freeze a point whose
    momentum is non-zero; with no momentum, nothing moves."""
    w = _w()
    opt = SGDG([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w.detach(), before)  # coasting on tau
    still = _w(2)
    plain = SGDG([still], lr=0.0)
    still.grad = torch.randn_like(still)
    before = still.detach().clone()
    plain.step()
    assert torch.equal(still.detach(), before)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_a_point_reinitialised_in_place_gets_its_momentum_reprojected(cls):
    """A stale momentum is made horizontal at the new point: its norm stays as it is."""
    w = _w()
    opt = cls([w], lr=0.1, **({"momentum": 0.9} if cls is SGDG else {}))
    w.grad = torch.randn_like(w)
    opt.step()
    with torch.no_grad():
        w.normal_()
    norms = w.detach().norm(dim=1)
    w.grad = torch.randn_like(w)
    opt.step()
    torch.testing.assert_close(w.detach().norm(dim=1), norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e-30), (torch.float64, 1e-170)])
def test_a_tiny_row_is_named_with_its_cause(dtype, value):
    w = geoopt.ManifoldParameter(torch.randn(4, 6, dtype=dtype), manifold=Grassmann1())
    with torch.no_grad():
        w[2] *= value
    opt = SGDG([("fc.weight", w)], lr=0.1)
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="'fc.weight' holds a vector of norm .* at row 2"):
        opt.step()


class MySGDG(SGDG):
    pass


def test_a_subclass_reloads_its_own_checkpoint():
    w = _w()
    opt = MySGDG([w], lr=0.1, momentum=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    MySGDG([w], lr=0.1, momentum=0.9).load_state_dict(opt.state_dict())
