"""Points made of blocks of rows (docs/design.md, "Points made of blocks of rows"):
``Grassmann1Blocks(points)``, its operators, the optimizers' fused kernels on it, checkpoints,
conversion of GroupNorm- and LayerNorm-fed weights, the orthogonality term, bad input.

Operators are checked in float64 against ``Grassmann1`` on the ``(points, -1)`` view and
against formulas written out here; the fused steps against the composed (single-tensor)
steps, on the C kernel, the torch twin and (when installed) Triton's interpreter.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re

import geoopt
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt import Grassmann1
from rbn_geoopt.manifold import Grassmann1Blocks, grassmann1_of, is_grassmann1
from rbn_geoopt.nn import find_scale_invariant, orthogonality_penalty, to_grassmann
from rbn_geoopt.nn.recipe import paper_optimizer
from rbn_geoopt.optim import SGDG, AdamG, NonFiniteGradientError, _fused

F64 = torch.float64
SHAPE, POINTS = (8, 3, 2, 2), 4  # 4 blocks of 2 rows, 24 entries each
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _point(seed: int = 0, dtype=F64, shape=SHAPE) -> torch.Tensor:
    """A point whose blocks have norms spread over 1e-2..1e2 (the rows of a block not unit)."""
    x = torch.randn(shape, generator=_gen(seed), dtype=F64)
    scale = 10.0 ** torch.linspace(-2, 2, POINTS, dtype=F64).repeat_interleave(shape[0] // POINTS)
    return (x * scale.view(-1, *(1,) * (len(shape) - 1))).to(dtype)


def _rand(seed: int, dtype=F64, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=F64).to(dtype)


# ------------------------------------------------------------------ the manifold
def test_operators_are_grassmann1_on_the_point_view():
    m, rows = Grassmann1Blocks(POINTS), Grassmann1()
    x, y = _point(0), _point(1)
    u, v = m.proju(x, _rand(2)), m.proju(x, _rand(3))

    def view(t):
        return t.reshape(POINTS, -1)

    same = [
        (m.projx(x), rows.projx(view(x))),
        (m.proju(x, _rand(2)), rows.proju(view(x), view(_rand(2)))),
        (m.egrad2rgrad(x, _rand(2)), rows.egrad2rgrad(view(x), view(_rand(2)))),
        (m.expmap(x, u), rows.expmap(view(x), view(u))),
        (m.transp_follow_expmap(x, u, v), rows.transp_follow_expmap(view(x), view(u), view(v))),
        (m.logmap(x, y), rows.logmap(view(x), view(y))),
        (m.transp(x, y, v), rows.transp(view(x), view(y), view(v))),
        (m.norm(x, u), rows.norm(view(x), view(u))),
        (m.inner(x, u, v), rows.inner(view(x), view(u), view(v))),
        (m.dist(x, y), rows.dist(view(x), view(y))),
    ]
    for got, want in same:
        assert torch.equal(got.reshape(want.shape), want)
    assert m.inner(x, u, v, keepdim=True).shape == (POINTS, 1, 1, 1)
    assert m.component_inner(x, u, v).shape == SHAPE
    assert torch.equal(m.component_inner(x, u, v)[::2, 0, 0, 0], m.inner(x, u, v))
    assert torch.equal(m.retr_transp(x, u, v)[0], m.expmap(x, u))


def test_operators_against_the_formulas_written_out():
    m = Grassmann1Blocks(POINTS)
    x, g, w = _point(0), _rand(1), _rand(2)
    xs, gs = x.reshape(POINTS, -1), g.reshape(POINTS, -1)
    r = xs.norm(dim=1, keepdim=True)
    xh = xs / r
    proj = gs - (xs * gs).sum(1, keepdim=True) / r**2 * xs
    torch.testing.assert_close(m.proju(x, g).reshape(POINTS, -1), proj, rtol=1e-13, atol=1e-13)
    egrad = r**2 * gs - (xs * gs).sum(1, keepdim=True) * xs
    torch.testing.assert_close(m.egrad2rgrad(x, g).reshape(POINTS, -1), egrad, rtol=1e-12, atol=0)
    u = m.proju(x, 0.3 * g).reshape(POINTS, -1) * r / proj.norm(dim=1, keepdim=True)
    t = u.norm(dim=1, keepdim=True) / r  # metric length 0.3 per block
    e = u / u.norm(dim=1, keepdim=True)
    want = xh * torch.cos(t) + e * torch.sin(t)
    got = m.expmap(x, u.reshape(SHAPE)).reshape(POINTS, -1)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(m.norm(x, u.reshape(SHAPE)), t.squeeze(1), rtol=1e-13, atol=0)
    ys = w.reshape(POINTS, -1)
    cos = ((xh * ys).sum(1) / ys.norm(dim=1)).abs().clamp(max=1)
    torch.testing.assert_close(m.dist(x, w), torch.acos(cos), rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    exps=st.lists(st.floats(-6, 6), min_size=POINTS, max_size=POINTS),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=POINTS, max_size=POINTS),
    seed=st.integers(0, 2**16),
)
def test_every_operator_is_invariant_under_its_own_factor_per_block(exps, signs, seed):
    """``x -> a_k x`` on block ``k`` (tangents by the lift rule): the same results (unit
    points and lifts at them by the sign of ``a_k``)."""
    m = Grassmann1Blocks(POINTS)
    x, y = _point(seed), _point(seed + 1)
    u, v = m.proju(x, _rand(seed + 2)), m.proju(x, _rand(seed + 3))
    a = torch.tensor([s * 10.0**e for s, e in zip(signs, exps, strict=True)], dtype=F64)
    per_entry = a.repeat_interleave(SHAPE[0] // POINTS).view(-1, 1, 1, 1)
    sign = torch.sign(per_entry)
    ax, au, av = per_entry * x, per_entry * u, per_entry * v
    close = dict(rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(m.dist(ax, y), m.dist(x, y), **close)
    torch.testing.assert_close(m.norm(ax, au), m.norm(x, u), **close)
    torch.testing.assert_close(m.inner(ax, au, av), m.inner(x, u, v), **close)
    torch.testing.assert_close(m.projx(ax), sign * m.projx(x), **close)
    torch.testing.assert_close(m.expmap(ax, au), sign * m.expmap(x, u), **close)
    torch.testing.assert_close(
        m.transp_follow_expmap(ax, au, av), sign * m.transp_follow_expmap(x, u, v), **close
    )
    grad = _rand(seed + 4)  # a loss invariant per block has gradient g / a_k at a_k x
    torch.testing.assert_close(
        m.egrad2rgrad(ax, grad / per_entry), per_entry * m.egrad2rgrad(x, grad), **close
    )


def test_checks_sampling_and_geoopt_integration():
    m = Grassmann1Blocks(POINTS)
    assert m.check_point(torch.zeros(8, 5)) and not m.check_point(torch.zeros(6, 5))
    ok, reason = m.check_point(torch.zeros(6, 5), explain=True)
    assert not ok and "divisible by 4" in reason
    assert not Grassmann1Blocks(8).check_point(torch.zeros(8, 1))  # points of size 1
    x = torch.ones(8, 3)
    x[2:4] = 0  # block 1 is zero; a zero row inside a block is fine
    x[4] = 0
    ok, reason = m.check_point_on_manifold(x, explain=True)
    assert not ok and "zero vector at point 1 (rows 2..3)" in reason
    x[2] = 1
    assert m.check_point_on_manifold(x)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="points must be >= 1"):
            Grassmann1Blocks(bad)
    with pytest.raises(TypeError, match="points must be an int"):
        Grassmann1Blocks(2.0)
    with pytest.raises(ValueError, match="no broadcasting"):
        m.proju(torch.ones(8, 3), torch.ones(3))
    r = m.random(8, 3, dtype=F64)
    torch.testing.assert_close(r.reshape(4, -1).norm(dim=1), torch.ones(4, dtype=F64))
    o = m.origin(8, 3)
    assert o.reshape(4, -1)[:, 0].eq(1).all() and o.sum() == 4 and o.manifold is m
    p = geoopt.ManifoldParameter(_point(0), manifold=m)
    assert is_grassmann1(p) and is_grassmann1(geoopt.Scaled(geoopt.Scaled(m, 2.0), 3.0))
    assert grassmann1_of(geoopt.Scaled(m, 2.0)) is m and grassmann1_of(geoopt.Sphere()) is None
    assert m.ndim is None and repr(m) == "Grassmann1Blocks(points=4) manifold"
    # Grassmann1Blocks(rows) and Grassmann1Blocks(1) are Grassmann1(ndim=dim-1) and (ndim=dim)
    for points, ndim in ((8, 3), (1, 4)):
        x, g = _point(0), _rand(1)
        got = Grassmann1Blocks(points).egrad2rgrad(x, g)
        assert torch.equal(got, Grassmann1(ndim=ndim).egrad2rgrad(x, g))


def test_stabilize_keeps_points_and_projects_the_momentum():
    m = Grassmann1Blocks(POINTS)
    p = geoopt.ManifoldParameter(_point(0), manifold=m)
    opt = SGDG([p], lr=0.1, momentum=0.9, stabilize=1)
    p.grad = _rand(1)
    opt.step()
    before = p.detach().clone()
    opt.state[p]["momentum_buffer"].add_(p.detach())  # a radial component to remove
    opt.stabilize_group(opt.param_groups[0])
    assert torch.equal(p.detach(), before)
    tau = opt.state[p]["momentum_buffer"].reshape(POINTS, -1)
    along = (tau * before.reshape(POINTS, -1)).sum(1).abs()
    assert along.max() < 1e-10 * tau.norm(dim=1).max() * before.norm()


# ---------------------------------------------------------------- the optimizers
BACKENDS = ["torch"] + ["c"] * (_fused._crows is not None)
if importlib.util.find_spec("triton") is not None:
    BACKENDS.append("triton")


def _run(method, dtype, fused, *, seed=0, steps=3, omega=0.0, shape=SHAPE):
    cls = SGDG if method == "sgdg" else AdamG
    hyper = dict(lr=0.2, momentum=0.9) if method == "sgdg" else dict(lr=0.05)
    p = geoopt.ManifoldParameter(_point(seed, dtype, shape), manifold=Grassmann1Blocks(POINTS))
    opt = cls([p], grad_clip=0.5, omega=omega, **hyper, **({} if fused else dict(foreach=False)))
    for k in range(steps):
        p.grad = _rand(seed + 10 + k, dtype, shape)
        opt.step()
    return p.detach().clone(), opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_fused_step_equals_the_composed_step(method, dtype, backend, monkeypatch):
    shape = (8, 3) if backend == "triton" else SHAPE  # the interpreter is slow
    monkeypatch.setenv(_fused.ENV_VAR, backend)
    fused, opt_f = _run(method, dtype, True, shape=shape, steps=2 if backend == "triton" else 3)
    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    comp, opt_c = _run(method, dtype, False, shape=shape, steps=2 if backend == "triton" else 3)
    start = _point(0, dtype, shape)
    assert (fused - start).abs().max() > 1e-3  # it moved
    torch.testing.assert_close(fused, comp, rtol=TOL[dtype], atol=TOL[dtype] * 100)
    p_f, p_c = opt_f.param_groups[0]["params"][0], opt_c.param_groups[0]["params"][0]
    for key, value in opt_f.state[p_f].items():
        want = opt_c.state[p_c][key]
        assert value.shape == want.shape
        torch.testing.assert_close(value, want, rtol=TOL[dtype], atol=TOL[dtype] * 100)
    # each block keeps its norm (choice (a)); the per-point second moment is (points, 1, ...)
    norms = lambda t: t.double().reshape(POINTS, -1).norm(dim=1)  # noqa: E731
    torch.testing.assert_close(norms(fused), norms(start), rtol=TOL[dtype] * 10, atol=0)
    if method == "adamg":
        assert opt_f.state[p_f]["exp_avg_sq"].shape == (POINTS,) + (1,) * (len(shape) - 1)


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_checkpoint_round_trip_and_a_wrong_state_shape_is_refused(method):
    _, opt = _run(method, F64, True, steps=2)
    p = opt.param_groups[0]["params"][0]
    saved = copy.deepcopy(opt.state_dict())
    p2 = geoopt.ManifoldParameter(p.detach().clone(), manifold=Grassmann1Blocks(POINTS))
    cls = type(opt)
    opt2 = cls([p2], **{k: v for k, v in opt.defaults.items() if k != "differentiable"})
    opt2.load_state_dict(saved)
    for q, o in ((p, opt), (p2, opt2)):
        q.grad = _rand(99)
        o.step()
    assert torch.equal(p.detach(), p2.detach())
    for key, value in opt.state[p].items():
        assert torch.equal(value, opt2.state[p2][key])
    key = "exp_avg_sq" if method == "adamg" else "momentum_buffer"
    wrong = (8, 1, 1, 1) if method == "adamg" else (4, 24)  # per row, or the view
    saved["state"][0][key] = torch.ones(wrong, dtype=F64)
    opt3 = cls([p2], **{k: v for k, v in opt.defaults.items() if k != "differentiable"})
    with pytest.raises(ValueError, match=rf"'{key}' of .* has shape {re.escape(str(wrong))}"):
        opt3.load_state_dict(saved)
    assert not opt3.state


def test_a_zero_block_and_a_non_finite_gradient_name_the_parameter_and_the_point():
    x = _point(0)
    x[4:6] = 0  # block 2
    p = geoopt.ManifoldParameter(x, manifold=Grassmann1Blocks(POINTS))
    opt = SGDG([("conv.weight", p)], lr=0.1)  # the constructor only checks shapes
    p.grad = _rand(1)
    with pytest.raises(
        ValueError, match=r"'conv.weight' holds a zero vector at point 2 \(rows 4..5\)"
    ):
        opt.step()
    assert torch.equal(p.detach(), x)
    with torch.no_grad():
        p[4] = 1.0  # a zero row inside a non-zero block: a point
    p.grad = _rand(1)
    p.grad[7, 0, 0, 0] = math.nan
    before = p.detach().clone()
    with pytest.raises(NonFiniteGradientError, match=r"NaN/Inf values \(point 3 \(rows 6..7\)\)"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]
    p.grad[7, 0, 0, 0] = 0.0
    opt.step()
    assert not torch.equal(p.detach(), before)


# ------------------------------------------------------------------ orthogonality
def test_orthogonality_is_the_papers_term_on_the_point_view_and_omega_agrees():
    """``omega`` adds the gradient of ``orthogonality_penalty`` (Gram matrix of the unit
    blocks): a step with ``omega`` equals a step with ``omega = 0`` on that gradient."""
    omega = 0.3
    x = _point(0)
    p = geoopt.ManifoldParameter(x.clone(), manifold=Grassmann1Blocks(POINTS))
    blocks = x / x.reshape(POINTS, -1).norm(dim=1).view(-1, 1, 1, 1).repeat_interleave(2, 0)
    blocks = blocks.reshape(POINTS, -1)
    gram = blocks @ blocks.T
    want = 0.5 * omega * (gram - torch.eye(POINTS, dtype=F64)).square().sum()
    torch.testing.assert_close(orthogonality_penalty([p], omega), want, rtol=1e-13, atol=0)
    one = geoopt.ManifoldParameter(x.clone(), manifold=Grassmann1Blocks(1))
    assert orthogonality_penalty([one], omega) == 0  # a single point: Yh Yh^T = I
    q = p.detach().clone().requires_grad_(True)
    q_param = geoopt.ManifoldParameter(q.detach().clone(), manifold=Grassmann1Blocks(POINTS))
    term = torch.autograd.grad(orthogonality_penalty([q_param], omega), q_param)[0]
    grad = _rand(1)
    with_omega = SGDG([p], lr=0.1, omega=omega)
    p.grad = grad.clone()
    with_omega.step()
    plain = SGDG([q_param], lr=0.1)
    q_param.grad = grad + term
    plain.step()
    torch.testing.assert_close(p.detach(), q_param.detach(), rtol=1e-12, atol=1e-13)
    assert (p.detach() - x).abs().max() > 1e-3


# --------------------------------------------------------- conversion and recipe
class GNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.g1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.g2 = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.g1(self.c1(x))), 2)
        x = F.relu(self.g2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class LNMLP(nn.Module):
    """Tokens ``(N, L, C)``: ``fc1`` feeds a LayerNorm over its channels (one point)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16, bias=False)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.ln(self.fc1(x))).mean(1))


