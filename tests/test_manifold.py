"""Grassmann1 from its specification (docs/design.md, "The manifold Grassmann1"):
invariances, consistency, numerics, input.

References here are closed forms on UNIT representatives computed in float64; every
operator is then called on rescaled representatives ``a * y`` (``a`` of either sign,
1e-3..1e3, one scale per batch element) and must agree through the lift rule: a tangent
vector ``v`` at the unit ``y`` is ``a * v`` at ``a * y``; the metric is ``<u, v> / <y, y>``.
"""

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt.manifold import Grassmann1

F64 = torch.float64
# RBN_HYPOTHESIS_EXAMPLES=2000 for a long soak run
PROPS = settings(max_examples=int(os.environ.get("RBN_HYPOTHESIS_EXAMPLES", 50)), deadline=None)


# ------------------------------------------------------------------ helpers


def dot(a: torch.Tensor, b: torch.Tensor, ndim: int) -> torch.Tensor:
    return (a * b).sum(dim=tuple(range(-ndim, 0)), keepdim=True)


def enorm(a: torch.Tensor, ndim: int) -> torch.Tensor:
    return dot(a, a, ndim).sqrt()


def unit(shape, ndim: int, gen: torch.Generator) -> torch.Tensor:
    y = torch.randn(shape, dtype=F64, generator=gen)
    return y / enorm(y, ndim)


def horizontal(y: torch.Tensor, ndim: int, gen: torch.Generator, length=1.0) -> torch.Tensor:
    """Random vector orthogonal to the unit point ``y``, of Euclidean length ``length``."""
    v = torch.randn(y.shape, dtype=F64, generator=gen)
    v = v - dot(y, v, ndim) * y
    return length * v / enorm(v, ndim)


def ref_expmap(y, u, ndim):
    """Unit y, horizontal u: y cos|u| + u/|u| sin|u| (docs/design.md, "The manifold Grassmann1")."""
    t = enorm(u, ndim)
    e = torch.where(t > 0, u / t.clamp_min(1e-300), torch.zeros_like(u))
    return y * torch.cos(t) + e * torch.sin(t)


def ref_transp_follow(y, u, v, ndim):
    """Unit y: v + <e, v>((cos t - 1) e - sin t y), e = u/|u|, t = |u|
    (docs/design.md, "The manifold Grassmann1")."""
    t = enorm(u, ndim)
    e = torch.where(t > 0, u / t.clamp_min(1e-300), torch.zeros_like(u))
    return v + dot(e, v, ndim) * ((torch.cos(t) - 1) * e - torch.sin(t) * y)


def ref_angle_parts(x, z, ndim):
    """Unit x, z: (s, theta, direction) of the minimizing geodesic from [x] to [z]."""
    c = dot(x, z, ndim)
    s = torch.where(c < 0, -1.0, 1.0).to(x.dtype)
    w = s * z - (s * c) * x
    theta = torch.atan2(enorm(w, ndim), (s * c))
    e = w / enorm(w, ndim)
    return s, theta, e


@dataclass
class Case:
    shape: tuple
    ndim: int
    dtype: torch.dtype
    seed: int
    log_scale: float
    sign: float

    @property
    def batch(self):
        return self.shape[: len(self.shape) - self.ndim]

    def scales(self, gen: torch.Generator) -> torch.Tensor:
        """One scale per batch element: +-10^U(-3, 3), times the hypothesis-drawn scale."""
        shape = self.batch + (1,) * self.ndim
        mag = 10.0 ** (6 * torch.rand(shape, dtype=F64, generator=gen) - 3)
        sgn = torch.where(torch.rand(shape, dtype=F64, generator=gen) < 0.5, -1.0, 1.0)
        a = sgn * mag * (self.sign * 10.0**self.log_scale)
        return a.to(F64)

    def tol(self, scale: float = 1.0) -> dict:
        if self.dtype == F64:
            return dict(rtol=1e-10, atol=1e-11 * scale)
        return dict(rtol=2e-4, atol=2e-5 * scale)


