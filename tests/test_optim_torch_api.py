"""torch conventions: state_dict, closures, schedulers, GradScaler, names, registry, errors."""

from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch
from geoopt.optim.mixin import OptimMixin

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.optim import OPTIMIZERS, SGDG, AdamG, create


# ------------------------------------------------------------------------ fixtures
def _tensors(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return {
        "g1": torch.randn(4, 6, dtype=dtype, generator=gen) * 2,
        "g3": torch.randn(3, 2, 2, 2, dtype=dtype, generator=gen),
        "half": torch.randn(5, 8, generator=gen).to(torch.bfloat16),
        "fsdp": torch.randn(3, 5, dtype=dtype, generator=gen),
        "sphere": geoopt.Sphere().projx(torch.randn(2, 4, dtype=dtype, generator=gen)),
        "w": torch.randn(3, 3, dtype=dtype, generator=gen),
        "b": torch.randn(3, dtype=dtype, generator=gen),
    }


def _params(data):
    return {
        "g1": geoopt.ManifoldParameter(data["g1"].clone(), manifold=Grassmann1()),
        "g3": geoopt.ManifoldParameter(data["g3"].clone(), manifold=Grassmann1(ndim=3)),
        "half": geoopt.ManifoldParameter(data["half"].clone(), manifold=Grassmann1()),
        "fsdp": torch.nn.Parameter(data["fsdp"].clone()),
        "sphere": geoopt.ManifoldParameter(data["sphere"].clone(), manifold=geoopt.Sphere()),
        "w": torch.nn.Parameter(data["w"].clone()),
        "b": torch.nn.Parameter(data["b"].clone()),
    }


def _build(cls, p):
    """Every kind of parameter and group this library knows, with names."""
    return cls(
        [
            {
                "params": [("g1", p["g1"]), ("g3", p["g3"]), ("half", p["half"])],
                "lr": 0.1,
                "grad_clip": 0.1,
                "omega": 0.1,
                "momentum": 0.9,
            },
            {"params": [("fsdp", p["fsdp"])], "manifold": Grassmann1(), "lr": 0.05},
            {"params": [("sphere", p["sphere"])], "weight_decay": 1e-3, "momentum": 0.5},
            {
                "params": [("w", p["w"])],
                "euclidean": "sgd",
                "momentum": 0.9,
                "nesterov": True,
                "weight_decay": 5e-4,
            },
            {"params": [("b", p["b"])], "euclidean": "adam", "weight_decay": 1e-2},
        ],
        lr=0.02,
        stabilize=3,
    )


def _grads(seed, p):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in p.items()}


def _step(opt, p, seed):
    for k, g in _grads(seed, p).items():
        p[k].grad = g
    opt.step()


# -------------------------------------------------------------------------- classes
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_classes_subclass_optim_mixin_then_torch_optimizer(cls):
    mro = cls.__mro__
    assert issubclass(cls, OptimMixin) and issubclass(cls, torch.optim.Optimizer)
    assert mro.index(OptimMixin) < mro.index(torch.optim.Optimizer)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_hyper_parameters_live_in_param_groups_and_are_saved(cls):
    p = _params(_tensors())
    saved = _build(cls, p).state_dict()["param_groups"]
    keys = {"lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps"}
    keys |= {"grad_clip", "omega", "euclidean", "foreach", "stabilize", "param_names"}
    for group in saved:
        assert keys <= set(group)
        assert "manifold" not in group  # structure, not state (weights_only loads)
    assert saved[0]["grad_clip"] == 0.1 and saved[3]["euclidean"] == "sgd"
    defaults = cls([torch.nn.Parameter(torch.zeros(2))], lr=0.1).defaults
    assert defaults["betas"] == (0.9, 0.99) and defaults["eps"] == 1e-8
    assert defaults["euclidean"] == ("sgd" if cls is SGDG else "adam")


