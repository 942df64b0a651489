"""Fused SGD-G / Adam-G kernels (rbn_geoopt.kernels) against the composition of Grassmann1
operators, the C path against the torch path, and the dispatch rules."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt import Grassmann1
from rbn_geoopt.kernels import bench, dispatch, torch_rows
from rbn_geoopt.kernels.dispatch import adamg_step_, c_available, sgdg_step_

needs_c = pytest.mark.skipif(
    not c_available(),
    reason="C extension rbn_geoopt.kernels._crows not built "
    "(python setup.py build_ext --inplace, or pip install -e .)",
)
BACKENDS = ["torch", pytest.param("c", marks=needs_c)]
F64 = torch.float64
# largest error vs the float64 composition (relative to max(1, largest entry)): float32 is
# ~60 eps32 because steps of up to ~20 radians are tested (the error grows with the angle)
TOL = {torch.float64: 1e-12, torch.float32: 4e-6}
SHAPE, NDIM = (40, 3, 3, 3), 3  # 40 points of G(1, 27)
ADAM = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


# --------------------------------------------------------------- references
def _clip(man, y, h, nu):
    if nu is None:
        return h
    norm = man.norm(y, h, keepdim=True)
    return h * torch.where(norm > nu, nu / norm, torch.ones_like(norm))


def ref_sgdg(y, g, tau, *, lr, momentum, nu=None, ndim=NDIM):
    """DESIGN.md section 3 through Grassmann1's operators, one tensor at a time."""
    man = Grassmann1(ndim=ndim)
    h = _clip(man, y, man.egrad2rgrad(y, g), nu)
    d = -lr * h if tau is None else momentum * tau - lr * h
    return man.expmap_transp(y, d, d)


def ref_adamg(y, g, m, v, *, step, lr, beta1, beta2, eps, nu=None, ndim=NDIM):
    man = Grassmann1(ndim=ndim)
    h = _clip(man, y, man.egrad2rgrad(y, g), nu)
    m = beta1 * m + (1 - beta1) * h
    v = beta2 * v + (1 - beta2) * man.inner(y, h, keepdim=True)
    d = -lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) * m / (v + eps).sqrt()
    new_y, new_m = man.expmap_transp(y, d, m)
    return new_y, new_m, v


def random_state(seed, shape=SHAPE, ndim=NDIM):
    """Non-unit points (radii 0.3..3), gradients, tangent momenta, positive second moments."""
    gen = torch.Generator().manual_seed(seed)
    man = Grassmann1(ndim=ndim)
    keep = shape[: len(shape) - ndim] + (1,) * ndim
    y = torch.randn(shape, generator=gen, dtype=F64)
    y = man.projx(y) * (0.3 + 2.7 * torch.rand(keep, generator=gen, dtype=F64))
    g = torch.randn(shape, generator=gen, dtype=F64)
    mom = 0.3 * man.proju(y, torch.randn(shape, generator=gen, dtype=F64))
    v = torch.rand(keep, generator=gen, dtype=F64) * 20
    return y, g, mom, v


def _err(a, b):
    return (a.to(F64) - b.to(F64)).abs().max().item()


def _rel(a, ref):
    """Largest error relative to the largest entry of ``ref`` (at least 1)."""
    return _err(a, ref) / max(1.0, ref.abs().max().item())


def _rounded(dtype, *ts):
    """The inputs as the kernel sees them in ``dtype``, back in float64 for the reference."""
    return [t.to(dtype).to(F64) for t in ts]


# ------------------------------------------------- one step vs the composition
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nu", [None, 0.5])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("lr", [0.05, 1.5])  # 1.5: steps of several radians
def test_sgdg_step_matches_composition(backend, dtype, nu, momentum, lr):
    for seed in range(3):
        y, g, tau = _rounded(dtype, *random_state(seed)[:3])
        ref_y, ref_tau = ref_sgdg(y, g, tau, lr=lr, momentum=momentum, nu=nu)
        yk, gk, tk = y.to(dtype), g.to(dtype), tau.to(dtype)
        sgdg_step_(yk, gk, tk, ndim=NDIM, lr=lr, momentum=momentum, grad_clip=nu, backend=backend)
        assert _err(yk, ref_y) < TOL[dtype]
        assert _rel(tk, ref_tau) < TOL[dtype]
        assert _err(gk, g) == 0  # the gradient is not touched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sgdg_without_momentum_buffer(backend, dtype):
    y, g = _rounded(dtype, *random_state(7)[:2])
    ref_y, _ = ref_sgdg(y, g, None, lr=0.2, momentum=0.0)
    yk = y.to(dtype)
    sgdg_step_(yk, g.to(dtype), None, ndim=NDIM, lr=0.2, momentum=0.0, backend=backend)
    assert _err(yk, ref_y) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nu", [None, 0.5])
