"""The paper's recipe: param groups, one optimizer, the x0.2 schedule, training that learns."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rbn_geoopt.nn import (
    orthogonality_penalty,
    paper_optimizer,
    paper_param_groups,
    paper_scheduler,
    to_grassmann,
)
from rbn_geoopt.optim import SGDG, AdamG
from tests import models as M

torch.set_num_threads(1)


def converted(factory=M.MLP, **kwargs):
    torch.manual_seed(0)
    model = factory(**kwargs)
    to_grassmann(model)
    return model


def test_groups_sgdg_defaults():
    model = converted()
    groups = paper_param_groups(model, "sgdg")
    assert [g["param_names"] for g in groups] == [
        ["fc1.weight", "fc2.weight"],
        ["head.weight"],
        ["fc1.bias", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "head.bias"],
    ]
    g, decay, no_decay = groups
    assert g["lr"] == 0.2 and g["momentum"] == 0.9 and g["grad_clip"] == 0.1
    assert g["omega"] == 0.1 and g["weight_decay"] == 0.0 and "betas" not in g
    for e, wd in ((decay, 5e-4), (no_decay, 0.0)):
        assert e["euclidean"] == "sgd" and e["nesterov"] is True
        assert (e["lr"], e["momentum"], e["weight_decay"], e["omega"]) == (0.01, 0.9, wd, 0.0)
    assert [p for group in groups for p in group["params"]] == [
        model.get_parameter(n) for group in groups for n in group["param_names"]
    ]


def test_groups_adamg_defaults_and_overrides():
    model = converted()
    g = paper_param_groups(model, "adamg")[0]
    assert (g["lr"], g["betas"], g["eps"], g["grad_clip"], g["omega"]) == (
        0.05,
        (0.9, 0.99),
        1e-8,
        0.1,
        0.1,
    )
    groups = paper_param_groups(
        model,
        "adamg",
        lr_g=0.01,
        betas=(0.8, 0.9),
        eps=1e-6,
        grad_clip=None,
        omega=0.0,
        lr=0.1,
        momentum=0.5,
        nesterov=False,
        weight_decay=1e-3,
        norm_bias_weight_decay=1e-4,
    )
    g, decay, no_decay = groups
    assert (g["lr"], g["betas"], g["eps"], g["grad_clip"], g["omega"]) == (
        0.01,
        (0.8, 0.9),
        1e-6,
        None,
        0.0,
    )
    assert (decay["lr"], decay["momentum"], decay["nesterov"], decay["weight_decay"]) == (
        0.1,
        0.5,
        False,
        1e-3,
    )
    assert no_decay["weight_decay"] == 1e-4


def test_optimizer_types_and_one_scheduler():
    model = converted(M.PostActResNet)
    sgdg = paper_optimizer(model, "sgdg")
    adamg = paper_optimizer(model, "adamg", foreach=True)
    assert type(sgdg) is SGDG and type(adamg) is AdamG
    assert {g["foreach"] for g in sgdg.param_groups} == {None}
    assert {g["foreach"] for g in adamg.param_groups} == {True}
    sched = paper_scheduler(sgdg, 10)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in sgdg.param_groups])
        sgdg.step()
        sched.step()
    expected = [0.2] * 3 + [0.04] * 3 + [0.008] * 2 + [0.0016] * 2
    torch.testing.assert_close([lr[0] for lr in lrs], expected)
    torch.testing.assert_close([lr[1] for lr in lrs], [e / 20 for e in expected])
    assert sorted(paper_scheduler(adamg, 200).milestones) == [60, 120, 160]


def test_euclidean_groups_step_like_torch_nesterov_sgd():
    """Non-G(1,n) parameters follow torch.optim.SGD with the recipe's groups exactly."""
    model = converted().double()
    opt = paper_optimizer(model, "adamg")
    ref = copy.deepcopy(model)
    ref_groups = [
        {"params": [ref.get_parameter(n) for n in g["param_names"]], **hyper}
        for g in opt.param_groups[1:]
        for hyper in [{k: g[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}]
    ]
    ref_opt = torch.optim.SGD(ref_groups, lr=0.01)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for group in opt.param_groups[1:]:
        for name in group["param_names"]:
            torch.testing.assert_close(
                model.get_parameter(name), ref.get_parameter(name), rtol=0, atol=1e-15
            )


def _teacher_data(n=256, d=20, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, classes, generator=gen)
    return x, (x @ w).argmax(1)


def _image_data(n=128, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    w = torch.randn(3 * 4, classes, generator=gen)
    feats = F.adaptive_avg_pool2d(x, 2).flatten(1)[:, :12]
    return x, (feats @ w).argmax(1)


def _train(model, opt, x, y, steps, batch):
    model.train()
    losses = []
    grassmann = [p for n, p in model.named_parameters() if hasattr(p, "manifold")]
    assert grassmann
    start = [torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1) for p in grassmann]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for p, norms0 in zip(grassmann, start, strict=True):  # each row keeps its norm
            norms = torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1)
            torch.testing.assert_close(norms, norms0, rtol=1e-5, atol=0)
    model.eval()
    with torch.no_grad():
        full = F.cross_entropy(model(x), y).item()
    return losses, full


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_mlp_learns_with_the_recipe(method):
    x, y = _teacher_data()
    model = converted(M.MLP)
    with torch.no_grad():
        start = F.cross_entropy(model.eval()(x), y).item()
    opt = paper_optimizer(model, method)
    losses, final = _train(model, opt, x, y, steps=40, batch=64)
    assert final < 0.6 * start, (start, final, losses[::8])
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_resnet_learns_with_the_recipe(method):
    x, y = _image_data()
    model = converted(M.PostActResNet)
    with torch.no_grad():
        start = F.cross_entropy(model.eval()(x), y).item()
    opt = paper_optimizer(model, method)
    losses, final = _train(model, opt, x, y, steps=30, batch=32)
    assert final < 0.7 * start, (start, final, losses[::6])
    assert orthogonality_penalty(model, 0.1).item() >= 0


def test_bad_recipe_input():
    model = converted()
    with pytest.raises(ValueError, match="method"):
        paper_param_groups(model, "sgd")
    with pytest.raises(ValueError, match="Adam-G's"):
        paper_param_groups(model, "sgdg", betas=(0.9, 0.9))
    with pytest.raises(ValueError, match="SGD-G's"):
        paper_param_groups(model, "adamg", momentum_g=0.5)
    with pytest.raises(ValueError, match="lr"):
        paper_param_groups(model, lr=-1.0)
    with pytest.raises(TypeError, match="weight_decay"):
        paper_param_groups(model, weight_decay="5e-4")
    with pytest.raises(TypeError, match="nn.Module"):
        paper_param_groups(list(model.parameters()))
    with pytest.raises(TypeError, match="unexpected keyword"):
        paper_optimizer(model, "sgdg", momentum_e=0.1)
    with pytest.warns(UserWarning, match="to_grassmann"):
        paper_param_groups(M.MLP())
    opt = paper_optimizer(model)
    for total, milestones in ((2, (0.3, 0.6, 0.8)), (0, (0.5,)), (10, (0.5, 1.2))):
        with pytest.raises(ValueError, match="total|milestones"):
            paper_scheduler(opt, total, milestones=milestones)