# ----------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_resume_from_state_dict_is_bit_identical(cls):
    data = _tensors()
    p_run = _params(data)
    run = _build(cls, p_run)
    for seed in range(4):
        _step(run, p_run, seed)
    buffer = io.BytesIO()
    torch.save(
        {"params": {k: v.detach() for k, v in p_run.items()}, "opt": run.state_dict()}, buffer
    )
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    p_res = _params({k: v.clone() for k, v in checkpoint["params"].items()})
    resumed = _build(cls, p_res)
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.state[p_res["half"]]["exp_avg" if cls is AdamG else "momentum_buffer"].dtype == (
        torch.float32
    )
    assert isinstance(resumed.param_groups[1]["manifold"], Grassmann1)
    for seed in range(4, 10):
        _step(run, p_run, seed)
        _step(resumed, p_res, seed)
        for k in p_run:
            assert torch.equal(p_run[k], p_res[k]), k
    for k in p_run:
        a, b = run.state[p_run[k]], resumed.state[p_res[k]]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (k, key)
            assert torch.as_tensor(a[key]).dtype == torch.as_tensor(b[key]).dtype


def test_load_state_dict_keeps_float32_state_of_half_params_unrounded():
    data = _tensors()
    p = _params(data)
    opt = _build(AdamG, p)
    for seed in range(3):
        _step(opt, p, seed)
    saved = copy.deepcopy(opt.state_dict())
    p2 = _params(data)
    opt2 = _build(AdamG, p2)
    opt2.load_state_dict(saved)
    original = opt.state[p["half"]]["exp_avg"]
    assert original.dtype == torch.float32
    assert torch.equal(opt2.state[p2["half"]]["exp_avg"], original)  # not rounded to bf16


# ------------------------------------------------------------------ closure, zero_grad
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_step_with_closure_re_evaluates_under_grad_and_returns_the_loss(cls):
    w = geoopt.ManifoldParameter(torch.randn(3, 5, dtype=torch.float64), manifold=Grassmann1())
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = cls([w, b], lr=0.1)
    target = torch.randn(5, dtype=torch.float64)
    calls = []

    def closure():
        opt.zero_grad()
        loss = ((w @ target) ** 2 / (w * w).sum(dim=1)).sum() + (b**2).sum()
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    with torch.no_grad():  # step must re-enable grad for the closure
        loss = opt.step(closure)
    assert calls and float(loss.detach()) == calls[-1]
    losses = [float(opt.step(closure).detach()) for _ in range(30)]
    assert losses[-1] < losses[0]


def test_zero_grad():
    w = geoopt.ManifoldParameter(torch.randn(3, 5), manifold=Grassmann1())
    opt = SGDG([w], lr=0.1)
    w.grad = torch.ones(3, 5)
    opt.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros(3, 5))
    opt.zero_grad()
    assert w.grad is None
    opt.step()  # no gradient: nothing to do, no error
    assert not opt.state


# ----------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_lr_scheduler_changes_lr_and_momentum_state_survives(cls):
    """MultiStepLR == setting group['lr'] by hand; the state is carried across the drop."""
    data = _tensors()
    p_sched, p_hand = _params(data), _params(data)
    a, b = _build(cls, p_sched), _build(cls, p_hand)
    sched = torch.optim.lr_scheduler.MultiStepLR(a, milestones=[3, 6], gamma=0.2)
    key = "exp_avg" if cls is AdamG else "momentum_buffer"
    for epoch in range(9):
        if epoch in (3, 6):  # what MultiStepLR does: lr *= gamma at each milestone
            for group in b.param_groups:
                group["lr"] *= 0.2
        before = a.state[p_sched["g1"]].get(key)
        before = None if before is None else before.clone()
        _step(a, p_sched, epoch)
        _step(b, p_hand, epoch)
        sched.step()
        if epoch == 3:  # first step after the drop used the transported state
            assert before is not None and before.abs().max() > 0
        for k in p_sched:
            assert torch.equal(p_sched[k], p_hand[k])
    assert a.param_groups[0]["lr"] == pytest.approx(0.1 * 0.04)


