"""Grassmann1 at extreme but finite scales (docs/design.md, "The manifold Grassmann1",
*Numerics*; issue 12, item 17).

Every operator is called on representatives ``c * y`` with ``c`` anywhere in
``1e-30..1e30`` (float32) or ``1e-300..1e300`` (float64), one scale per point and of either
sign, with tangent vectors following the lift rule (``c * u`` at ``c * y``, a Euclidean
gradient ``g / c``), and must give the unit-scale result mapped by its scale covariance:

==============================  =============================================
``projx(c y)``                  ``sign(c) projx(y)``
``proju(c y, c g)``             ``c proju(y, g)``
``egrad2rgrad(c y, g / c)``     ``c egrad2rgrad(y, g)``
``inner``, ``norm``, ``dist``   unchanged (``dist(c y, b z) = dist(y, z)``)
``expmap``, ``transp_follow``   ``sign(c)`` times the unit-scale result
``logmap(c y, b z)``            ``c logmap(y, z)``
``transp(c y, b z, c v)``       ``b transp(y, z, v)``
==============================  =============================================

For power-of-two scales the results are bit-identical (the operators only ever rescale by
powers of two); for other scales they agree to a few ulps of the unit-scale result.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt.manifold import Grassmann1

F32, F64 = torch.float32, torch.float64
PROPS = settings(max_examples=int(os.environ.get("RBN_HYPOTHESIS_EXAMPLES", 40)), deadline=None)
RANGE = {F32: 30, F64: 300}  # |log10 c| drawn up to this
RTOL = {F32: 2e-6, F64: 5e-15}  # ~16 ulps (float32), ~20 ulps (float64)


def _dot(a, b, ndim):
    return (a * b).sum(dim=tuple(range(-ndim, 0)), keepdim=True)


def _unit_inputs(shape, ndim, gen):
    """float64 unit point y, horizontal u (length <= 3) and v, a second point z, a vector g."""

    def rnd():
        return torch.randn(shape, dtype=F64, generator=gen)

    def unit(t):
        return t / _dot(t, t, ndim).sqrt()

    y, z = unit(rnd()), unit(rnd())

    def horizontal(length):
        t = rnd()
        return unit(t - _dot(y, t, ndim) * y) * length

    lengths = 3.0 * torch.rand(shape[: len(shape) - ndim] + (1,) * ndim, dtype=F64, generator=gen)
    return y, horizontal(lengths), horizontal(1.0), z, rnd()


def _ops(man, y, u, v, z, g, c, b):
    """Each operator at the scaled inputs, mapped back to the unit scale by its covariance
    (in float64, where every scale is representable), and at the unit inputs; c, b are the
    scales of the first and second point (float64, one per point)."""
    dt = y.dtype

    def q(t):
        return t.to(dt)

    Y, U, V, Z, S = q(c * y), q(c * u), q(c * v), q(b * z), c.sign()
    scaled = {
        "projx": (man.projx(Y), S),
        "proju": (man.proju(Y, q(c * g)), c),
        "egrad2rgrad": (man.egrad2rgrad(Y, q(g / c)), c),
        "inner": (man.inner(Y, U, V, keepdim=True), 1),
        "inner(u, u)": (man.inner(Y, U, keepdim=True), 1),
        "norm": (man.norm(Y, U, keepdim=True), 1),
        "expmap": (man.expmap(Y, U), S),
        "retr": (man.retr(Y, U), S),
        "transp_follow_expmap": (man.transp_follow_expmap(Y, U, V), S),
        "expmap_transp[0]": (man.expmap_transp(Y, U, V)[0], S),
        "expmap_transp[1]": (man.expmap_transp(Y, U, V)[1], S),
        "retr_transp[1]": (man.retr_transp(Y, U, U)[1], S),
        "dist": (man.dist(Y, Z, keepdim=True), 1),
        "logmap": (man.logmap(Y, Z), c),
        "transp": (man.transp(Y, Z, V), b),
    }
    unit = {
        "projx": man.projx(y),
        "proju": man.proju(y, g),
        "egrad2rgrad": man.egrad2rgrad(y, g),
        "inner": man.inner(y, u, v, keepdim=True),
        "inner(u, u)": man.inner(y, u, keepdim=True),
        "norm": man.norm(y, u, keepdim=True),
        "expmap": man.expmap(y, u),
        "retr": man.retr(y, u),
        "transp_follow_expmap": man.transp_follow_expmap(y, u, v),
        "expmap_transp[0]": man.expmap_transp(y, u, v)[0],
        "expmap_transp[1]": man.expmap_transp(y, u, v)[1],
        "retr_transp[1]": man.retr_transp(y, u, u)[1],
        "dist": man.dist(y, z, keepdim=True),
        "logmap": man.logmap(y, z),
        "transp": man.transp(y, z, v),
    }
    return scaled, unit


@st.composite
def scale_cases(draw):
    ndim = draw(st.integers(1, 2))
    point = [draw(st.integers(2, 5))] + [draw(st.integers(1, 3)) for _ in range(ndim - 1)]
    batch = [draw(st.integers(1, 4))]
    return (
        tuple(batch + point),
        ndim,
        draw(st.sampled_from([F32, F64])),
        draw(st.integers(0, 2**31 - 1)),
    )


def _scales(batch_shape, dtype, gen, exponent=None):
    """One scale per point: +-10^U(-R, R) (R from RANGE), or +-2^j for integer j."""
    sgn = torch.where(torch.rand(batch_shape, dtype=F64, generator=gen) < 0.5, -1.0, 1.0)
    if exponent is None:
        r = RANGE[dtype]
        return sgn * 10.0 ** (2 * r * torch.rand(batch_shape, dtype=F64, generator=gen) - r)
    j = torch.randint(-exponent, exponent + 1, batch_shape, generator=gen)
    return sgn * torch.pow(2.0, j.to(F64))


@PROPS
@given(case=scale_cases())
def test_every_operator_is_scale_covariant_over_the_whole_range(case):
    """Scales 1e-30..1e30 (float32), 1e-300..1e300 (float64): finite results, equal to the
    unit-scale results to a few ulps (normwise, per point)."""
    shape, ndim, dt, seed = case
    gen = torch.Generator().manual_seed(seed)
    man = Grassmann1(ndim=ndim)
    y, u, v, z, g = _unit_inputs(shape, ndim, gen)
    batch = shape[:1] + (1,) * ndim
    c, b = _scales(batch, dt, gen), _scales(batch, dt, gen)
    ins = [t.to(dt) for t in (y, u, v, z, g)]
    # the unit inputs in the dtype under test, so that both sides start from the same floats
    y, u, v, z, g = (t.to(F64) for t in ins)
    scaled, unit = _ops(man, *ins, c, b)
    dims = tuple(range(-ndim, 0))
    for name, (out, cov) in scaled.items():
        assert out.dtype == dt, name
        assert bool(torch.isfinite(out).all()), (name, out)
        mapped = out.to(F64) / cov
        ref = unit[name].to(F64)
        err = torch.linalg.vector_norm(mapped - ref, dim=dims)
        size = torch.linalg.vector_norm(ref, dim=dims).clamp_min(1.0)  # inner, dist: ~ 1
        assert bool((err <= RTOL[dt] * size).all()), (name, float((err / size).max()))


@PROPS
@given(case=scale_cases())
def test_power_of_two_scales_give_bit_identical_results(case):
    """c = +-2^j (|j| <= 90 in float32, 900 in float64): op(c y, ...) equals the mapped
    unit-scale result bit for bit."""
    shape, ndim, dt, seed = case
    gen = torch.Generator().manual_seed(seed)
    man = Grassmann1(ndim=ndim)
    ins = [t.to(dt) for t in _unit_inputs(shape, ndim, gen)]
    batch = shape[:1] + (1,) * ndim
    j = 90 if dt == F32 else 900
    c, b = _scales(batch, dt, gen, exponent=j), _scales(batch, dt, gen, exponent=j)
    scaled, unit = _ops(man, *ins, c, b)
    for name, (out, cov) in scaled.items():
        expected = unit[name] * (cov.to(dt) if isinstance(cov, torch.Tensor) else cov)
        assert torch.equal(out, expected), name


@pytest.mark.parametrize("dtype", [F32, F64])
def test_unscaled_shortcut_gives_the_same_floats(dtype):
    """On the CPU, a tensor whose points all have largest entries of moderate size skips
    the scaled copies (k = 1): one far-out point in the same tensor forces the scaled path
    on every point, and the other points' results must not change by a single bit."""
    gen = torch.Generator().manual_seed(5)
    man = Grassmann1(ndim=2)
    shape = (6, 3, 4)
    ins = [t.to(dtype) for t in _unit_inputs(shape, 2, gen)]
    c, b = (_scales(shape[:1] + (1, 1), dtype, gen, exponent=8) for _ in range(2))
    far = 2.0 ** (100 if dtype == F32 else 1000)
    ones = torch.ones(1, 1, 1, dtype=F64)
    moderate, _ = _ops(man, *ins, c, b)
    mixed, _ = _ops(
        man, *(torch.cat([t, t[:1]]) for t in ins), torch.cat([c, far * ones]), torch.cat([b, ones])
    )
    for name, (out, _) in moderate.items():
        assert bool(torch.isfinite(mixed[name][0][-1]).all()), name
        assert torch.equal(mixed[name][0][:-1], out), name


