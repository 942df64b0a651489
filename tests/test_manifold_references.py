"""Grassmann1 against independent references (docs/design.md, "The manifold Grassmann1"),
all in float64.

* pymanopt ``Sphere`` and ``Grassmann(n, 1)`` (numpy): exp, log, dist, projection,
  Riemannian gradient and Hessian, on unit AND non-unit representatives of either sign;
* exact parallel transport against a DOP853 integration of ``dV/dt = -<c'(t), V> c(t)``
  along the unit-speed great circle, and against N composed pymanopt projection transports
  (error ~ 1/N);
* ``dist`` of points 1e-11 apart against mpmath at 50 digits, where geoopt's ``acos`` fails.

Lift rule used throughout (docs/design.md, "The manifold Grassmann1"): the tangent vector
``v`` at the unit point ``y`` is represented by ``a * v`` at ``a * y``; the metric is
``<u, v> / <y, y>``.
"""

import math

import geoopt
import mpmath
import numpy as np
import pymanopt
import pytest
import torch
from scipy.integrate import solve_ivp

from rbn_geoopt.manifold import Grassmann1

SCALES = [1.0, -1.0, 3.7, -0.02, 250.0, -1e-3]
TOL = 1e-12


def _unit(rng: np.random.Generator, shape) -> np.ndarray:
    y = rng.standard_normal(shape)
    return y / np.linalg.norm(y)


def _horizontal(rng: np.random.Generator, y: np.ndarray, length: float) -> np.ndarray:
    """A random vector orthogonal to the unit point ``y`` with Euclidean length ``length``."""
    v = rng.standard_normal(y.shape)
    v = v - np.sum(v * y) * y
    return length * v / np.linalg.norm(v)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _close(actual, expected, tol: float = TOL) -> float:
    """Assert max-abs closeness and return the error (for the report)."""
    err = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert err <= tol, f"max abs error {err:.3e} > {tol:.1e}"
    return err


# ------------------------------------------------------------------ pymanopt


SHAPES = [(7,), (2, 3, 2)]  # ndim 1 and ndim 3 (pymanopt's Sphere accepts tensors)


