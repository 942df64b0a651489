"""The fused SGD-G / Adam-G kernels (rbn_geoopt.optim._fused: C and its torch twin) against
the composition of Grassmann1 operators, the C path against the torch path, the guard's
C sweep, and the backend rules.

The kernels are private and trust their caller (the optimizers validate once); the small
wrappers below call them as the optimizers do."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt import Grassmann1
from rbn_geoopt.manifold import sinc
from rbn_geoopt.optim import _fused

needs_c = pytest.mark.skipif(
    _fused._crows is None,
    reason="C extension rbn_geoopt.optim._fused._crows not built "
    "(python setup.py build_ext --inplace, or pip install -e .)",
)
BACKENDS = ["torch", pytest.param("c", marks=needs_c)]
F64 = torch.float64
# largest error vs the float64 composition (relative to max(1, largest entry)): float32 is
# ~60 eps32 because steps of up to ~20 radians are tested (the error grows with the angle)
TOL = {torch.float64: 1e-12, torch.float32: 4e-6}
SHAPE, NDIM = (40, 3, 3, 3), 3  # 40 points of G(1, 27)
ADAM = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


def _sizes(ys, ndims):
    ndims = ndims if isinstance(ndims, list) else [ndims] * len(ys)
    return [math.prod(y.shape[y.dim() - k :]) for y, k in zip(ys, ndims, strict=True)]


def _nu(grad_clip):
    return math.inf if grad_clip is None else grad_clip


def sgdg_foreach_(ys, gs, taus, *, ndims, lr, momentum, grad_clip=None, backend=None):
    """The fused SGD-G step of a tensor list, as SGDG calls it (under no_grad)."""
    choice = _fused.backend() if backend is None else backend
    ns, nu = _sizes(ys, ndims), _nu(grad_clip)
    with torch.no_grad():
        _fused.sgdg_(ys, gs, taus, ns, lr=lr, momentum=momentum, nu=nu, choice=choice)


def sgdg_step_(y, g, tau, *, ndim, **kw):
    sgdg_foreach_([y], [g], [tau], ndims=ndim, **kw)


def adamg_foreach_(ys, gs, ms, vs, *, ndims, steps, lr, beta1, beta2, eps, grad_clip=None,
                   backend=None):  # fmt: skip
    """The fused Adam-G step of a tensor list at step numbers ``steps``, as AdamG calls it."""
    choice = _fused.backend() if backend is None else backend
    steps = steps if isinstance(steps, list) else [steps] * len(ys)
    sizes = [lr * math.sqrt(1 - beta2**k) / (1 - beta1**k) for k in steps]
    with torch.no_grad():
        _fused.adamg_(
            ys, gs, ms, vs, _sizes(ys, ndims), sizes, beta1=beta1, beta2=beta2, eps=eps,
            nu=_nu(grad_clip), choice=choice,
        )  # fmt: skip


def adamg_step_(y, g, m, v, *, ndim, step, **kw):
    adamg_foreach_([y], [g], [m], [v], ndims=ndim, steps=step, **kw)


# --------------------------------------------------------------- references
def _clip(man, y, h, nu):
    if nu is None:
        return h
    norm = man.norm(y, h, keepdim=True)
    return h * torch.where(norm > nu, nu / norm, torch.ones_like(norm))


def _radius(man, y):
    return torch.linalg.vector_norm(y, dim=tuple(range(-man.ndim, 0)), keepdim=True)


def ref_sgdg(y, g, tau, *, lr, momentum, nu=None, ndim=NDIM):
    """docs/design.md, "The optimizers SGD-G and Adam-G", through Grassmann1's operators,
    one tensor at a time: the new point at the norm of ``y``, tau its lift there (the test
    points have norms 0.3..3, away from the unit rows that are written at norm 1)."""
    man = Grassmann1(ndim=ndim)
    h = _clip(man, y, man.egrad2rgrad(y, g), nu)
    d = -lr * h if tau is None else momentum * man.proju(y, tau) - lr * h
    new_y, new_tau = man.expmap_transp(y, d, d)
    r = _radius(man, y)
    return new_y * r, new_tau * r


def ref_adamg(y, g, m, v, *, step, lr, beta1, beta2, eps, nu=None, ndim=NDIM):
    man = Grassmann1(ndim=ndim)
    h = _clip(man, y, man.egrad2rgrad(y, g), nu)
    m = beta1 * man.proju(y, m) + (1 - beta1) * h
    v = beta2 * v + (1 - beta2) * man.inner(y, h, keepdim=True)
    d = -lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) * m / (v + eps).sqrt()
    new_y, new_m = man.expmap_transp(y, d, m)
    r = _radius(man, y)
    return new_y * r, new_m * r, v


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
@pytest.mark.parametrize("unit", [False, True])
def test_zero_step_leaves_the_point_bit_identical(backend, dtype, unit):
    """g = 0 and zero momentum: d = 0, the point is not touched (not even renormalised)."""
    y, _, _, _ = random_state(3)
    y = (Grassmann1(ndim=NDIM).projx(y) if unit else y).to(dtype)
    ys, tau = y.clone(), torch.zeros_like(y)
    sgdg_step_(ys, torch.zeros_like(y), tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    assert torch.equal(ys, y) and (tau == 0).all()
    ya, m, v = y.clone(), torch.zeros_like(y), torch.zeros(SHAPE[0], dtype=dtype)
    for eps in (1e-8, 0.0):  # eps = 0 with v = 0: still a zero step, no 0 * inf
        adamg_step_(
            ya, torch.zeros_like(y), m, v, ndim=NDIM, step=1, lr=0.1, beta1=0.9, beta2=0.99,
            eps=eps, grad_clip=0.1, backend=backend,
        )  # fmt: skip
        assert torch.equal(ya, y)
        assert (m == 0).all() and (v == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_rows_are_written_at_norm_one_and_others_keep_their_norm(backend, dtype):
    """Rounding does not accumulate on unit rows; a converted model's rows keep their norm."""
    man = Grassmann1(ndim=NDIM)
    y, g, tau, _ = random_state(31)
    y[:20] = man.projx(y[:20])
    y, g, tau = y.to(dtype), g.to(dtype), tau.to(dtype)
    norms = _radius(man, y.double())
    for _ in range(50):
        sgdg_step_(y, g, tau, ndim=NDIM, lr=0.3, momentum=0.9, backend=backend)
    eps = torch.finfo(dtype).eps
    assert (_radius(man, y[:20].double()) - 1).abs().max() <= 4 * eps
    assert ((_radius(man, y[20:].double()) / norms[20:] - 1).abs().max()) <= 4 * 50 * eps


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_with_momentum_keeps_moving(backend):
    """d = gamma tau: the point moves along its geodesic and tau is transported along it."""
    y, _, tau, _ = random_state(4)
    ref_y, ref_tau = ref_sgdg(y, torch.zeros_like(y), tau, lr=0.1, momentum=0.9)
    sgdg_step_(y, torch.zeros_like(y), tau, ndim=NDIM, lr=0.1, momentum=0.9, backend=backend)
    assert _err(y, ref_y) < 1e-12 and _err(tau, ref_tau) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_properties(backend):
    """Norms kept, tangent momentum, transport keeps the metric norm of d."""
    y, g, tau, _ = random_state(5)
    man = Grassmann1(ndim=NDIM)
    d = 0.9 * tau - 0.3 * man.egrad2rgrad(y, g)
    d_norm, norms = man.norm(y, d), y.flatten(1).norm(dim=1)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.3, momentum=0.9, backend=backend)
    assert _err(y.flatten(1).norm(dim=1), norms) < 1e-14
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
    with pytest.raises(ValueError, match="left unchanged"):
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
    with pytest.raises(ValueError, match="non-finite gradient.*left unchanged"):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "row_slice"])