@st.composite
def cases(draw, dtypes=(torch.float32, F64)):
    ndim = draw(st.integers(1, 3))
    point = [draw(st.integers(1, 4)) for _ in range(ndim)]
    if math.prod(point) < 2:
        point[0] = 2
    batch = [draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))]
    return Case(
        shape=tuple(batch + point),
        ndim=ndim,
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        log_scale=draw(st.floats(-1.0, 1.0)),
        sign=draw(st.sampled_from([1.0, -1.0])),
    )


def close(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), **tol)


# ------------------------------------------------------------- invariances


@PROPS
@given(case=cases())
def test_every_operator_is_invariant_under_representative_scale_and_sign(case):
    gen = torch.Generator().manual_seed(case.seed)
    n, dt = case.ndim, case.dtype
    man = Grassmann1(ndim=n)
    y, z = unit(case.shape, n, gen), unit(case.shape, n, gen)
    lengths = math.pi * torch.rand(case.batch + (1,) * n, dtype=F64, generator=gen)
    u = horizontal(y, n, gen) * lengths
    v = horizontal(y, n, gen, 1.3)
    g = torch.randn(case.shape, dtype=F64, generator=gen)
    a, b = case.scales(gen), case.scales(gen)
    sa = a.sign()

    def q(t):  # the scaled input, in the dtype under test
        return t.to(dt)

    ay = q(a * y)
    tol = case.tol()
    tol_a = case.tol(float(a.abs().max()))
    tol_b = case.tol(float(b.abs().max()))
    # points, projections, metric
    close(man.projx(ay), sa * y, **tol)
    close(man.proju(ay, q(g)), g - dot(y, g, n) * y, **case.tol(float(g.abs().max())))
    rg = g - dot(y, g, n) * y  # egrad2rgrad at the unit point (the paper's form)
    close(man.egrad2rgrad(ay, q(g / a)), a * rg, **case.tol(float((a * rg).abs().max())))
    close(man.inner(ay, q(a * u), q(a * v)), dot(u, v, n).reshape(case.batch), **tol)
    close(man.inner(ay, q(a * u), q(a * v), keepdim=True), dot(u, v, n), **tol)
    close(man.norm(ay, q(a * u)), enorm(u, n).reshape(case.batch), **tol)
    # exponential map and transport: the representative keeps its sign, result is unit
    ey, tv = ref_expmap(y, u, n), ref_transp_follow(y, u, v, n)
    close(man.expmap(ay, q(a * u)), sa * ey, **tol)
    close(man.retr(ay, q(a * u)), sa * ey, **tol)
    close(man.transp_follow_expmap(ay, q(a * u), q(a * v)), sa * tv, **tol)
    close(man.transp_follow_retr(ay, q(a * u), q(a * v)), sa * tv, **tol)
    for fn in (man.expmap_transp, man.retr_transp):
        p, t = fn(ay, q(a * u), q(a * v))
        close(p, sa * ey, **tol)
        close(t, sa * tv, **tol)
    # dist, logmap, transp between two points: independent of both representatives
    bz = q(b * z)
    s, theta, e = ref_angle_parts(y, z, n)
    close(man.dist(ay, bz), theta.reshape(case.batch), **tol)
    close(man.dist(bz, ay), theta.reshape(case.batch), **tol)
    close(man.dist(ay, bz, keepdim=True), theta, **tol)
    close(man.logmap(ay, bz), a * theta * e, **tol_a)
    # transp(x, z, v): along the geodesic y -> s z, lifted at the representative b z
    tz = ref_transp_follow(y, theta * e, v, n)  # lives at s z
    close(man.transp(ay, bz, q(a * v)), b * s * tz, **tol_b)