@pytest.mark.parametrize("step", [1, 2, 50])
def test_adamg_step_matches_composition(backend, dtype, nu, step):
    for seed in range(3):
        y, g, m, v = _rounded(dtype, *random_state(seed))
        kw = dict(step=step, lr=0.3, nu=nu, **ADAM)
        ref_y, ref_m, ref_v = ref_adamg(y, g, m, v, **kw)
        yk, gk, mk, vk = y.to(dtype), g.to(dtype), m.to(dtype), v.to(dtype)
        adamg_step_(
            yk, gk, mk, vk, ndim=NDIM, step=step, lr=0.3, grad_clip=nu, backend=backend, **ADAM
        )
        assert _err(yk, ref_y) < TOL[dtype]
        assert _rel(mk, ref_m) < TOL[dtype]
        assert _rel(vk, ref_v) < TOL[dtype]


# --------------------------------------------------------- C against torch
@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nu", [None, 0.5])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_c_and_torch_agree_over_many_steps(dtype, nu, momentum):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    y, _, _, _ = random_state(11)
    gen = torch.Generator().manual_seed(0)
    y = y.to(dtype)
    paths = {
        b: {
            "y_sgd": y.clone(),
            "tau": torch.zeros_like(y),
            "y_adam": y.clone(),
            "m": torch.zeros_like(y),
            "v": torch.zeros(SHAPE[0], dtype=dtype),
        }
        for b in ("c", "torch")
    }
    for step in range(1, 26):
        g = torch.randn(SHAPE, generator=gen, dtype=dtype)
        for b, p in paths.items():
            sgdg_step_(
                p["y_sgd"], g, p["tau"], ndim=NDIM, lr=0.02, momentum=momentum, grad_clip=nu,
                backend=b,
            )  # fmt: skip
            adamg_step_(
                p["y_adam"], g, p["m"], p["v"], ndim=NDIM, step=step, lr=0.02, grad_clip=nu,
                backend=b, **ADAM,
            )  # fmt: skip
        for key, ref in paths["torch"].items():
            assert _err(paths["c"][key], ref) < tol, (step, key)


