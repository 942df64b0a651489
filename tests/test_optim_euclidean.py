"""Plain parameters follow torch.optim.SGD / torch.optim.Adam exactly; the paper's recipe.

float64; the bound asked for is 1e-12, and since torch's own functional cores do the work
the results are in fact bit-identical (torch.equal), which is what is asserted.
"""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import torch

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.optim import SGDG, AdamG
from tests.paper_reference import AdamGReference, SGDGReference

STEPS = 60
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in SHAPES]


def _grads(seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES] for _ in range(STEPS)
    ]


def _run_pair(ours, theirs, mine, ref, grads) -> float:
    worst = 0.0
    for step_grads in grads:
        for p, q, g in zip(mine, ref, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(mine, ref, strict=True):
            assert torch.equal(p, q)
            worst = max(worst, float((p - q).detach().abs().max()))
    return worst


SGD_CASES = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(weight_decay=1e-2),
]


@pytest.mark.parametrize("hyper", SGD_CASES, ids=str)
@pytest.mark.parametrize("cls, extra", [(SGDG, {}), (AdamG, {"euclidean": "sgd"})])
def test_plain_parameters_follow_torch_sgd(hyper, cls, extra):
    mine, ref = _params(), _params()
    ours = cls(mine, lr=0.03, **hyper, **extra)
    theirs = torch.optim.SGD(ref, lr=0.03, **hyper)
    assert _run_pair(ours, theirs, mine, ref, _grads()) <= 1e-12
    for p, q in zip(mine, ref, strict=True):
        if "momentum" in hyper:
            buf, torch_buf = ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"]
            assert torch.equal(buf, torch_buf)


ADAM_CASES = [
    dict(betas=(0.9, 0.999)),
    dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2),
    dict(betas=(0.5, 0.9), weight_decay=5e-4),
]


@pytest.mark.parametrize("hyper", ADAM_CASES, ids=str)
@pytest.mark.parametrize("cls, extra", [(AdamG, {}), (SGDG, {"euclidean": "adam"})])
def test_plain_parameters_follow_torch_adam(hyper, cls, extra):
    mine, ref = _params(), _params()
    ours = cls(mine, lr=0.01, **hyper, **extra)
    theirs = torch.optim.Adam(ref, lr=0.01, **hyper)
    assert _run_pair(ours, theirs, mine, ref, _grads()) <= 1e-12
    for p, q in zip(mine, ref, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key])


@pytest.mark.parametrize("foreach", [False, True])
def test_foreach_is_passed_to_torch_for_plain_parameters(foreach):
    for cls, torch_cls, hyper in (
        (SGDG, torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
        (AdamG, torch.optim.Adam, dict(betas=(0.9, 0.99), weight_decay=1e-3)),
    ):
        mine, ref = _params(), _params()
        ours = cls(mine, lr=0.01, foreach=foreach, **hyper)
        theirs = torch_cls(ref, lr=0.01, foreach=foreach, **hyper)
        _run_pair(ours, theirs, mine, ref, _grads()[:10])


def test_euclidean_manifold_parameter_follows_torch():
    """A ManifoldParameter on geoopt.Euclidean is a plain parameter: torch's rule."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    mine = [geoopt.ManifoldParameter(data.clone(), manifold=geoopt.Euclidean(ndim=1))]
    ref = [torch.nn.Parameter(data.clone())]
    ours = AdamG(mine, lr=0.01, weight_decay=1e-2)
    theirs = torch.optim.Adam(ref, lr=0.01, betas=(0.9, 0.99), weight_decay=1e-2)
    grads = [[torch.randn(4, 3, dtype=torch.float64, generator=gen)] for _ in range(20)]
    _run_pair(ours, theirs, mine, ref, grads)


def test_group_manifold_key_steps_plain_tensor_on_that_manifold():
    """FSDP2 strips the ManifoldParameter class: the group key 'manifold' stands in."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(5, 6, dtype=torch.float64, generator=gen) * 3
    plain = torch.nn.Parameter(data.clone())
    wrapped = geoopt.ManifoldParameter(data.clone(), manifold=Grassmann1())
    hyper = dict(lr=0.2, momentum=0.9, grad_clip=0.1, omega=0.1)
    a = SGDG([{"params": [plain], "manifold": Grassmann1()}], **hyper)
    b = SGDG([wrapped], **hyper)
    for _ in range(10):
        g = torch.randn(5, 6, dtype=torch.float64, generator=gen)
        plain.grad, wrapped.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(plain.detach(), wrapped.detach())
    assert torch.allclose(plain.norm(dim=1), data.norm(dim=1), rtol=1e-13)  # norms kept


@pytest.mark.parametrize("grassmann_rule", ["adamg", "sgdg"])
def test_paper_recipe_is_one_optimizer_and_one_scheduler(grassmann_rule):
    """Adam-G/SGD-G on G(1,n) + Nesterov SGD with weight decay elsewhere, one MultiStepLR."""
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(4, 9, dtype=torch.float64, generator=gen) * 2
    w = geoopt.ManifoldParameter(rows.clone(), manifold=Grassmann1())
    mine, ref = _params(), _params()
    rest = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if grassmann_rule == "adamg":
        g_hyper = dict(lr=0.05, grad_clip=0.1, omega=0.1)
        ours = AdamG(
            [{"params": [w], **g_hyper}, {"params": mine, "euclidean": "sgd", **rest}],
            lr=0.05,
        )
        paper = AdamGReference(rows.numpy(), betas=(0.9, 0.99), eps=1e-8, **g_hyper)
    else:
        g_hyper = dict(lr=0.2, momentum=0.9, grad_clip=0.1, omega=0.1)
        ours = SGDG([{"params": [w], **g_hyper}, {"params": mine, **rest}], lr=0.2)
        paper = SGDGReference(rows.numpy(), **g_hyper)
    theirs = torch.optim.SGD(ref, **rest)
    milestones = [8, 16]
    sched = torch.optim.lr_scheduler.MultiStepLR(ours, milestones=milestones, gamma=0.2)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=milestones, gamma=0.2)
    worst = 0.0
    for _epoch in range(24):
        gw = torch.randn(4, 9, dtype=torch.float64, generator=gen) * 0.5
        step_grads = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
        w.grad = gw.clone()
        for p, q, g in zip(mine, ref, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        paper.lr = ours.param_groups[0]["lr"]  # the lr this step used
        paper.step(gw.numpy())
        sched.step()
        torch_sched.step()
        for p, q in zip(mine, ref, strict=True):
            assert torch.equal(p, q)
        worst = max(worst, float(np.abs(w.detach().numpy() - paper.points).max()))
    assert worst < 1e-9
    lrs = [g["lr"] for g in ours.param_groups]
    assert lrs == pytest.approx([g_hyper["lr"] * 0.04, 0.01 * 0.04], rel=1e-12)