@PROPS
@given(case=cases())
def test_expmap_dist_logmap_consistency(case):
    """Unit norm; dist(y, exp(y, u)) = min(|u|, pi - |u|); logmap inverts expmap below pi/2."""
    gen = torch.Generator().manual_seed(case.seed)
    n, dt = case.ndim, case.dtype
    man = Grassmann1(ndim=n)
    y = unit(case.shape, n, gen)
    a = case.scales(gen)
    lengths = math.pi * torch.rand(case.batch + (1,) * n, dtype=F64, generator=gen)
    u = horizontal(y, n, gen) * lengths
    ay, au = (a * y).to(dt), (a * u).to(dt)
    tol = case.tol()
    p = man.expmap(ay, au)
    close(enorm(p.to(F64), n), torch.ones_like(lengths), **tol)
    close(man.dist(ay, p), torch.minimum(lengths, math.pi - lengths).reshape(case.batch), **tol)
    # inside the injectivity radius: lengths in [0, 1.4] (logmap is ill-conditioned at pi/2)
    short = horizontal(y, n, gen) * (1.4 / math.pi) * lengths
    p = man.expmap(ay, (a * short).to(dt))
    close(man.logmap(ay, p), a * short, **case.tol(float(a.abs().max())))
    # and the other way: expmap(x, logmap(x, z)) is the line of z, for any z
    z = unit(case.shape, n, gen)
    back = man.expmap(ay, man.logmap(ay, z.to(dt)))
    zero = torch.zeros(case.batch, dtype=F64)
    close(man.dist(back, z.to(dt)), zero, atol=tol["atol"] * 50, rtol=0)


@PROPS
@given(case=cases())
def test_transport_is_isometric_and_tangent(case):
    gen = torch.Generator().manual_seed(case.seed)
    n, dt = case.ndim, case.dtype
    man = Grassmann1(ndim=n)
    y, z = unit(case.shape, n, gen), unit(case.shape, n, gen)
    a, b = case.scales(gen), case.scales(gen)
    lengths = 3.0 * torch.rand(case.batch + (1,) * n, dtype=F64, generator=gen)
    u = horizontal(y, n, gen) * lengths
    v, w = horizontal(y, n, gen, 1.1), horizontal(y, n, gen, 0.7)
    ay, au, av, aw = (t.to(dt) for t in (a * y, a * u, a * v, a * w))
    tol = case.tol()
    ip = dot(v, w, n).reshape(case.batch)
    bz = (b * z).to(dt)
    follow = man.expmap(ay, au), *(man.transp_follow_expmap(ay, au, t) for t in (av, aw))
    between = bz, man.transp(ay, bz, av), man.transp(ay, bz, aw)
    for target, tv, tw in (follow, between):
        close(man.inner(target, tv, tw), ip, **tol)
        close(man.inner(target, tv, tv), dot(v, v, n).reshape(case.batch), **tol)
        cos = dot(target.to(F64), tv.to(F64), n) / (enorm(target.to(F64), n) * enorm(tv.to(F64), n))
        close(cos, torch.zeros_like(cos), atol=tol["atol"] * 10, rtol=0)


@PROPS
@given(case=cases())
def test_retr_transp_is_reversible(case):
    """(Z, Q) = retr_transp(X, U, U); retr_transp(Z, -Q, Q) = (projx(X), U / |X|)."""
    gen = torch.Generator().manual_seed(case.seed)
    n, dt = case.ndim, case.dtype
    man = Grassmann1(ndim=n)
    y = unit(case.shape, n, gen)
    a = case.scales(gen)
    lengths = 3.0 * torch.rand(case.batch + (1,) * n, dtype=F64, generator=gen)
    u = horizontal(y, n, gen) * lengths
    v = horizontal(y, n, gen, 0.8)
    X, U, V = (t.to(dt) for t in (a * y, a * u, a * v))
    Z, Q = man.retr_transp(X, U, U)
    X1, U1 = man.retr_transp(Z, -Q, Q)
    tol = case.tol(4.0)
    # expmap returns unit points, so we come back to the unit representative of X with its
    # sign, and to U expressed there (U / |a|, sign kept): the lift rule
    close(X1, a.sign() * y, **tol)
    close(U1, a.sign() * u, **tol)
    # a second vector rides along: (Z, V') = expmap_transp(X, U, V); back with -U'
    Z2, V1 = man.expmap_transp(X, U, V)
    Up = man.transp_follow_expmap(X, U, U)
    X2, V2 = man.expmap_transp(Z2, -Up, V1)
    close(X2, a.sign() * y, **tol)
    close(V2, a.sign() * v, **tol)