# ------------------------------------------------ many steps: learn and agree
def _rayleigh(n, dtype, seed=0):
    """Scale-invariant loss f(y) = <y, A y> / <y, y> with known minimum (eigenvalue 1)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = (q * torch.linspace(1.0, 4.0, n, dtype=F64)) @ q.T
    return a.to(dtype), q[:, 0].to(dtype)


def _rayleigh_grad(a, y):
    yy = (y * y).sum(-1, keepdim=True)
    ay = y @ a
    return 2 * (ay - ((y * ay).sum(-1, keepdim=True) / yy) * y) / yy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
def test_many_steps_learn_and_match_composition(backend, algo):
    """100 steps on a Rayleigh quotient: the fused path follows the composition's trajectory
    to rounding (a contracting problem, so errors do not grow) and finds the eigenvector."""
    a, target = _rayleigh(8, F64)
    y0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 2.5
    y, ref = y0.clone(), y0.clone()
    mom, ref_mom = torch.zeros_like(y0), torch.zeros_like(y0)
    v, ref_v = torch.zeros(16, dtype=F64), torch.zeros(16, 1, dtype=F64)
    for step in range(1, 101):
        if algo == "sgdg":
            kw = dict(lr=0.2, momentum=0.5, nu=1.0)
            ref, ref_mom = ref_sgdg(ref, _rayleigh_grad(a, ref), ref_mom, ndim=1, **kw)
            sgdg_step_(
                y, _rayleigh_grad(a, y), mom, ndim=1, lr=0.2, momentum=0.5, grad_clip=1.0,
                backend=backend,
            )  # fmt: skip
        else:
            kw = dict(step=step, lr=0.1, nu=1.0, **ADAM)
            ref, ref_mom, ref_v = ref_adamg(
                ref, _rayleigh_grad(a, ref), ref_mom, ref_v, ndim=1, **kw
            )
            adamg_step_(
                y, _rayleigh_grad(a, y), mom, v, ndim=1, step=step, lr=0.1, grad_clip=1.0,
                backend=backend, **ADAM,
            )  # fmt: skip
        assert _err(y, ref) < 1e-11 and _err(mom, ref_mom) < 1e-11, step
    loss = ((y @ a) * y).sum(-1) / (y * y).sum(-1)
    assert loss.max().item() < 1 + 1e-3  # the minimum eigenvalue is 1
    assert ((y @ target).abs() > 1 - 1e-3).all()


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_step_normalizes_only(backend, dtype):
    """g = 0 and zero momentum: d = 0, the point becomes its unit representative exactly."""
    y, _, _, _ = random_state(3)
    y = y.to(dtype)
    unit = Grassmann1(ndim=NDIM).projx(y)
    ys, tau = y.clone(), torch.zeros_like(y)
    sgdg_step_(ys, torch.zeros_like(y), tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    assert _err(ys, unit) < 4 * torch.finfo(dtype).eps and (tau == 0).all()
    ya, m, v = y.clone(), torch.zeros_like(y), torch.zeros(SHAPE[0], dtype=dtype)
    for eps in (1e-8, 0.0):  # eps = 0 with v = 0: still a zero step, no 0 * inf
        adamg_step_(
            ya, torch.zeros_like(y), m, v, ndim=NDIM, step=1, lr=0.1, beta1=0.9, beta2=0.99,
            eps=eps, grad_clip=0.1, backend=backend,
        )  # fmt: skip
        assert _err(ya, unit) < 4 * torch.finfo(dtype).eps
        assert (m == 0).all() and (v == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_with_momentum_keeps_moving(backend):
    """d = gamma tau: the point moves along its geodesic and tau is transported along it."""
    y, _, tau, _ = random_state(4)
    ref_y, ref_tau = ref_sgdg(y, torch.zeros_like(y), tau, lr=0.1, momentum=0.9)
    sgdg_step_(y, torch.zeros_like(y), tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    assert _err(y, ref_y) < 1e-12 and _err(tau, ref_tau) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_properties(backend):
    """Unit rows, tangent momentum, transport keeps the metric norm of d."""
    y, g, tau, _ = random_state(5)
    man = Grassmann1(ndim=NDIM)
    d = 0.9 * tau - 0.3 * man.egrad2rgrad(y, g)
    d_norm = man.norm(y, d)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.3, momentum=0.9, backend=backend)
    assert _err(y.flatten(1).norm(dim=1), torch.ones(SHAPE[0], dtype=F64)) < 1e-14
    assert (man.inner(y, y, tau).abs() < 1e-14).all()
    assert _err(man.norm(y, tau), d_norm) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
@pytest.mark.parametrize("bad_value", [0.0, math.nan, math.inf])
def test_invalid_points_are_left_unchanged_and_reported(backend, algo, bad_value):
    y, g, mom, v = random_state(6)
    v = v.flatten()
    y[5] = bad_value
    y_ok, mom_ok, v_ok = y.clone(), mom.clone(), v.clone()
    y_ok[5], mom_ok[5], v_ok[5] = 1.0, 0.0, 0.0  # any valid point, to step the other rows
    before = (y[5].clone(), mom[5].clone(), v[5].clone())
    with pytest.raises(ValueError, match="point 5 of y"):
        if algo == "sgdg":
            sgdg_step_(y, g, mom, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
        else:
            adamg_step_(y, g, mom, v, ndim=NDIM, step=3, lr=0.1, backend=backend, **ADAM)
    assert torch.equal(y[5], before[0]) or bad_value != bad_value  # NaN row: compare below
    assert torch.equal(torch.isnan(y[5]), torch.isnan(before[0]))
    assert torch.equal(mom[5], before[1]) and torch.equal(v[5], before[2])
    if algo == "sgdg":
        sgdg_step_(y_ok, g, mom_ok, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    else:
        adamg_step_(y_ok, g, mom_ok, v_ok, ndim=NDIM, step=3, lr=0.1, backend=backend, **ADAM)
    rest = torch.arange(SHAPE[0]) != 5
    assert torch.equal(y[rest], y_ok[rest]) and torch.equal(mom[rest], mom_ok[rest])
    assert torch.equal(v[rest], v_ok[rest])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_rows_with_non_finite_gradients_are_left_unchanged_and_reported(backend, algo, bad_value):
    """The optimizers' guard refuses such gradients first; the kernels never write NaN."""
    y, g, mom, v = random_state(7)
    v = v.flatten()
    g[2, 1, 0, 0] = bad_value
    g[9, 0, 2, 1] = bad_value
    before = (y.clone(), mom.clone(), v.clone())
    with pytest.raises(ValueError, match="point 2 of y .*gradient is not finite"):
        if algo == "sgdg":
            sgdg_step_(y, g, mom, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
        else:
            adamg_step_(y, g, mom, v, ndim=NDIM, step=3, lr=0.1, backend=backend, **ADAM)
    bad = torch.zeros(SHAPE[0], dtype=torch.bool)
    bad[[2, 9]] = True
    stepped = (y, mom, v) if algo == "adamg" else (y, mom)  # SGD-G has no v
    for new, old in zip(stepped, before, strict=False):
        assert torch.equal(new[bad], old[bad]) and not torch.equal(new[~bad], old[~bad])
        assert torch.isfinite(new).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_false_does_not_raise(backend):
    y, g, tau, _ = random_state(6)
    y[2] = 0
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend, check=False)
    assert (y[2] == 0).all() and torch.isfinite(y).all()