def _fit(model, x, y, method, steps=15):
    opt = paper_optimizer(model, method)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["sgdg", "adamg"])
@pytest.mark.parametrize(
    "factory,shape,points",
    [
        (GNCNN, (16, 1, 8, 8), {"c1.weight": 4, "c2.weight": 4}),
        (LNMLP, (16, 5, 12), {"fc1.weight": 1}),
    ],
)
def test_groupnorm_and_layernorm_models_convert_keeping_outputs_and_train(
    factory, shape, points, method
):
    torch.manual_seed(0)
    model = factory().double()
    x = torch.randn(shape, generator=_gen(0), dtype=F64)
    y = torch.randint(0, 3, (shape[0],), generator=_gen(1))
    findings = find_scale_invariant(model, example_inputs=x)
    assert {n: f.points for n, f in findings.items() if f.points} == points
    model.train()
    before_train = model(x).detach()
    model.eval()
    before_eval = model(x).detach()
    model.train()
    assert sorted(to_grassmann(model, example_inputs=x)) == sorted(points)
    for name, count in points.items():
        w = model.get_parameter(name)
        assert type(w.manifold) is Grassmann1Blocks and w.manifold.points == count
    assert torch.equal(model(x), before_train)
    model.eval()
    assert torch.equal(model(x), before_eval)
    model.train()
    norms = {
        n: model.get_parameter(n).detach().reshape(c, -1).norm(dim=1) for n, c in points.items()
    }
    losses = _fit(model, x, y, method)
    assert losses[-1] < 0.9 * losses[0], losses
    for name, count in points.items():  # the blocks moved and kept their norms
        w = model.get_parameter(name).detach().reshape(count, -1)
        torch.testing.assert_close(w.norm(dim=1), norms[name], rtol=1e-12, atol=0)