def test_non_contiguous_tensors_are_stepped_and_written_back(layout, backend, monkeypatch):
    """Strided CPU float32/float64 tensors: the C kernel on contiguous copies, written
    back (auto), or the torch twin (torch); the same rows as the reference either way."""
    monkeypatch.setenv(_fused.ENV_VAR, backend)
    y, g, tau, _ = random_state(9)
    ref_y, ref_tau = ref_sgdg(y, g, tau, lr=0.1, momentum=0.9)
    if layout == "channels_last":
        y, tau = (t.contiguous(memory_format=torch.channels_last) for t in (y, tau))
    else:  # every point is a slice of a wider row
        wide = torch.zeros(SHAPE[0], 4, 3, 3, dtype=F64)
        wide[:, :3] = y
        y = wide[:, :3]
    assert not y.is_contiguous()
    assert not _fused.c_ok("auto", y, g, tau)
    version = y._version
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert _err(y, ref_y) < 1e-12 and _err(tau, ref_tau) < 1e-12
    assert y._version > version and not y.is_contiguous()  # written in place, layout kept
    if layout == "row_slice":
        assert (wide[:, 3] == 0).all()


@needs_c
@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
def test_channels_last_takes_the_c_kernel_through_copies(algo, monkeypatch):
    """A channels_last step equals, bit for bit, the C kernel's step of the same values
    laid out contiguously (and the twin is not called)."""
    y, g, m, v = random_state(16)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (y, g, m)]
    plain = [t.clone() for t in (y, g, m)]
    v_cl, v_plain = v.clone(), v.clone()
    monkeypatch.setattr(_fused.torch_twin, "sgdg_many_", None)  # a call would raise
    monkeypatch.setattr(_fused.torch_twin, "adamg_many_", None)
    for (yy, gg, mm), vv in ((cl, v_cl), (plain, v_plain)):
        if algo == "sgdg":
            sgdg_step_(yy, gg, mm, ndim=NDIM, lr=0.1, momentum=0.9)
        else:
            adamg_step_(yy, gg, mm, vv, ndim=NDIM, step=2, lr=0.1, **ADAM)
    assert torch.equal(cl[0], plain[0]) and torch.equal(cl[2], plain[2])
    assert torch.equal(v_cl, v_plain) and cl[0].is_contiguous(memory_format=torch.channels_last)


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
    y = 2 * man.projx(y)  # norm 2: away from the rows written back at norm 1
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
    with pytest.raises(ValueError, match="RBN_GEOOPT_KERNELS=c: the C kernel takes"):
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
    sgdg_foreach_(ys, gs, ms, ndims=ndims, **kw)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    steps = [1, 2, 3, 4, 5]  # per-tensor step counts (e.g. parameters added later)
    for (y, g, m, v, ndim), step in zip(one, steps, strict=True):
        adamg_step_(y, g, m, v, ndim=ndim, step=step, **akw)
    ys, gs, ms, vs, ndims = (list(c) for c in zip(*many, strict=True))
    adamg_foreach_(ys, gs, ms, vs, ndims=ndims, steps=steps, **akw)
    for a, b in zip(one, many, strict=True):
        for x, z in zip(a[:4], b[:4], strict=True):
            assert torch.equal(x, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreach_steps_every_tensor_and_leaves_a_bad_row_unchanged(backend):
    """The guard keeps such rows from the kernel; bypassed, the kernel never writes them."""
    states = _foreach_states()
    ys, gs, ms, _, ndims = (list(c) for c in zip(*states, strict=True))
    ys[1][4] = 0.0  # a zero point in the second tensor
    before = [y.clone() for y in ys]
    with pytest.raises(ValueError, match="left unchanged"):
        sgdg_foreach_(ys, gs, ms, ndims=ndims, lr=0.2, momentum=0.9, backend=backend)
    assert not torch.equal(ys[0], before[0]) and not torch.equal(ys[2], before[2])
    assert torch.equal(ys[1][4], before[1][4])
    assert not torch.equal(ys[1][5], before[1][5])


@needs_c
def test_c_entry_points_refuse_malformed_jobs():
    crows = _fused._crows
    with pytest.raises(TypeError):
        crows.sgdg_many([(1, 2)], 0, 0.1, 0.9, math.inf, 0.0, 1)
    with pytest.raises(ValueError, match="bad tensor 0"):
        crows.sgdg_many([(0, 0, 0, 3, 4)], 0, 0.1, 0.9, math.inf, 0.0, 1)
    with pytest.raises(ValueError, match="dtype"):
        crows.adamg_many([], 7, 0.9, 0.99, 1e-8, math.inf, 0.0, 1)
    with pytest.raises(ValueError, match="nthreads"):
        crows.sgdg_many([], 0, 0.1, 0.9, math.inf, 0.0, 0)
    with pytest.raises(ValueError, match="bad tensor 0"):
        crows.check_rows([(0, 0, 3, 4, 0.0, 1.0, 1.0)], 0, 1)
    assert crows.sgdg_many([], 1, 0.1, 0.9, math.inf, 0.0, 2) == []
    assert crows.check_rows([], 1, 2) == []


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
    spy = _Spy(_fused._crows)
    monkeypatch.setattr(_fused, "_crows", spy)
    y, g, tau, _ = random_state(13)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert spy.calls == 1
    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert spy.calls == 1
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")  # explicit wins
    assert spy.calls == 2
    monkeypatch.setenv(_fused.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=_fused.ENV_VAR):
        sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)