@PROPS
@given(case=cases(), data=st.data())
def test_dist_is_a_metric(case, data):
    gen = torch.Generator().manual_seed(case.seed)
    n, dt = case.ndim, case.dtype
    man = Grassmann1(ndim=n)
    x, y, z = (unit(case.shape, n, gen) * case.scales(gen) for _ in range(3))
    x, y, z = x.to(dt), y.to(dt), z.to(dt)
    if data.draw(st.booleans()):  # nearby triples make the triangle inequality tight
        y = (x.to(F64) + 1e-3 * torch.randn(case.shape, dtype=F64, generator=gen)).to(dt)
    dxy, dyx = man.dist(x, y), man.dist(y, x)
    close(dxy, dyx, rtol=0, atol=1e-15 if dt == F64 else 1e-6)
    slack = 1e-12 if dt == F64 else 1e-5
    assert bool((dxy >= 0).all()) and bool((dxy <= math.pi / 2 + slack).all())
    assert bool((man.dist(x, z) <= dxy + man.dist(y, z) + slack).all())
    close(man.dist(x, x), torch.zeros(case.batch, dtype=F64), rtol=0, atol=slack)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("ndim", [2, 3])
def test_ndim_points_equal_flattened_points(ndim):
    """Grassmann1(ndim) on (B, *p) is Grassmann1(1) on (B, prod(p)), operator by operator."""
    gen = torch.Generator().manual_seed(ndim)
    point = (3, 2, 2)[-ndim:]
    shape = (4, *point)
    m, m1 = Grassmann1(ndim=ndim), Grassmann1()

    def flat(t):
        return t.reshape(4, -1)

    y, z = 2.5 * unit(shape, ndim, gen), -0.3 * unit(shape, ndim, gen)
    u, v = horizontal(y / 2.5, ndim, gen, 1.1), horizontal(y / 2.5, ndim, gen)
    g = torch.randn(shape, dtype=F64, generator=gen)
    pairs = [
        (m.projx(y), m1.projx(flat(y))),
        (m.proju(y, g), m1.proju(flat(y), flat(g))),
        (m.egrad2rgrad(y, g), m1.egrad2rgrad(flat(y), flat(g))),
        (m.expmap(y, u), m1.expmap(flat(y), flat(u))),
        (m.transp_follow_expmap(y, u, v), m1.transp_follow_expmap(flat(y), flat(u), flat(v))),
        (m.logmap(y, z), m1.logmap(flat(y), flat(z))),
        (m.transp(y, z, v), m1.transp(flat(y), flat(z), flat(v))),
    ]
    for ours, ref in pairs:
        assert ours.shape == shape
        torch.testing.assert_close(flat(ours), ref, rtol=1e-13, atol=1e-14)
    for ours, ref in [
        (m.dist(y, z), m1.dist(flat(y), flat(z))),
        (m.inner(y, u, v), m1.inner(flat(y), flat(u), flat(v))),
        (m.norm(y, u), m1.norm(flat(y), flat(u))),
    ]:
        assert ours.shape == (4,)
        torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-14)
    assert m.dist(y, z, keepdim=True).shape == (4,) + (1,) * ndim