# ------------------------------------------------------------- the issue's cases


@pytest.mark.parametrize(
    ("dtype", "scale"), [(F32, 1e-30), (F32, 1e20), (F64, 1e-170), (F64, 1e160)]
)
def test_the_issue_cases_are_finite_and_exact(dtype, scale):
    """Issue 12, item 17: float32 rows of norm ~1e-30 or ~1e20 (float64 ~1e-170 / 1e160)
    gave inf or 0 from projx and NaN from expmap / egrad2rgrad."""
    gen = torch.Generator().manual_seed(17)
    man = Grassmann1()
    y, u, v, _, g = _unit_inputs((3, 6), 1, gen)
    Y = (scale * y).to(dtype)
    p = man.projx(Y)
    e = man.expmap(Y, (scale * u).to(dtype))
    r = man.egrad2rgrad(Y, (g / scale).to(dtype))
    for out in (p, e, r):
        assert bool(torch.isfinite(out).all())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == F32 else dict(rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(p.to(F64), y, **tol)
    # float64 closed forms at the unit point (docs/design.md, "Metric and operators")
    t = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    torch.testing.assert_close(e.to(F64), y * torch.cos(t) + u / t * torch.sin(t), **tol)
    rg = g - _dot(y, g, 1) * y
    torch.testing.assert_close(r.to(F64) / scale, rg, **tol)
    assert man.check_point_on_manifold(Y)
    assert man.check_vector_on_tangent(Y, (scale * u).to(dtype), atol=0.0)
    assert not man.check_vector_on_tangent(Y, (scale * (u + 0.1 * y)).to(dtype), atol=0.0)


# ------------------------------------------------------- the ends of the range


@pytest.mark.parametrize("dtype", [F32, F64])
def test_subnormal_and_near_max_points(dtype):
    """Points whose entries are subnormal, or so large that <y, y> overflows, are points
    like any other: the same unit representative, distances, steps and transports."""
    fi = torch.finfo(dtype)
    man = Grassmann1()
    base = torch.tensor([[3.0, -4.0, 0.0], [1.0, 2.0, 2.0]], dtype=dtype)
    unit = base / torch.linalg.vector_norm(base, dim=-1, keepdim=True)
    u = torch.tensor([[4.0, 3.0, 0.0], [0.0, 1.0, -1.0]], dtype=dtype)  # horizontal, few bits
    sub = base * fi.smallest_normal * 2.0**-8  # entries subnormal, exactly
    huge = base * 2.0 ** (math.frexp(fi.max)[1] - 3)  # |huge|^2 overflows, |huge| does not
    assert bool(torch.isinf(torch.linalg.vector_norm(huge, dim=-1)).all())
    for y in (sub, huge):
        assert man.check_point_on_manifold(y)
        assert torch.equal(man.projx(y), man.projx(base))
        torch.testing.assert_close(man.projx(y), unit, rtol=0, atol=2 * fi.eps)
        assert torch.equal(man.dist(y, base), torch.zeros(2, dtype=dtype))
        assert torch.equal(man.dist(y, -y), torch.zeros(2, dtype=dtype))
        scale = y[:, :1] / base[:, :1]  # a power of two: the lift rule is exact
        assert torch.equal(man.expmap(y, u * scale), man.expmap(base, u))
        assert torch.equal(man.norm(y, u * scale), man.norm(base, u))
        assert torch.equal(man.inner(y, u * scale), man.inner(base, u))
        assert torch.equal(
            man.transp_follow_expmap(y, u * scale, u * scale), man.transp_follow_expmap(base, u, u)
        )
    # a zero row is still named as such, a NaN row as non-finite
    bad = sub.clone()
    bad[1] = 0
    ok, reason = man.check_point_on_manifold(bad, explain=True)
    assert not ok and "zero vector" in reason and "(1,)" in reason
    bad[1] = math.nan
    ok, reason = man.check_point_on_manifold(bad, explain=True)
    assert not ok and "non-finite" in reason and "(1,)" in reason


@pytest.mark.parametrize("dtype", [F32, F64])
def test_tangent_lengths_far_from_one(dtype):
    """Metric lengths from 1e-30 to 1e30 (float32; 1e-300..1e300 in float64) at a tiny or a
    huge point: norm exact, expmap a unit vector (exact for lengths of order 1); a metric
    length beyond the float range gives norm inf and a NaN step, never a finite wrong value."""
    man = Grassmann1()
    r = RANGE[dtype]
    eps = torch.finfo(dtype).eps
    e1, e2 = torch.eye(3, dtype=dtype)[:2]
    checked = 0
    for point in (10.0**-r, 10.0**r):
        x = e1 * point
        for length in (10.0**-r, 1e-3, 2.0, 10.0 ** (r // 3), 10.0**r):
            u = e2 * (length * point)
            if not bool(torch.isfinite(u).all()) or u[1] == 0:
                continue  # the lift itself is not a float: nothing to compute from
            checked += 1
            assert float(man.norm(x, u)) == pytest.approx(length, rel=4 * eps)
            square = float(man.inner(x, u, u))
            if length * length > torch.finfo(dtype).max:
                assert square == math.inf  # |u|_x^2 is not a float: inf, not a wrong value
            elif length * length > torch.finfo(dtype).tiny:
                assert square == pytest.approx(length * length, rel=8 * eps)
            y, v = man.expmap_transp(x, u, u)
            assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(v).all())
            assert float(torch.linalg.vector_norm(y.to(F64))) == pytest.approx(1, abs=4 * eps)
            assert float(man.norm(y, v)) == pytest.approx(length, rel=8 * eps)
            if length <= 2:
                t = torch.tensor(length, dtype=F64)
                expected = torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)])
                torch.testing.assert_close(y.to(F64), expected, rtol=0, atol=4 * eps)
    assert checked == 7
    # |u|_x above the float range: the step is undefined, and says so
    x = e1 * 10.0**-r
    u = e2 * 10.0**r
    assert bool(torch.isinf(man.norm(x, u)))
    assert bool(torch.isnan(man.expmap(x, u)).all())