@pytest.mark.parametrize("shape", SHAPES, ids=["ndim1", "ndim3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sphere_projection_gradient_inner(shape, seed):
    rng = np.random.default_rng(seed)
    man = Grassmann1(ndim=len(shape))
    sph = pymanopt.manifolds.Sphere(*shape)
    y = _unit(rng, shape)
    w, g = rng.standard_normal(shape), rng.standard_normal(shape)
    u, v = _horizontal(rng, y, 0.7), _horizontal(rng, y, 1.9)
    for a in SCALES:
        ay = _t(a * y)
        # proju depends on the line only
        _close(_np(man.proju(ay, _t(w))), sph.projection(y, w))
        # egrad2rgrad(a y, g) = a^2 P_y g  (so that a scale-invariant loss, whose Euclidean
        # gradient at a y is g / a, gets the Riemannian gradient a * rgrad(y): the lift rule)
        rg = sph.euclidean_to_riemannian_gradient(y, g)
        _close(_np(man.egrad2rgrad(ay, _t(g))), a * a * rg, TOL * max(1.0, a * a))
        _close(_np(man.egrad2rgrad(ay, _t(g / a))), a * rg, TOL * max(1.0, abs(a)))
        # metric: <a u, a v> / <a y, a y> = <u, v>
        _close(_np(man.inner(ay, _t(a * u), _t(a * v))), sph.inner_product(y, u, v))
        _close(_np(man.norm(ay, _t(a * u))), sph.norm(y, u))
        _close(_np(man.projx(ay)), math.copysign(1.0, a) * y)


@pytest.mark.parametrize("shape", SHAPES, ids=["ndim1", "ndim3"])
@pytest.mark.parametrize("length", [1e-6, 0.3, 1.2, 2.5, 4.0])
def test_sphere_exp(shape, length):
    rng = np.random.default_rng(int(length * 1e3) % 1000)
    man = Grassmann1(ndim=len(shape))
    sph = pymanopt.manifolds.Sphere(*shape)
    y = _unit(rng, shape)
    u = _horizontal(rng, y, length)
    ref = sph.exp(y, u)
    for a in SCALES:
        out = _np(man.expmap(_t(a * y), _t(a * u)))
        # expmap moves the representative continuously: the sign of a is kept, norm is 1
        _close(out, math.copysign(1.0, a) * ref)


@pytest.mark.parametrize("seed", range(4))
def test_grassmann_exp_up_to_sign(seed):
    rng = np.random.default_rng(10 + seed)
    n = 6
    man = Grassmann1()
    gr = pymanopt.manifolds.Grassmann(n, 1)
    y = _unit(rng, (n,))
    u = _horizontal(rng, y, 0.2 + 0.7 * seed)
    ref = gr.exp(y[:, None], u[:, None])[:, 0]  # QR may flip the sign of the column
    for a in SCALES:
        out = _np(man.expmap(_t(a * y), _t(a * u)))
        s = np.sign(np.dot(out, ref))
        _close(out, s * ref)
        assert gr.dist(out[:, None], ref[:, None]) < 1e-7  # pymanopt's acos: ~sqrt(eps)


@pytest.mark.parametrize("seed", range(6))
def test_log_and_dist(seed):
    """logmap/dist against pymanopt's Grassmann (sign invariant) and Sphere (at s*z)."""
    rng = np.random.default_rng(20 + seed)
    n = 5
    man = Grassmann1()
    gr = pymanopt.manifolds.Grassmann(n, 1)
    sph = pymanopt.manifolds.Sphere(n)
    x = _unit(rng, (n,))
    # angles chosen away from 0 and pi/2 so that pymanopt's acos/solve are accurate to 1e-13
    angle = [0.3, 0.9, 1.3, 1.9, 2.4, 2.9][seed]  # > pi/2: the nearer representative is -z
    z = np.cos(angle) * x + np.sin(angle) * _horizontal(rng, x, 1.0)
    s = np.sign(np.dot(x, z))
    ref_log = gr.log(x[:, None], z[:, None])[:, 0]
    _close(ref_log, sph.log(x, s * z), 1e-12)  # the two references agree
    ref_dist = gr.dist(x[:, None], z[:, None])
    _close(ref_dist, min(angle, math.pi - angle), 1e-12)
    for a in SCALES:
        for b in (1.0, -7.5, 0.04):
            ax, bz = _t(a * x), _t(b * z)
            # logmap lives at a*x: a times the lift at x; independent of z's representative
            _close(_np(man.logmap(ax, bz)), a * ref_log, TOL * max(1.0, abs(a)))
            _close(_np(man.dist(ax, bz)), ref_dist)
            _close(_np(man.dist(bz, ax)), ref_dist)


def _rayleigh_like(y: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A smooth, non-invariant test function on R^n."""
    return y @ A @ y + b @ y + (y**3).sum()


@pytest.mark.parametrize("seed", range(3))
def test_hessian_from_egrad2rgrad(seed):
    """The Riemannian Hessian is P_y(D rgrad(y)[u]) with rgrad = egrad2rgrad(y, egrad(y)).

    At a unit y, d/dt <y+tu, y+tu> = 0, so this derivative of our egrad2rgrad must equal
    pymanopt's euclidean_to_riemannian_hessian on both Sphere and Grassmann(n, 1).
    """
    rng = np.random.default_rng(30 + seed)
    n = 6
    man = Grassmann1()
    A = _t(rng.standard_normal((n, n)))
    b = _t(rng.standard_normal(n))
    y = _unit(rng, (n,))
    u = _horizontal(rng, y, 0.8)

    def egrad(p: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(_rayleigh_like)(p, A, b)

    def rgrad(p: torch.Tensor) -> torch.Tensor:
        return man.egrad2rgrad(p, egrad(p))

    yt, ut = _t(y), _t(u)
    _, ehess_u = torch.func.jvp(egrad, (yt,), (ut,))
    _, drgrad = torch.func.jvp(rgrad, (yt,), (ut,))
    ours = _np(man.proju(yt, drgrad))
    eg, eh = _np(egrad(yt)), _np(ehess_u)
    ref_s = pymanopt.manifolds.Sphere(n).euclidean_to_riemannian_hessian(y, eg, eh, u)
    ref_g = pymanopt.manifolds.Grassmann(n, 1).euclidean_to_riemannian_hessian(
        y[:, None], eg[:, None], eh[:, None], u[:, None]
    )[:, 0]
    _close(ours, ref_s, 1e-12)
    _close(ours, ref_g, 1e-12)


# ------------------------------------------------------- parallel transport


def _ode_transport(y: np.ndarray, e: np.ndarray, v: np.ndarray, T: float) -> np.ndarray:
    """Integrate dV/dt = -<c'(t), V> c(t), c(t) = y cos t + e sin t, from 0 to T."""

    def rhs(t, V):
        c = y * np.cos(t) + e * np.sin(t)
        dc = -y * np.sin(t) + e * np.cos(t)
        return -np.dot(dc, V) * c

    sol = solve_ivp(rhs, (0.0, T), v, method="DOP853", rtol=1e-13, atol=1e-13)
    assert sol.success
    return sol.y[:, -1]


@pytest.mark.parametrize("T", [0.4, 1.3, 2.2, 3.0])
def test_transp_follow_expmap_vs_ode(T):
    rng = np.random.default_rng(int(T * 10))
    n = 6
    man = Grassmann1()
    y = _unit(rng, (n,))
    e = _horizontal(rng, y, 1.0)
    v = _horizontal(rng, y, 1.7)
    v = v + 0.5 * e  # a component along the direction of motion, too
    ref = _ode_transport(y, e, v, T)
    c_T = y * np.cos(T) + e * np.sin(T)
    for a in SCALES:
        sa = math.copysign(1.0, a)
        ay, au, av = _t(a * y), _t(a * T * e), _t(a * v)
        # the result is expressed at the unit point expmap(a y, a u) = sign(a) c(T)
        _close(_np(man.transp_follow_expmap(ay, au, av)), sa * ref, 1e-10)
        _close(_np(man.transp_follow_retr(ay, au, av)), sa * ref, 1e-10)
        z, w = man.expmap_transp(ay, au, av)
        _close(_np(z), sa * c_T, 1e-12)
        _close(_np(w), sa * ref, 1e-10)
        z, w = man.retr_transp(ay, au, av)
        _close(_np(z), sa * c_T, 1e-12)
        _close(_np(w), sa * ref, 1e-10)
    # the special case used by the optimizers: transp(u, u) = u cos t - yh |u| sin t
    special = man.transp_follow_expmap(_t(y), _t(T * e), _t(T * e))
    _close(_np(special), T * (e * np.cos(T) - y * np.sin(T)))


@pytest.mark.parametrize("T", [0.5, 1.2, 1.9, 2.8])
def test_transp_between_points_vs_ode(T):
    """transp(x, z, v) follows the MINIMIZING geodesic from [x] to [z], lifted at z as given.

    For T > pi/2 the minimizing geodesic runs from x the other way round, to -c(T):
    c2(s) = x cos s - e sin s, s in [0, pi - T]; the lift at c(T) is minus the lift at -c(T).
    """
    rng = np.random.default_rng(40 + int(T * 10))
    n = 5
    man = Grassmann1()
    x = _unit(rng, (n,))
    e = _horizontal(rng, x, 1.0)
    v = _horizontal(rng, x, 1.3) + 0.4 * e
    z = x * np.cos(T) + e * np.sin(T)
    if T < math.pi / 2:
        ref = _ode_transport(x, e, v, T)
    else:
        ref = -_ode_transport(x, -e, v, math.pi - T)
    for a in SCALES:
        for b in (1.0, -2.5, 0.01):
            out = _np(man.transp(_t(a * x), _t(b * z), _t(a * v)))
            _close(out, b * ref, 1e-10 * max(1.0, abs(b)))


def _projection_transport(y: np.ndarray, e: np.ndarray, v: np.ndarray, T: float, N: int):
    """N composed pymanopt projection transports along the great circle y cos t + e sin t."""
    sph = pymanopt.manifolds.Sphere(y.size)
    V, prev = v.copy(), y
    for k in range(1, N + 1):
        t = T * k / N
        cur = y * np.cos(t) + e * np.sin(t)
        V = sph.transport(prev, cur, V)
        prev = cur
    return V


def test_projection_transport_converges_like_one_over_n():
    rng = np.random.default_rng(50)
    n, T = 6, 1.4
    man = Grassmann1()
    y = _unit(rng, (n,))
    e = _horizontal(rng, y, 1.0)
    v = _horizontal(rng, y, 1.0) + 0.8 * e
    exact = _np(man.transp_follow_expmap(_t(y), _t(T * e), _t(v)))
    Ns = [16, 32, 64, 128, 256, 512]
    approx = [_projection_transport(y, e, v, T, N) for N in Ns]
    errs = np.array([np.linalg.norm(p - exact) for p in approx])
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert -1.05 < slope < -0.95, (slope, errs)
    ratios = errs[:-1] / errs[1:]
    assert np.all(np.abs(ratios - 2.0) < 0.1), ratios
    # Richardson extrapolation removes the 1/N term: what is left is O(1/N^2), so the limit
    # of the projection transports is our transport, not merely something close to it
    rich = [np.linalg.norm(2 * approx[i + 1] - approx[i] - exact) for i in range(len(Ns) - 1)]
    assert rich[-1] < 1e-5 and rich[-1] < errs[-1] / 100, (rich, errs)


# ---------------------------------------------------------------- precision


def _mp_line_angle(x: np.ndarray, y: np.ndarray) -> float:
    """Angle between the lines of x and y, at 50 digits, on the exact float inputs."""
    with mpmath.workdps(50):
        xs = [mpmath.mpf(float(c)) for c in x]
        ys = [mpmath.mpf(float(c)) for c in y]
        n = len(xs)
        cross2 = mpmath.fsum(
            (xs[i] * ys[j] - xs[j] * ys[i]) ** 2 for i in range(n) for j in range(i + 1, n)
        )
        dot = mpmath.fsum(a * b for a, b in zip(xs, ys, strict=True))
        return float(mpmath.atan2(mpmath.sqrt(cross2), abs(dot)))


def _precision_cases():
    """Pairs 1e-11 apart: exactly representable lines, then random ones at unrelated scales."""
    e1 = np.zeros(4)
    e1[0] = 1.0
    near = e1.copy()
    near[1] = 1e-11
    yield e1, near
    yield -3.0 * np.roll(e1, 2), 0.5 * np.roll(near, 2)
    rng = np.random.default_rng(60)
    for a, b in ((1.0, 1.0), (2.0, -0.3), (1e-3, 77.7), (-450.0, -0.02)):
        x = _unit(rng, (5,))
        w = _horizontal(rng, x, 1.0)
        yield a * x, b * (x + 1e-11 * w)


@pytest.mark.parametrize("case", list(_precision_cases()))
def test_dist_of_near_points_exact(case):
    x, y = case
    exact = _mp_line_angle(x, y)
    assert 0.5e-11 < exact < 2e-11
    man = Grassmann1()
    ours = man.dist(_t(x), _t(y)).item()
    ours_rev = man.dist(_t(y), _t(x)).item()
    rel = abs(ours - exact) / exact
    assert rel < 1e-6, rel
    assert abs(ours_rev - exact) / exact < 1e-6
    # logmap has the same length, to the same precision
    lg = man.norm(_t(x), man.logmap(_t(x), _t(y))).item()
    assert abs(lg - exact) / exact < 1e-6
    # geoopt's Sphere (acos of a clamped cosine) on the same lines, same-sign unit vectors
    xs, ys = x / np.linalg.norm(x), np.sign(np.dot(x, y)) * y / np.linalg.norm(y)
    geo = geoopt.Sphere().dist(_t(xs), _t(ys)).item()
    rel_geo = abs(geo - exact) / exact
    assert rel_geo > 1e-3 > rel, (rel_geo, rel)


@pytest.mark.parametrize("seed", range(3))
def test_dist_of_near_points_float32(seed):
    """float32: points 1e-4 apart (float32 cannot hold 1e-11), exact to 1e-5 relative."""
    rng = np.random.default_rng(70 + seed)
    x = _unit(rng, (6,)).astype(np.float32)
    y = (-0.7 * (x + 1e-4 * _horizontal(rng, x.astype(np.float64), 1.0))).astype(np.float32)
    exact = _mp_line_angle(x.astype(np.float64), y.astype(np.float64))
    ours = Grassmann1().dist(torch.from_numpy(x), torch.from_numpy(y))
    assert ours.dtype == torch.float32
    rel = abs(ours.item() - exact) / exact
    assert rel < 1e-5, rel
    xs, ys = torch.from_numpy(x), -torch.from_numpy(y) / torch.from_numpy(y).norm()
    rel_geo = abs(geoopt.Sphere().dist(xs / xs.norm(), ys).item() - exact) / exact
    assert rel_geo > 1e-3, rel_geo