def test_include_converts_blocks_and_a_zero_block_is_refused_naming_it():
    torch.manual_seed(0)
    model = GNCNN()
    with torch.no_grad():
        model.c2.weight[8:12] = 0  # block 2 of GroupNorm(4, 16)
    with pytest.raises(ValueError, match=r"'c2.weight': point 2 \(rows 8..11\) is zero"):
        to_grassmann(model)
    assert not is_grassmann1(model.c1.weight)  # nothing changed
    with torch.no_grad():
        model.c2.weight[8] = 1.0
        model.c2.weight[9:12] = 0  # zero rows inside a non-zero block: fine
    assert to_grassmann(model, include=["c2.weight"], exclude=["c1.weight"]) == ["c2.weight"]
    assert model.c2.weight.manifold.points == 4


def test_a_weight_without_partition_stays_refused_with_its_reason():
    class Biased(nn.Module):  # a bias before GroupNorm: not invariant in any partition
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.gn = nn.GroupNorm(2, 8)

        def forward(self, x):
            return self.gn(self.conv(x)).sum((2, 3))

    model = Biased()
    f = find_scale_invariant(model)["conv.weight"]
    assert f.points == 0 and "bias" in f.reason and not f.selected(all_shapes=True)
    with pytest.warns(UserWarning, match="the model is unchanged"):
        assert to_grassmann(model, all_shapes=True) == []