# ------------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_grad_scaler_skips_a_step_with_inf_grads_and_corrupts_nothing(cls):
    torch.manual_seed(0)
    w = geoopt.ManifoldParameter(torch.randn(3, 6), manifold=Grassmann1())
    b = torch.nn.Parameter(torch.zeros(3))
    opt = cls([{"params": [w], "momentum": 0.9}, {"params": [b]}], lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 6)

    def backward(poison: bool):
        opt.zero_grad()
        loss = ((x @ w.T + b) ** 2).mean()
        scaler.scale(loss).backward()
        if poison:
            w.grad[1, 2] = float("inf")
            b.grad[0] = float("nan")

    backward(False)
    scaler.step(opt)
    scaler.update()
    snapshot = [w.detach().clone(), b.detach().clone()]
    state = {
        id(p): {k: torch.as_tensor(v).clone() for k, v in s.items()} for p, s in opt.state.items()
    }
    scale = scaler.get_scale()
    backward(True)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w, snapshot[0]) and torch.equal(b, snapshot[1])
    for param in (w, b):
        for key, value in opt.state[param].items():
            assert torch.equal(torch.as_tensor(value), state[id(param)][key])
    assert scaler.get_scale() == scale / 2
    backward(False)
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(w, snapshot[0]) and torch.isfinite(w).all()
    assert torch.allclose(w.detach().norm(dim=1), snapshot[0].norm(dim=1))  # norms kept


# --------------------------------------------------------------------- param groups
def test_add_param_group_validates_and_refuses_without_adding():
    w = geoopt.ManifoldParameter(torch.randn(3, 5), manifold=Grassmann1())
    opt = AdamG([w], lr=0.05)
    v = geoopt.ManifoldParameter(torch.randn(2, 5), manifold=Grassmann1())
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [v], "weight_decay": 1e-4})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [v], "lr": 0.01, "grad_clip": 0.5})
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["betas"] == (0.9, 0.99)
    v.grad = torch.randn(2, 5)
    opt.step()
    assert opt.state[v]["exp_avg_sq"].shape == (2, 1)