def test_single_point_broadcasts_against_a_batch():
    gen = torch.Generator().manual_seed(0)
    man = Grassmann1()
    y = unit((5,), 1, gen)
    U = torch.stack([horizontal(y, 1, gen, 0.5 * k) for k in range(4)])
    out = man.expmap(y, U)
    assert out.shape == (4, 5)
    for k in range(4):
        torch.testing.assert_close(out[k], man.expmap(y, U[k]), rtol=0, atol=1e-15)
    assert man.inner(y, U).shape == (4,)
    assert man.dist(y, out).shape == (4,)


# ---------------------------------------------------------------- numerics


def _finite(*ts):
    for t in ts:
        assert bool(torch.isfinite(t).all()), t


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", [1.0, -0.05, 40.0])
def test_zero_step_and_zero_vector(dtype, scale):
    gen = torch.Generator().manual_seed(1)
    man = Grassmann1()
    y = unit((3, 6), 1, gen)
    v = horizontal(y, 1, gen)
    Y, V, O = (scale * y).to(dtype), (scale * v).to(dtype), torch.zeros(3, 6, dtype=dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    p = man.expmap(Y, O)
    t = man.transp_follow_expmap(Y, O, V)
    p2, t2 = man.expmap_transp(Y, O, V)
    _finite(p, t, p2, t2)
    close(p, math.copysign(1, scale) * y, **tol)
    close(p2, math.copysign(1, scale) * y, **tol)
    close(t, math.copysign(1, scale) * v, **tol)  # v/|Y| at the unit point
    close(t2, math.copysign(1, scale) * v, **tol)
    # v = 0 is transported to 0, along any step, including none
    for step in (O, V):
        out = man.transp_follow_expmap(Y, step, O)
        _finite(out)
        assert bool((out == 0).all())
    out = man.transp(Y, Y, O)
    _finite(out)
    assert bool((out == 0).all())
    # u = 0 also through logmap/transp at the same point
    _finite(man.logmap(Y, Y), man.transp(Y, Y, V))
    close(man.transp(Y, Y, V), V.to(F64), **tol)
    assert float(man.logmap(Y, Y).abs().max()) < (1e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("length", [1e-30, 1e-200, 1e-8])
def test_tiny_steps(length):
    gen = torch.Generator().manual_seed(2)
    man = Grassmann1()
    y = unit((4, 5), 1, gen)
    e, v = horizontal(y, 1, gen), horizontal(y, 1, gen, 2.0)
    for a in (1.0, -3.0):
        p, t = man.expmap_transp(a * y, a * length * e, a * v)
        _finite(p, t, man.expmap(a * y, a * length * e))
        sa = math.copysign(1, a)
        close(p, sa * (y * math.cos(length) + e * math.sin(length)), rtol=1e-15, atol=1e-16)
        close(t, sa * ref_transp_follow(y, length * e, v, 1), rtol=1e-15, atol=1e-16)
        if length == 1e-8:  # smaller steps are below the resolution of p itself
            # the step is not lost: (p - y) / t -> e to first order
            close((sa * p - y) / length, e, rtol=0, atol=1e-7)
            # and it is measured back (p is rounded to eps, so ~eps / 1e-8 relative)
            d = man.dist(a * y, p)
            assert float(((d - length) / length).abs().max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cut_locus(dtype):
    """<x, y> = 0: dist = pi/2, logmap of length pi/2 towards +-y, transp finite and isometric."""
    gen = torch.Generator().manual_seed(3)
    man = Grassmann1()
    e = torch.eye(4, dtype=F64)
    x = unit((6, 5), 1, gen)
    yy = horizontal(x, 1, gen)  # orthogonal to x up to rounding
    axes = (torch.stack([e[0], e[1]]), torch.stack([e[1], -3.0 * e[0]]))  # exactly orthogonal
    for P, Q in (axes, (2.0 * x, -0.5 * yy)):
        P, Q = P.to(dtype), Q.to(dtype)
        n = P.shape[0]
        tol = 1e-6 if dtype == torch.float32 else 1e-14
        d = man.dist(P, Q)
        close(d, torch.full((n,), math.pi / 2, dtype=F64), rtol=0, atol=tol)
        lg = man.logmap(P, Q)
        _finite(lg)
        close(man.norm(P, lg), torch.full((n,), math.pi / 2, dtype=F64), rtol=0, atol=tol)
        close(dot(P, lg, 1) / enorm(P, 1), torch.zeros(n, 1, dtype=F64), rtol=0, atol=tol)
        close(man.dist(man.expmap(P, lg), Q), torch.zeros(n, dtype=F64), rtol=0, atol=10 * tol)
        v = man.proju(P, torch.randn(P.shape, dtype=F64, generator=gen).to(dtype))
        t = man.transp(P, Q, v)
        _finite(t)
        close(man.norm(Q, t), man.norm(P, v), rtol=10 * tol, atol=10 * tol)
        cos = dot(Q, t, 1) / (enorm(Q, 1) * enorm(t, 1))
        close(cos, torch.zeros(n, 1, dtype=F64), rtol=0, atol=10 * tol)
        # deterministic: the same call gives the same geodesic
        assert torch.equal(man.transp(P, Q, v), t) and torch.equal(man.logmap(P, Q), lg)


OPS = {
    "projx": lambda m, y, z, u, v: m.projx(y),
    "proju": lambda m, y, z, u, v: m.proju(y, z),
    "egrad2rgrad": lambda m, y, z, u, v: m.egrad2rgrad(y, z),
    "inner": lambda m, y, z, u, v: m.inner(y, u, v),
    "norm": lambda m, y, z, u, v: m.norm(y, u),
    "expmap": lambda m, y, z, u, v: m.expmap(y, u),
    "transp_follow_expmap": lambda m, y, z, u, v: m.transp_follow_expmap(y, u, v),
    "expmap_transp": lambda m, y, z, u, v: m.expmap_transp(y, u, v),
    "retr_transp": lambda m, y, z, u, v: m.retr_transp(y, u, v),
    "dist": lambda m, y, z, u, v: m.dist(y, z),
    "logmap": lambda m, y, z, u, v: m.logmap(y, z),
    "transp": lambda m, y, z, u, v: m.transp(y, z, v),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_half_precision_is_computed_in_float32(dtype, op):
    gen = torch.Generator().manual_seed(4)
    man = Grassmann1(ndim=2)
    y, z = unit((3, 2, 4), 2, gen), unit((3, 2, 4), 2, gen)
    u, v = horizontal(y, 2, gen, 0.7), horizontal(y, 2, gen)
    half = [t.to(dtype) for t in (3.0 * y, z, 3.0 * u, 3.0 * v)]
    out = OPS[op](man, *half)
    ref = OPS[op](man, *(t.float() for t in half))
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs, strict=True):
        assert o.dtype == dtype
        _finite(o)
        assert torch.equal(o, r.to(dtype)), (o, r)


# ------------------------------------------------------------------- input


def test_zero_vector_is_not_a_point_and_its_index_is_named():
    man = Grassmann1(ndim=2)
    x = torch.randn(4, 3, 2, 5, dtype=F64)
    assert man.check_point_on_manifold(x)
    assert man.check_point_on_manifold(1e-30 * x)  # any non-zero vector is a point
    x[2, 1] = 0
    ok, reason = man.check_point_on_manifold(x, explain=True)
    assert not ok
    assert "(2, 1)" in reason and "zero" in reason
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        man.assert_check_point_on_manifold(x)
    with pytest.raises(ValueError, match="zero"):
        Grassmann1().assert_check_point_on_manifold(torch.zeros(3))


def test_point_of_size_one_is_refused_at_shape_check():
    for man, shape in ((Grassmann1(), (4, 1)), (Grassmann1(ndim=3), (2, 1, 1, 1))):
        x = torch.ones(shape)
        assert not man.check_point(x)
        ok, reason = man.check_point(x, explain=True)
        assert not ok and reason
        with pytest.raises(ValueError):
            man.assert_check_point(x)
        with pytest.raises(ValueError):
            man.assert_check_point_on_manifold(x)
        with pytest.raises(ValueError):
            man.random(*shape)
    assert Grassmann1(ndim=3).check_point(torch.ones(2, 2, 1, 1))  # size 2 is fine


def test_too_few_dimensions_is_a_clear_error():
    man = Grassmann1(ndim=3)
    ok, reason = man.check_point(torch.ones(4, 5), explain=True)
    assert not ok and "ndim" in reason
    with pytest.raises(ValueError, match="ndim"):
        man.assert_check_point_on_manifold(torch.ones(4, 5))
    with pytest.raises(ValueError, match="ndim"):
        man.assert_check_vector_on_tangent(torch.ones(4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError):
        man.random(4, 5)


@pytest.mark.parametrize("bad", [0, -1])
def test_ndim_must_be_positive(bad):
    with pytest.raises(ValueError):
        Grassmann1(ndim=bad)


@pytest.mark.parametrize("bad", [1.5, "1", None, 2.0])
def test_ndim_must_be_an_int(bad):
    with pytest.raises(TypeError):
        Grassmann1(ndim=bad)


def test_tangent_check():
    gen = torch.Generator().manual_seed(5)
    man = Grassmann1()
    y = 7.0 * unit((3, 4), 1, gen)
    v = horizontal(y / 7.0, 1, gen, 1e3)
    assert man.check_vector_on_tangent(y, v)
    assert man.check_vector_on_tangent(y, torch.zeros_like(v))
    assert not man.check_vector_on_tangent(y, v + 0.1 * y)
    with pytest.raises(ValueError):
        man.assert_check_vector_on_tangent(y, v + 0.1 * y)


# ---------------------------------------------------------------- sampling


def test_random_uniform_and_origin():
    torch.manual_seed(0)
    man = Grassmann1(ndim=2)
    x = man.random_uniform(20000, 1, 3, dtype=F64)
    assert x.shape == (20000, 1, 3) and x.dtype == F64 and x.manifold is man
    man.assert_check_point_on_manifold(x)
    torch.testing.assert_close(enorm(x, 2), torch.ones(20000, 1, 1, dtype=F64))
    flat = x.reshape(-1, 3)
    # uniform on the sphere: mean 0, second moment I/3 (std of the estimates ~0.004)
    assert float(flat.mean(0).abs().max()) < 0.03
    second = flat.T @ flat / flat.shape[0]
    assert float((second - torch.eye(3, dtype=F64) / 3).abs().max()) < 0.02
    assert man.random(2, 2, 2).shape == (2, 2, 2)
    o = man.origin(5, 2, 3)
    assert o.shape == (5, 2, 3)
    man.assert_check_point_on_manifold(o)
    torch.testing.assert_close(enorm(o, 2), torch.ones(5, 1, 1))
    assert float(man.dist(o, o[:1]).abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("angle", [0.5, 1e2, 1e3, 1e6, 1e9])
def test_expmap_stays_unit_at_large_angles(dtype, angle):
    """cos(t) and sin(t)/t must see the same t: unclipped huge steps still land on unit rows."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, generator=gen, dtype=dtype)
    manifold = Grassmann1()
    u = manifold.proju(x, torch.randn(6, 9, generator=gen, dtype=dtype))
    u = u * (angle * x.norm(dim=-1, keepdim=True) / u.norm(dim=-1, keepdim=True))
    y, v = manifold.expmap_transp(x, u, u)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(6, dtype=dtype), rtol=0, atol=tol)
    assert (manifold.inner(y, y, v) / manifold.norm(y, v)).abs().max() < tol * 10