def test_angle_monitor_reports_one_angle_per_block():
    from rbn_geoopt.diagnostics import AngleMonitor

    p = geoopt.ManifoldParameter(_point(0), manifold=Grassmann1Blocks(POINTS))
    opt = SGDG([("w", p)], lr=0.1)
    monitor = AngleMonitor(opt)
    p.grad = _rand(1)
    with monitor.track() as report:
        opt.step()
    assert report["params"]["w"]["points"] == POINTS and report["params"]["w"]["max"] > 0


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch built without distributed/gloo support",
)
def test_sharded_block_parameters_are_refused_replicated_ones_step(tmp_path):
    """A ``Shard`` placement may cut a block: refused naming the parameter (one process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for placement, ok in ((Shard(0), False), (Replicate(), True)):
            p = nn.Parameter(distribute_tensor(_point(0), mesh, [placement]))
            group = {"params": [p], "manifold": Grassmann1Blocks(POINTS)}
            if not ok:
                with pytest.raises(ValueError, match=r"sharded along dim 0 .* Grassmann1Blocks"):
                    SGDG([group], lr=0.1)
                continue
            opt = SGDG([group], lr=0.1)
            p.grad = distribute_tensor(_rand(1), mesh, [placement])
            opt.step()
            want = geoopt.ManifoldParameter(_point(0), manifold=Grassmann1Blocks(POINTS))
            ref = SGDG([want], lr=0.1)
            want.grad = _rand(1)
            ref.step()
            assert torch.equal(p.to_local().detach(), want.detach())
    finally:
        dist.destroy_process_group()