def test_without_extension_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(_fused, "_crows", None)
    y, g, tau, _ = random_state(14)
    ref_y, _ = ref_sgdg(y, g, tau, lr=0.1, momentum=0.9)
    sgdg_step_(y, g, tau, ndim=NDIM, lr=0.1, momentum=0.9)
    assert _err(y, ref_y) < 1e-12
    assert _fused.check_rows([y], [g], [27], "auto") == [(-1, -1)]
    monkeypatch.setenv(_fused.ENV_VAR, "c")
    with pytest.raises(ValueError, match="not built"):
        _fused.backend()


@needs_c
def test_thread_count_does_not_change_results(monkeypatch):
    y, g, tau, _ = random_state(15, shape=(300, 64, 3, 3))
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert _fused._nthreads(y.numel(), 300) == threads
        yc, tc = y.clone(), tau.clone()
        sgdg_step_(yc, g, tc, ndim=NDIM, lr=0.1, momentum=0.9, backend="c")
        results.append((yc, tc))
    for yc, tc in results[1:]:
        assert torch.equal(yc, results[0][0]) and torch.equal(tc, results[0][1])
    assert _fused._nthreads(100, 10) == 1  # small tensors: one thread


@needs_c
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("bad_rows", [(), (0,), (1, 6), (3, 4, 5), (6,), tuple(range(7))])
def test_c_blocks_and_bad_rows_anywhere(monkeypatch, threads, bad_rows):
    """Rows are split in blocks over threads and in chunks inside a block (pass 1 over a
    chunk's rows, then pass 2): every block boundary and bad-row position agrees with
    the torch path, bad rows stay untouched and are reported."""
    _c_against_torch(monkeypatch, threads, bad_rows, (7, 5, 2, 2))