# ------------------------------------------------------------- in place, layouts
@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(backend):
    y, g, m, v = random_state(8)
    ids = [(t, t.data_ptr()) for t in (y, m, v)]
    ref_y, ref_m, ref_v = ref_adamg(y, g, m, v, step=1, lr=0.1, **ADAM)
    assert adamg_step_(y, g, m, v, ndim=NDIM, step=1, lr=0.1, backend=backend, **ADAM) is None
    for t, ptr in ids:
        assert t.data_ptr() == ptr
    assert _err(y, ref_y) < 1e-12 and _err(m, ref_m) < 1e-12 and _err(v, ref_v) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_between_forward_and_backward_is_detected(backend):
    """In-place writes bump autograd's version counter (the C kernel writes by pointer)."""
    w = torch.nn.Parameter(random_state(20)[0])
    loss = (w * w).sum()
    tau = torch.zeros_like(w)
    sgdg_step_(w, torch.randn_like(w), tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("layout", ["channels_last", "row_slice"])
def test_non_contiguous_tensors_use_torch_and_write_back(layout):
    y, g, tau, _ = random_state(9)
    ref_y, ref_tau = ref_sgdg(y, g, tau, lr=0.1, momentum=0.9)
    if layout == "channels_last":
        y, tau = (t.contiguous(memory_format=torch.channels_last) for t in (y, tau))
    else:  # every point is a slice of a wider row
        wide = torch.zeros(SHAPE[0], 4, 3, 3, dtype=F64)
        wide[:, :3] = y
        y = wide[:, :3]
    assert not y.is_contiguous()
    assert dispatch.c_eligible(y, g, tau) is not None
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert _err(y, ref_y) < 1e-12 and _err(tau, ref_tau) < 1e-12
    if layout == "row_slice":
        assert (wide[:, 3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ndim_and_row_vector_v(backend):
    """Linear weights (ndim=1) and conv weights (ndim=3) step the same rows; v may be flat."""
    y, g, m, v = random_state(10)
    y1, g1, m1, v1 = (t.reshape(SHAPE[0], -1).clone() for t in (y, g, m, v))
    v1 = v1.flatten()
    adamg_step_(y, g, m, v, ndim=NDIM, step=2, lr=0.1, backend=backend, **ADAM)
    adamg_step_(y1, g1, m1, v1, ndim=1, step=2, lr=0.1, backend=backend, **ADAM)
    assert torch.equal(y.reshape(SHAPE[0], -1), y1) and torch.equal(m.reshape_as(m1), m1)
    assert torch.equal(v.flatten(), v1)


# ---------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps_in_float32(dtype):
    """Half parameters with float32 state: computed in float32, stored back in half, and
    the momentum re-projected at the rounded point stored (as the straightforward path)."""
    man = Grassmann1(ndim=NDIM)
    y, g, tau, v = random_state(12)
    yh, gh = y.to(dtype), g.to(dtype)
    y32, tau32, tau_h = yh.float(), tau.float(), tau.float()
    sgdg_step_(yh, gh, tau_h, ndim=NDIM, lr=0.1, momentum=0.9)  # auto: torch path
    sgdg_step_(y32, gh.float(), tau32, ndim=NDIM, lr=0.1, momentum=0.9, backend="torch")
    assert yh.dtype == dtype and torch.equal(yh, y32.to(dtype))
    assert _err(tau_h, man.proju(yh.float(), tau32)) < 1e-6
    assert (man.inner(yh.float(), yh.float(), tau_h).abs() < 1e-6).all()  # tangent at yh
    ref_y, ref_tau = ref_sgdg(*_rounded(dtype, y, g), tau, lr=0.1, momentum=0.9)
    assert _err(yh, ref_y) < 2 * torch.finfo(dtype).eps
    assert _err(tau_h, man.proju(yh.double(), ref_tau)) < 1e-5
    m, vv = torch.zeros_like(y32), torch.zeros(SHAPE[0], dtype=torch.float32)
    adamg_step_(yh, gh, m, vv, ndim=NDIM, step=1, lr=0.1, **ADAM)
    assert yh.dtype == dtype and torch.isfinite(yh).all() and (vv > 0).all()
    assert (man.inner(yh.float(), yh.float(), m).abs() < 1e-6).all()
    with pytest.raises(ValueError, match="backend='c' cannot be used"):
        sgdg_step_(yh, gh, tau_h, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")


# ----------------------------------------------------------------- dispatch
# ------------------------------------------------------------ multi-tensor path
FOREACH_SPECS = [  # (seed, shape, ndim, dtype): mixed dtypes, shapes, ndims, a big tensor
    (21, (40, 3, 3, 3), 3, torch.float64),
    (22, (9, 5), 1, torch.float32),
    (23, (600, 64), 1, torch.float32),  # > PARALLEL_MIN_NUMEL: several blocks
    (24, (2, 3, 4), 2, torch.float64),
    (25, (0, 7), 1, torch.float64),  # empty
]


def _foreach_states():
    states = []
    for seed, shape, ndim, dtype in FOREACH_SPECS:
        y, g, m, v = (t.to(dtype) for t in random_state(seed, shape=shape, ndim=ndim))
        states.append((y, g, m, v.reshape(-1), ndim))
    return states


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_foreach_equals_one_tensor_at_a_time(backend, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    one, many = _foreach_states(), _foreach_states()
    kw = dict(lr=0.2, momentum=0.9, grad_clip=0.5, backend=backend)
    akw = dict(lr=0.1, grad_clip=0.5, backend=backend, **ADAM)
    for y, g, m, _, ndim in one:
        sgdg_step_(y, g, m, ndim=ndim, **kw)
    ys, gs, ms, _, ndims = (list(c) for c in zip(*many, strict=True))
    dispatch.sgdg_foreach_(ys, gs, ms, ndims=ndims, **kw)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    steps = [1, 2, 3, 4, 5]  # per-tensor step counts (e.g. parameters added later)
    for (y, g, m, v, ndim), step in zip(one, steps, strict=True):
        adamg_step_(y, g, m, v, ndim=ndim, step=step, **akw)
    ys, gs, ms, vs, ndims = (list(c) for c in zip(*many, strict=True))
    dispatch.adamg_foreach_(ys, gs, ms, vs, ndims=ndims, steps=steps, **akw)
    for a, b in zip(one, many, strict=True):
        for x, z in zip(a[:4], b[:4], strict=True):
            assert torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreach_steps_every_tensor_then_names_the_bad_one(backend):
    states = _foreach_states()
    ys, gs, ms, _, ndims = (list(c) for c in zip(*states, strict=True))
    ys[1][4] = 0.0  # a zero point in the second tensor
    before = [y.clone() for y in ys]
    with pytest.raises(ValueError, match=r"point 4 of ys\[1\]"):
        dispatch.sgdg_foreach_(ys, gs, ms, ndims=ndims, lr=0.2, momentum=0.9, backend=backend)
    assert not torch.equal(ys[0], before[0]) and not torch.equal(ys[2], before[2])
    assert torch.equal(ys[1][4], before[1][4])
    assert not torch.equal(ys[1][5], before[1][5])


def test_foreach_bad_arguments():
    y, g, tau, v = random_state(26)
    kw = dict(lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="one length"):
        dispatch.sgdg_foreach_([y, y.clone()], [g], [tau], ndims=NDIM, **kw)
    with pytest.raises(ValueError, match="ndims has 2 entries"):
        dispatch.sgdg_foreach_([y], [g], [tau], ndims=[3, 3], **kw)
    with pytest.raises(ValueError, match="steps has 2 entries"):
        dispatch.adamg_foreach_([y], [g], [tau], [v], ndims=NDIM, steps=[1, 2], lr=0.1, **ADAM)
    with pytest.raises(ValueError, match="share memory"):
        dispatch.sgdg_foreach_([y, y], [g, g.clone()], [tau, y], ndims=NDIM, **kw)
    dispatch.sgdg_foreach_([], [], [], ndims=NDIM, **kw)  # nothing to do


@needs_c
def test_c_entry_points_refuse_malformed_jobs():
    crows = dispatch._crows
    with pytest.raises(TypeError):
        crows.sgdg_many([(1, 2)], 0, 0.1, 0.9, math.inf, 1)
    with pytest.raises(ValueError, match="bad tensor 0"):
        crows.sgdg_many([(0, 0, 0, 3, 4)], 0, 0.1, 0.9, math.inf, 1)
    with pytest.raises(ValueError, match="dtype"):
        crows.adamg_many([], 7, 0.9, 0.99, 1e-8, math.inf, 1)
    with pytest.raises(ValueError, match="nthreads"):
        crows.sgdg_many([], 0, 0.1, 0.9, math.inf, 0)
    assert crows.sgdg_many([], 1, 0.1, 0.9, math.inf, 2) == []


class _Spy:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def sgdg_many(self, *args):
        self.calls += 1
        return self.real.sgdg_many(*args)

    def adamg_many(self, *args):
        self.calls += 1
        return self.real.adamg_many(*args)


@needs_c
def test_auto_picks_c_and_env_var_forces_torch(monkeypatch):
    spy = _Spy(dispatch._crows)
    monkeypatch.setattr(dispatch, "_crows", spy)
    y, g, tau, _ = random_state(13)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert spy.calls == 1
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert spy.calls == 1
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")  # explicit wins
    assert spy.calls == 2
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)


def test_without_extension_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "_crows", None)
    assert not dispatch.c_available()
    y, g, tau, _ = random_state(14)
    ref_y, _ = ref_sgdg(y, g, tau, lr=0.1, momentum=0.9)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert _err(y, ref_y) < 1e-12
    with pytest.raises(ValueError, match="not built"):
        sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")


@needs_c
def test_thread_count_does_not_change_results(monkeypatch):
    y, g, tau, _ = random_state(15, shape=(300, 64, 3, 3))
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert dispatch._nthreads(y.numel(), 300) == threads
        yc, tc = y.clone(), tau.clone()
        sgdg_step_(yc, g, tc, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")
        results.append((yc, tc))
    for yc, tc in results[1:]:
        assert torch.equal(yc, results[0][0]) and torch.equal(tc, results[0][1])
    assert dispatch._nthreads(100, 10) == 1  # small tensors: one thread


@needs_c
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("bad_rows", [(), (0,), (1, 6), (3, 4, 5), (6,), tuple(range(7))])
def test_c_blocks_and_bad_rows_anywhere(monkeypatch, threads, bad_rows):
    """Rows are split in blocks over threads and pipelined inside a block (the sweep that
    writes row i reads row i+1): every block boundary and bad-row position agrees with
    the torch path, bad rows stay untouched and the first one is reported."""
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    y, g, m, v = random_state(18, shape=(7, 5, 2, 2))
    v = v.flatten()
    for r in bad_rows:
        y[r] = 0.0 if r % 2 else math.nan
    out = {}
    for backend in ("c", "torch"):
        ys, ms, vs, ts = y.clone(), m.clone(), v.clone(), m.clone()
        calls = (
            partial(sgdg_step_, ys, g, ts, lr=0.3, momentum=0.9),
            partial(adamg_step_, ys, g, ms, vs, step=4, lr=0.3, **ADAM),
        )
        for call in calls:
            if bad_rows:
                with pytest.raises(ValueError, match=f"point {min(bad_rows)} of y"):
                    call(ndim=NDIM, backend=backend)
            else:
                call(ndim=NDIM, backend=backend)
        out[backend] = (ys, ts, ms, vs)
    good = [r for r in range(7) if r not in bad_rows]
    for a, b, before in zip(out["c"], out["torch"], (y, m, m, v), strict=True):
        assert _err(a[good], b[good]) < 1e-12 if good else True
        for r in bad_rows:
            assert torch.equal(a[r].isnan(), before[r].isnan())
            assert torch.equal(a[r].nan_to_num(), before[r].nan_to_num())


@needs_c
def test_every_isa_copy_agrees_with_torch():
    """The baseline and the AVX2 + FMA copies of the C kernel (those this CPU has)."""
    crows = dispatch._crows
    default = crows.isa()
    isas = ["baseline"] + [name for name in ("avx2",) if _isa_available(crows, name)]
    try:
        for name in isas:
            assert crows.isa(name) == name
            for dtype in (torch.float64, torch.float32):
                tol = 1e-12 if dtype == torch.float64 else 1e-5
                y, g, m, v = (t.to(dtype) for t in random_state(19, shape=(33, 7, 3, 3)))
                res = {}
                for backend in ("c", "torch"):
                    ys, ts, ya, ms, vs = y.clone(), m.clone(), y.clone(), m.clone(), v.clone()
                    sgdg_step_(ys, g, ts, ndim=NDIM, lr=0.2, momentum=0.9, backend=backend)
                    adamg_step_(ya, g, ms, vs, ndim=NDIM, step=2, lr=0.2, backend=backend, **ADAM)
                    res[backend] = (ys, ts, ya, ms, vs)
                for a, b in zip(res["c"], res["torch"], strict=True):
                    assert _rel(a, b) < tol, (name, dtype)
    finally:
        crows.isa(default)
    with pytest.raises(ValueError, match="not available"):
        crows.isa("sse9")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_squares_in_every_isa_copy(dtype, threads):
    """The step guard's C sweep: sum of squares and finiteness."""
    crows = dispatch._crows
    default = crows.isa()
    isas = ["baseline"] + [name for name in ("avx2",) if _isa_available(crows, name)]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3 * (1 << 15) + 7, generator=gen).to(dtype)
    exact = math.fsum(float(v) ** 2 for v in x.tolist())
    code = dispatch._C_DTYPES[dtype]
    try:
        for name in isas:
            crows.isa(name)
            ss, finite = crows.sum_squares(x.data_ptr(), x.numel(), code, threads)
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 partial sums
            assert finite and abs(ss - exact) <= tol * exact, name
            for where in (0, (1 << 15) - 1, 1 << 15, x.numel() - 1):
                for poison in (math.nan, math.inf, -math.inf):
                    z = x.clone()
                    z[where] = poison
                    ss, finite = crows.sum_squares(z.data_ptr(), z.numel(), code, threads)
                    assert not finite and not math.isfinite(ss), (name, where, poison)
    finally:
        crows.isa(default)
    assert crows.sum_squares(0, 0, code, threads) == (0.0, True)


@needs_c
def test_sum_squares_dispatch():
    # finite values whose squares overflow the element type: inf, but still "finite"
    assert dispatch.sum_squares(torch.full((4,), 1e30)) == (math.inf, True)
    assert dispatch.sum_squares(torch.full((4,), 1e300, dtype=torch.float64)) == (math.inf, True)
    ss, finite = dispatch.sum_squares(torch.full((4,), 1e18))
    assert finite and math.isclose(ss, 4e36, rel_tol=1e-6)
    assert dispatch.sum_squares(torch.ones(4, 4).t()[1:]) is None  # not contiguous
    assert dispatch.sum_squares(torch.ones(4, dtype=torch.float16)) is None
    with pytest.raises(ValueError, match="numel"):
        dispatch._crows.sum_squares(0, 5, 0, 1)


def test_sum_squares_leaves_forced_torch_to_the_caller(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.sum_squares(torch.ones(3)) is None


def _isa_available(crows, name):
    current = crows.isa()
    try:
        crows.isa(name)
    except ValueError:
        return False
    finally:
        crows.isa(current)
    return True


def test_bad_arguments():
    y, g, tau, v = random_state(16)
    kw = dict(ndim=NDIM, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="one shape"):
        sgdg_step_(y, g[:-1], tau, **kw)
    with pytest.raises(ValueError, match="needs a momentum buffer"):
        sgdg_step_(y, g, None, **kw)
    with pytest.raises(ValueError, match="share memory"):
        sgdg_step_(y, g, y, **kw)
    with pytest.raises(ValueError, match="grad_clip"):
        sgdg_step_(y, g, tau, grad_clip=0.0, **kw)
    with pytest.raises(ValueError, match="ndim"):
        sgdg_step_(y, g, tau, ndim=0, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="backend"):
        sgdg_step_(y, g, tau, backend="gpu", **kw)
    with pytest.raises(ValueError, match="lr"):
        sgdg_step_(y, g, tau, ndim=NDIM, lr=math.nan, momentum=0.9)
    with pytest.raises(TypeError, match="floating-point"):
        sgdg_step_(y.long(), g, tau, **kw)
    akw = dict(ndim=NDIM, step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    with pytest.raises(ValueError, match="one per point"):
        adamg_step_(y, g, tau, v[:-1], **akw)
    with pytest.raises(ValueError, match="beta2"):
        adamg_step_(y, g, tau, v, **{**akw, "beta2": 1.0})
    with pytest.raises(ValueError, match="step"):
        adamg_step_(y, g, tau, v, **{**akw, "step": 0})


# ------------------------------------------------------- property: C == torch
@needs_c
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    n=st.integers(2, 70),
    scale=st.floats(1e-3, 1e3),
    lr=st.floats(0.0, 3.0),
    momentum=st.floats(0.0, 0.99),
    nu=st.one_of(st.none(), st.floats(1e-3, 10.0)),
    seed=st.integers(0, 2**16),
)
def test_c_equals_torch_property(rows, n, scale, lr, momentum, nu, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, n, generator=gen, dtype=F64) * scale
    g = torch.randn(rows, n, generator=gen, dtype=F64) / scale
    # |tau| ~ |y| and |g| ~ 1/|y| (a scale-invariant gradient): angles up to ~25 radians
    tau = Grassmann1().proju(y, torch.randn(rows, n, generator=gen, dtype=F64)) * scale
    out = []
    for backend in ("c", "torch"):
        ys, ts = y.clone(), tau.clone()
        sgdg_step_(ys, g, ts, ndim=1, lr=lr, momentum=momentum, grad_clip=nu, backend=backend)
        out.append((ys, ts))
    assert _err(out[0][0], out[1][0]) < 1e-12
    assert _rel(out[0][1], out[1][1]) < 1e-12


# --------------------------------------------------------------- other devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_torch_path_matches_cpu():
    y, g, m, v = random_state(17)
    ref = [t.clone() for t in (y, g, m, v)]
    adamg_step_(*ref, ndim=NDIM, step=2, lr=0.1, **ADAM)
    dev = [t.cuda() for t in (y, g, m, v)]
    adamg_step_(*dev, ndim=NDIM, step=2, lr=0.1, **ADAM)
    for a, b in zip(ref, dev, strict=True):
        assert _err(a, b.cpu()) < 1e-12


def test_sinc_series_and_formula_meet():
    t = torch.tensor([0.0, 1e-6, 9.9e-5, 1e-4, 1.01e-4, 0.5, 3.0], dtype=F64)
    expected = torch.tensor([1.0] + [math.sin(x) / x for x in t.tolist()[1:]], dtype=F64)
    assert _err(torch_rows.sinc(t), expected) < 3e-16  # one ulp


def test_bench_smoke():
    """The benchmark runs end to end on a tiny parameter set (no timing is asserted)."""
    medians = bench.run(repeats=1, shapes=[(4, 2, 3, 3), (6, 4, 1, 1)], verbose=False)
    assert medians and all(t > 0 for t in medians.values())
    shapes = bench.resnet18_conv_shapes()
    assert len(shapes) == 20 and sum(math.prod(s) for s in shapes) == 11_166_912