# -------------------------------------------------------------------------- registry
def test_registry_names_and_create():
    assert OPTIMIZERS["sgdg"] is SGDG and OPTIMIZERS["adamg"] is AdamG
    assert OPTIMIZERS["rsgd"] is geoopt.optim.RiemannianSGD
    assert OPTIMIZERS["radam"] is geoopt.optim.RiemannianAdam
    assert OPTIMIZERS["sgd"] is torch.optim.SGD and OPTIMIZERS["adam"] is torch.optim.Adam
    for name, cls in OPTIMIZERS.items():
        w = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=geoopt.Sphere())
        opt = create(name, [w], lr=0.1)
        assert type(opt) is cls
        w.grad = torch.randn(3, 4)
        opt.step()
    opt = create("sgdg", [torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_registry_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'.*'sgdg'.*'adamg'.*'radam'"):
        create("lbfgs", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)


# ------------------------------------------------------------------------ bad input
def _g1():
    return geoopt.ManifoldParameter(torch.randn(3, 4), manifold=Grassmann1())


def _plain():
    return torch.nn.Parameter(torch.randn(3))


BAD_HYPER = [
    (SGDG, dict(lr=-0.1), ValueError, "invalid lr -0.1"),
    (AdamG, dict(lr=-1e-3), ValueError, "invalid lr"),
    (SGDG, dict(lr=0.1, momentum=1.0), ValueError, "invalid momentum 1.0"),
    (SGDG, dict(lr=0.1, momentum=-0.5), ValueError, "invalid momentum"),
    (AdamG, dict(lr=0.1, betas=(1.0, 0.9)), ValueError, r"invalid betas\[0\]"),
    (AdamG, dict(lr=0.1, betas=(0.9, -0.1)), ValueError, r"invalid betas\[1\]"),
    (AdamG, dict(lr=0.1, betas=(0.9,)), TypeError, "betas must be a pair"),
    (AdamG, dict(lr=0.1, eps=-1e-8), ValueError, "invalid eps"),
    (SGDG, dict(lr=0.1, grad_clip=-0.1), ValueError, "invalid grad_clip"),
    (SGDG, dict(lr=0.1, weight_decay=-1.0), ValueError, "invalid weight_decay"),
    (SGDG, dict(lr=0.1, omega=-1.0), ValueError, "invalid omega"),
    (SGDG, dict(lr=0.1, nesterov=True), ValueError, "nesterov=True requires momentum"),
    (SGDG, dict(lr=0.1, nesterov=True, momentum=0.9, dampening=0.1), ValueError, "dampening"),
    (AdamG, dict(lr=0.1, euclidean="rmsprop"), ValueError, "unknown euclidean rule 'rmsprop'"),
    (SGDG, dict(lr=0.1, stabilize=0), ValueError, "stabilize"),
    (SGDG, dict(lr="0.1"), TypeError, "lr must be a real number"),
    (SGDG, dict(lr=float("nan")), ValueError, "invalid lr"),
]


@pytest.mark.parametrize("cls, hyper, error, match", BAD_HYPER, ids=lambda v: str(v)[:30])
def test_bad_hyper_parameter_is_refused_by_name(cls, hyper, error, match):
    with pytest.raises(error, match=match):
        cls([_plain()], **hyper)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_weight_decay_on_grassmann1_is_refused_naming_the_parameter(cls):
    w = _g1()
    with pytest.raises(
        ValueError, match=r"weight_decay=0.0005 on the Grassmann1 parameter 'conv.w"
    ):
        cls([("conv.weight", w)], lr=0.1, weight_decay=5e-4)
    with pytest.raises(ValueError, match=r"weight_decay.*param_groups\[0\]\['params'\]\[0\]"):
        cls([w], lr=0.1, weight_decay=5e-4)
    scaled = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=geoopt.Scaled(Grassmann1(), 2))
    with pytest.raises(ValueError, match="weight_decay"):
        cls([scaled], lr=0.1, weight_decay=5e-4)
    with pytest.raises(ValueError, match="weight_decay"):  # via the group key too
        cls([{"params": [_plain()], "manifold": Grassmann1()}], lr=0.1, weight_decay=5e-4)


def test_omega_on_a_non_grassmann1_parameter_is_refused():
    with pytest.raises(ValueError, match=r"omega=0.1 needs Grassmann1 parameters.*'fc.bias'"):
        SGDG([("fc.weight", _g1()), ("fc.bias", _plain())], lr=0.1, omega=0.1)


def test_group_manifold_must_be_a_geoopt_manifold():
    with pytest.raises(TypeError, match="'manifold' must be a geoopt Manifold"):
        SGDG([{"params": [_plain()], "manifold": "grassmann"}], lr=0.1)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_zero_vector_point_is_refused_on_the_first_step_with_name_and_row(cls):
    data = torch.randn(4, 3, 2, 2)
    data[2] = 0.0
    w = geoopt.ManifoldParameter(data, manifold=Grassmann1(ndim=3))
    opt = cls([("layer1.conv.weight", w)], lr=0.1)
    w.grad = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="'layer1.conv.weight' holds a zero vector at row 2"):
        opt.step()
    assert torch.equal(w.detach()[2], torch.zeros(3, 2, 2))  # nothing was stepped
    unnamed = cls([geoopt.ManifoldParameter(torch.zeros(2, 5), manifold=Grassmann1())], lr=0.1)
    unnamed.param_groups[0]["params"][0].grad = torch.ones(2, 5)
    with pytest.raises(
        ValueError, match=r"\['params'\]\[0\] \(shape \(2, 5\)\) holds a zero vector at row 0"
    ):
        unnamed.step()


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_sparse_gradient_is_a_clear_error(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.named_parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="'weight' has a sparse gradient"):
        opt.step()