@needs_c
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("shape", "bad_rows"),
    [
        ((600, 1, 1, 3), ()),  # rows of 3: chunks of 256 rows
        ((600, 1, 1, 3), (0, 255, 256, 511, 599)),  # bad rows at the chunks' edges
        ((3, 2, 100, 100), (1,)),  # rows of 20,000 (> 16,384): chunks of one row
    ],
)
def test_c_chunks_inside_a_block(monkeypatch, threads, shape, bad_rows):
    """The C kernel's chunks (at most 16,384 elements or 256 rows, _rows_impl.h) cut
    short rows into several chunks and give a long row a chunk of its own: same results
    as the torch path on every row, bad rows untouched and reported."""
    _c_against_torch(monkeypatch, threads, bad_rows, shape)


def _c_against_torch(monkeypatch, threads, bad_rows, shape):
    monkeypatch.setattr(_fused, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    y, g, m, v = random_state(18, shape=shape)
    rows = shape[0]
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
                with pytest.raises(ValueError, match="left unchanged"):
                    call(ndim=NDIM, backend=backend)
            else:
                call(ndim=NDIM, backend=backend)
        out[backend] = (ys, ts, ms, vs)
    good = [r for r in range(rows) if r not in bad_rows]
    for a, b, before in zip(out["c"], out["torch"], (y, m, m, v), strict=True):
        assert _err(a[good], b[good]) < 1e-12 if good else True
        for r in bad_rows:
            assert torch.equal(a[r].isnan(), before[r].isnan())
            assert torch.equal(a[r].nan_to_num(), before[r].nan_to_num())


@needs_c
def test_every_isa_copy_agrees_with_torch():
    """The baseline and the AVX2 + FMA copies of the C kernel (those this CPU has)."""
    crows = _fused._crows
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
@pytest.mark.parametrize("n", [1037, 40000])  # 4 blocks of 256 + 13; rows > 2^15 elements
def test_long_float32_rows_in_every_isa_copy(n):
    """float32 rows accumulate their dot products in float over blocks of 256 elements
    (the block sums in double): long rows against the float64 composition, row by row
    (relative to the row's norm), in every ISA copy; each row keeps its norm."""
    crows = _fused._crows
    default = crows.isa()
    isas = ["baseline"] + [name for name in ("avx2",) if _isa_available(crows, name)]
    y, g, m, v = random_state(41, shape=(5, n), ndim=1)
    g = g / math.sqrt(n)  # steps of ~0.1-1 radian
    y, g, m, v = _rounded(torch.float32, y, g, m, v)
    ref_y, ref_tau = ref_sgdg(y, g, m, lr=0.5, momentum=0.9, ndim=1)
    ref_ya, ref_m, ref_v = ref_adamg(y, g, m, v, step=3, lr=0.5, ndim=1, **ADAM)

    def rowwise(a, ref):  # largest error of a row relative to the row's norm
        return ((a.to(F64) - ref).norm(dim=1) / ref.norm(dim=1)).max().item()

    try:
        for name in isas:
            crows.isa(name)
            ys, ts, ya, ms, vs = (t.to(torch.float32) for t in (y, m, y, m, v))
            gk = g.to(torch.float32)
            sgdg_step_(ys, gk, ts, ndim=1, lr=0.5, momentum=0.9, backend="c")
            adamg_step_(ya, gk, ms, vs, ndim=1, step=3, lr=0.5, backend="c", **ADAM)
            for a, ref in ((ys, ref_y), (ts, ref_tau), (ya, ref_ya), (ms, ref_m)):
                assert rowwise(a, ref) < 1e-6, name
            assert _rel(vs, ref_v) < 1e-6, name
            for a in (ys, ya):  # the norm of each point is kept
                torch.testing.assert_close(a.to(F64).norm(dim=1), y.norm(dim=1), rtol=1e-6, atol=0)
    finally:
        crows.isa(default)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_squares_in_every_isa_copy(dtype, threads):
    """The step guard's C sweep: sum of squares and finiteness."""
    crows = _fused._crows
    default = crows.isa()
    isas = ["baseline"] + [name for name in ("avx2",) if _isa_available(crows, name)]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3 * (1 << 15) + 7, generator=gen).to(dtype)
    exact = math.fsum(float(v) ** 2 for v in x.tolist())
    code = _fused._C_DTYPES[dtype]
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
    assert _fused.sum_squares(torch.full((4,), 1e30), "auto") == (math.inf, True)
    big = torch.full((4,), 1e300, dtype=torch.float64)
    assert _fused.sum_squares(big, "auto") == (math.inf, True)
    ss, finite = _fused.sum_squares(torch.full((4,), 1e18), "auto")
    assert finite and math.isclose(ss, 4e36, rel_tol=1e-6)
    assert _fused.sum_squares(torch.ones(4, 4).t()[1:], "auto") is None  # not contiguous
    assert _fused.sum_squares(torch.ones(4, dtype=torch.float16), "c") is None  # torch reads it
    assert _fused.sum_squares(torch.ones(3), "torch") is None  # forced torch
    with pytest.raises(ValueError, match="numel"):
        _fused._crows.sum_squares(0, 5, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_rows_finds_the_first_bad_point_and_gradient(backend, dtype, monkeypatch):
    """The guard's sweep: every cause, at every position, in C and in torch alike."""
    monkeypatch.setattr(_fused, "PARALLEL_MIN_NUMEL", 0)
    lo2, hi2, _ = _fused.limits(dtype)
    y, g, _, _ = (t.to(dtype) for t in random_state(32, shape=(300, 4, 2, 2)))
    assert _fused.check_rows([y], [g], [16], backend) == [(-1, -1)]
    cases = [  # (row, point value, gradient value) -> which verdict
        (7, 0.0, None, "point"),
        (250, math.nan, None, "point"),
        (299, math.sqrt(lo2) / 8, None, "point"),  # below the range
        (3, 2 * math.sqrt(hi2), None, "point"),  # above the range
        (128, None, math.inf, "grad"),
        (0, None, math.nan, "grad"),
        (41, None, math.sqrt(hi2), "grad"),  # |g| too large
    ]
    for row, point, grad, which in cases:
        yb, gb = y.clone(), g.clone()
        if point is not None:
            yb[row] = 0.0
            yb[row, 0, 0, 0] = point
        if grad is not None:
            gb[row, 1, 0, 1] = grad
        expected = (row, -1) if which == "point" else (-1, row)
        got = _fused.check_rows([yb], [gb], [16], backend)[0]
        assert got[0] == expected[0] and (which == "point" or got[1] == row), (row, got)


@needs_c
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(301, 1, 1, 7), (1, 1, 1, 9), (5, 2, 1, 8)])
def test_c_guard_sweeps_pairs_of_rows(monkeypatch, threads, shape):
    """The C sweep reads row i together with row i + half of its block and an odd last row
    as its two halves (plus its last entry when the row is odd): a bad entry anywhere --
    either row of a pair, either half, the odd tail -- is found at its row."""
    monkeypatch.setattr(_fused, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    y, g, _, _ = random_state(33, shape=shape)
    rows, n = shape[0], math.prod(shape[1:])
    assert _fused.check_rows([y], [g], [n], "c") == [(-1, -1)]
    for row in sorted({0, rows // 2, rows - 2, rows - 1} - {-1}):
        for col in sorted({0, n // 2 - 1, n // 2, n - 1}):
            gb = g.clone()
            gb.view(rows, n)[row, col] = math.nan
            yb = y.clone()
            yb.view(rows, n)[row, col] = math.inf
            assert _fused.check_rows([y], [gb], [n], "c") == [(-1, row)], (row, col)
            assert _fused.check_rows([yb], [g], [n], "c")[0][0] == row, (row, col)


def _isa_available(crows, name):
    current = crows.isa()
    try:
        crows.isa(name)
    except ValueError:
        return False
    finally:
        crows.isa(current)
    return True


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
    assert _rel(out[0][0], out[1][0]) < 1e-12
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
    t = torch.tensor([0.0, 1e-6, 9.9e-5, 1e-4, 9.9e-3, 1e-2, 1.01e-2, 0.5, 3.0], dtype=F64)
    expected = torch.tensor([1.0] + [math.sin(x) / x for x in t.tolist()[1:]], dtype=F64)
    assert _err(sinc(t), expected) < 3e-16  # one ulp
