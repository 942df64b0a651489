"""SGDG / AdamG against the numpy transcription of the paper (tests/paper_reference.py).

float64 throughout; the optimizers must follow the reference to 1e-9 over 30+ steps.
"""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.optim import SGDG, AdamG
from rbn_geoopt.optim._composed import clip_per_point
from rbn_geoopt.orthogonality import orthogonality_egrad
from tests.paper_reference import AdamGReference, SGDGReference

TOL = 1e-9
STEPS = 35
ROWS, SHAPE3 = 5, (2, 2, 3)  # 5 points of G(1, 12)
N = 12


def _start(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((ROWS, N))
    return rows * rng.uniform(0.5, 3.0, size=(ROWS, 1))  # non-unit representatives


def _fixed_grads(seed: int) -> list[np.ndarray]:
    """Random gradients whose row norms span 0.01 .. 2, so clipping at 0.1 acts on some."""
    rng = np.random.default_rng(seed + 1)
    return [
        rng.standard_normal((ROWS, N)) * rng.uniform(0.01, 2.0, size=(ROWS, 1)) / np.sqrt(N)
        for _ in range(STEPS)
    ]


def _param(rows: np.ndarray, ndim: int) -> geoopt.ManifoldParameter:
    shape = (ROWS, N) if ndim == 1 else (ROWS, *SHAPE3)
    data = torch.tensor(rows, dtype=torch.float64).reshape(shape)
    return geoopt.ManifoldParameter(data, manifold=Grassmann1(ndim=ndim))


def _rows(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(ROWS, N).numpy()


def _quadratic_grad(rows: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Gradient of the scale-invariant sum_i yh_i^T A yh_i at the representatives ``rows``."""
    r = np.linalg.norm(rows, axis=1, keepdims=True)
    yh = rows / r
    ay = yh @ a
    return 2.0 * (ay - np.sum(yh * ay, axis=1, keepdims=True) * yh) / r


def _run(opt_cls, ref, param, hyper, grad_fn) -> float:
    """Step optimizer and reference side by side; return the largest deviation seen."""
    opt = opt_cls([param], **hyper)
    worst = 0.0
    for k in range(STEPS):
        g = grad_fn(k, _rows(param), ref.points)
        param.grad = torch.tensor(g[0], dtype=torch.float64).reshape(param.shape)
        opt.step()
        ref.step(g[1])
        worst = max(worst, float(np.abs(_rows(param) - ref.points).max()))
    return worst


def _fixed(seed):
    grads = _fixed_grads(seed)
    return lambda k, mine, theirs: (grads[k], grads[k])


def _quadratic(seed):
    rng = np.random.default_rng(seed + 2)
    b = rng.standard_normal((N, N))
    a = (b + b.T) / (4 * np.sqrt(N))  # spectrum ~ [-1, 1]: steps below ~0.4 rad, no chaos
    return lambda k, mine, theirs: (_quadratic_grad(mine, a), _quadratic_grad(theirs, a))


GRADS = {"fixed": _fixed, "quadratic": _quadratic}


@pytest.mark.parametrize("grads", sorted(GRADS))
@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("grad_clip, omega", [(None, 0.0), (0.1, 0.0), (None, 0.1), (0.1, 0.1)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdg_follows_paper_reference(grads, ndim, grad_clip, omega, momentum):
    rows = _start(ndim)
    param = _param(rows, ndim)
    hyper = dict(lr=0.2, momentum=momentum, grad_clip=grad_clip, omega=omega)
    ref = SGDGReference(rows, **hyper)
    worst = _run(SGDG, ref, param, hyper, GRADS[grads](ndim))
    assert worst < TOL
    # the points really moved (a 1e-9 agreement of points standing still proves nothing)
    assert np.abs(ref.Y - rows / np.linalg.norm(rows, axis=1, keepdims=True)).max() > 0.02


@pytest.mark.parametrize("ndim", [1, 3])
def test_sgdg_momentum_state_is_reference_tau(ndim):
    rows = _start(7)
    param = _param(rows, ndim)
    hyper = dict(lr=0.2, momentum=0.9, grad_clip=0.1, omega=0.1)
    ref = SGDGReference(rows, **hyper)
    opt = SGDG([param], **hyper)
    for g in _fixed_grads(7):
        param.grad = torch.tensor(g).reshape(param.shape)
        opt.step()
        ref.step(g)
    tau = _rows(opt.state[param]["momentum_buffer"])
    assert np.abs(tau - ref.lift(ref.tau)).max() < TOL
    assert np.abs(np.sum(tau * _rows(param), axis=1)).max() < 1e-12  # tangent


@pytest.mark.parametrize("grads", sorted(GRADS))
@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("grad_clip, omega", [(None, 0.0), (0.1, 0.0), (None, 0.1), (0.1, 0.1)])
def test_adamg_follows_paper_reference(grads, ndim, grad_clip, omega):
    rows = _start(10 + ndim)
    param = _param(rows, ndim)
    hyper = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, grad_clip=grad_clip, omega=omega)
    ref = AdamGReference(rows, **hyper)
    worst = _run(AdamG, ref, param, hyper, GRADS[grads](ndim))
    assert worst < TOL
    assert np.abs(ref.Y - rows / np.linalg.norm(rows, axis=1, keepdims=True)).max() > 0.02


@pytest.mark.parametrize("ndim", [1, 3])
def test_adamg_state_is_reference_m_and_v(ndim):
    rows = _start(20)
    param = _param(rows, ndim)
    hyper = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, grad_clip=0.1, omega=0.1)
    ref = AdamGReference(rows, **hyper)
    opt = AdamG([param], **hyper)
    for g in _fixed_grads(20):
        param.grad = torch.tensor(g).reshape(param.shape)
        opt.step()
        ref.step(g)
    state = opt.state[param]
    assert state["exp_avg_sq"].shape == (ROWS,) + (1,) * ndim  # ONE scalar per point
    assert np.abs(state["exp_avg_sq"].reshape(-1).numpy() - ref.v).max() < TOL
    assert np.abs(_rows(state["exp_avg"]) - ref.lift(ref.m)).max() < TOL
    assert int(state["step"]) == STEPS


def test_batched_points_are_independent_rows_of_one_weight():
    """A (2, 3, N) Grassmann1 weight: 6 rows; the orthogonality couples all 6."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, N))
    param = geoopt.ManifoldParameter(torch.tensor(rows).reshape(2, 3, N), manifold=Grassmann1())
    hyper = dict(lr=0.2, momentum=0.9, grad_clip=0.1, omega=0.1)
    ref = SGDGReference(rows, **hyper)
    opt = SGDG([param], **hyper)
    for _ in range(STEPS):
        g = rng.standard_normal((6, N)) * 0.3
        param.grad = torch.tensor(g).reshape(2, 3, N)
        opt.step()
        ref.step(g)
    assert np.abs(param.detach().reshape(6, N).numpy() - ref.points).max() < TOL


# ------------------------------------------------------------- kernels against autograd
@pytest.mark.parametrize("shape, ndim", [((4, 9), 1), ((2, 3, 7), 1), ((4, 2, 3, 3), 3)])
def test_orthogonality_egrad_is_autograd_of_the_penalty(shape, ndim):
    torch.manual_seed(0)
    y = (torch.randn(shape, dtype=torch.float64) * 2.5).requires_grad_()
    omega = 0.37
    rows = y.reshape(-1, int(np.prod(shape[len(shape) - ndim :])))
    yh = rows / rows.norm(dim=1, keepdim=True)
    eye = torch.eye(yh.shape[0], dtype=torch.float64)
    penalty = omega / 2 * ((yh @ yh.T - eye) ** 2).sum()
    (expected,) = torch.autograd.grad(penalty, y)
    got = orthogonality_egrad(y.detach(), ndim, omega)
    assert torch.allclose(got, expected, rtol=0, atol=1e-13)


def test_orthogonality_egrad_is_papers_formula_at_unit_rows_up_to_radial_part():
    torch.manual_seed(1)
    y = torch.randn(5, 8, dtype=torch.float64)
    y = y / y.norm(dim=1, keepdim=True)
    paper = 2 * 0.1 * (y @ y.T @ y - y)
    got = orthogonality_egrad(y, 1, 0.1)
    m = Grassmann1()
    assert torch.allclose(m.proju(y, got), m.proju(y, paper), rtol=0, atol=1e-15)
    assert torch.allclose((got * y).sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    nu=st.one_of(st.just(0.0), st.floats(1e-6, 3.0)),
    scale=st.floats(1e-3, 1e3),
)
def test_clip_per_point_caps_the_manifold_norm_and_keeps_direction(seed, nu, scale):
    gen = torch.Generator().manual_seed(seed)
    m = Grassmann1()
    y = torch.randn(6, 5, dtype=torch.float64, generator=gen) * scale
    h = m.proju(y, torch.randn(6, 5, dtype=torch.float64, generator=gen) * scale)
    h[0] = 0.0  # a zero gradient stays zero (no NaN), also for nu = 0
    out = clip_per_point(m, y, h, nu)
    before, after = m.norm(y, h), m.norm(y, out)
    assert torch.isfinite(out).all()
    assert torch.allclose(after, torch.clamp(before, max=nu), rtol=1e-12, atol=1e-300)
    assert ((out * h).sum(dim=1) >= 0).all()  # same direction
    assert torch.allclose(out, h * (after / before).nan_to_num(1.0).unsqueeze(1), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), adam=st.booleans())
def test_one_step_is_invariant_to_positive_row_scaling(seed, adam):
    """From a*y with the gradient g/a of a scale-invariant loss: the same direction, and
    every point keeps the norm of its representative."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    g = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    a = torch.rand(4, 1, dtype=torch.float64, generator=gen) * 10 + 0.01
    results = []
    for yy, gg in ((y, g), (a * y, g / a)):
        p = geoopt.ManifoldParameter(yy.clone(), manifold=Grassmann1())
        cls, hyper = (AdamG, dict(lr=0.05)) if adam else (SGDG, dict(lr=0.3, momentum=0.9))
        opt = cls([p], grad_clip=0.2, omega=0.1, **hyper)
        for _ in range(3):
            p.grad = gg.clone()
            opt.step()
        norms = p.detach().norm(dim=1)
        assert torch.allclose(norms, yy.norm(dim=1), rtol=1e-13, atol=0)
        results.append(p.detach() / norms[:, None])
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-12)
