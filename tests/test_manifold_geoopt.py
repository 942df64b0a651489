"""Grassmann1 under geoopt's own conventions.

The generic checks geoopt runs on each of its manifolds (geoopt/geoopt,
tests/test_manifold_basic.py: projection identity, projection and tangent checks, batch
broadcasting of projx/proju/retr/transp slice by slice, reversibility of retr_transp,
logmap, dist), for Grassmann1 with ndim 1 and 3 and for ``geoopt.Scaled(Grassmann1(), 2)``;
then ``geoopt.ManifoldParameter`` on Grassmann1 stepped by geoopt's own optimizers.
"""

import collections
import math

import geoopt
import numpy as np
import pytest
import torch

from rbn_geoopt.manifold import Grassmann1

UnaryCase = collections.namedtuple("UnaryCase", "shape,x,ex,v,ev,manifold,radius")


def _cases():
    """Unit point x (geoopt's canonical representative) and tangent v = proju(x, ev)."""
    for shape, manifold, radius in (
        ((10,), Grassmann1(), math.pi / 2),
        ((2, 3, 2), Grassmann1(ndim=3), math.pi / 2),
        # Scaled(M, 2) doubles distances and halves steps: injectivity radius pi in its units
        ((10,), geoopt.Scaled(Grassmann1(), 2), math.pi),
    ):
        torch.manual_seed(42)
        dims = tuple(range(-len(shape), 0))
        ex = torch.randn(*shape, dtype=torch.float64)
        ev = torch.randn(*shape, dtype=torch.float64)
        x = ex / ex.norm()
        v = ev - (x * ev).sum(dim=dims, keepdim=True) * x
        x = geoopt.ManifoldTensor(x, manifold=manifold)
        yield UnaryCase(shape, x, ex, v, ev, manifold, radius)


@pytest.fixture(params=[1, 2, 3, 4, 5])
def seed(request):
    torch.manual_seed(request.param)


@pytest.fixture(
    params=list(_cases()),
    ids=lambda c: f"{type(c.manifold).__name__}-ndim{c.manifold.ndim}",
)
def case(request, seed):
    return request.param


def _stack(t: torch.Tensor, k: int = 4) -> torch.Tensor:
    return torch.stack([t.detach().clone()] * k)


def test_reversible_flag(case):
    assert case.manifold.reversible is True


def test_projection_identity(case):
    np.testing.assert_allclose(case.manifold.projx(case.x), case.x, atol=1e-15)


def test_projection_via_assert(case):
    px = case.manifold.projx(case.ex)
    case.manifold.assert_check_point_on_manifold(px)
    np.testing.assert_allclose(case.x, px, atol=1e-15)


def test_vector_projection_via_assert(case):
    pv = case.manifold.proju(case.x, case.ev)
    case.manifold.assert_check_vector_on_tangent(case.x, pv)
    np.testing.assert_allclose(case.v, pv, atol=1e-14)


def test_broadcast_projx(case):
    X = torch.stack([case.ex * (k + 1) * (-1) ** k for k in range(4)])  # any representative
    pX = case.manifold.projx(X)
    case.manifold.assert_check_point_on_manifold(pX)
    for x, px in zip(X, pX, strict=True):
        case.manifold.assert_check_point_on_manifold(px)
        np.testing.assert_allclose(px, case.manifold.projx(x), atol=1e-15)


def test_broadcast_proju(case):
    pX, U = _stack(case.x), torch.randn(4, *case.shape, dtype=torch.float64)
    pU = case.manifold.proju(pX, U)
    case.manifold.assert_check_vector_on_tangent(pX, pU)
    for px, u, pu in zip(pX, U, pU, strict=True):
        case.manifold.assert_check_vector_on_tangent(px, pu)
        np.testing.assert_allclose(pu, case.manifold.proju(px, u), atol=1e-14)


def test_broadcast_retr(case):
    pX = _stack(case.x)
    pU = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64))
    Y = case.manifold.retr(pX, pU)
    case.manifold.assert_check_point_on_manifold(Y)
    for px, pu, y in zip(pX, pU, Y, strict=True):
        case.manifold.assert_check_point_on_manifold(y)
        np.testing.assert_allclose(y, case.manifold.retr(px, pu), atol=1e-14)
        np.testing.assert_allclose(y, case.manifold.expmap(px, pu), atol=1e-14)


def test_broadcast_transp(case):
    pX = _stack(case.x)
    pU = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64))
    pV = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64))
    Y = case.manifold.retr(pX, pU)
    Q = case.manifold.transp_follow_retr(pX, pU, pV)
    Z, Q2 = case.manifold.retr_transp(pX, pU, pV)
    np.testing.assert_allclose(Z, Y, atol=1e-14)
    np.testing.assert_allclose(Q2, Q, atol=1e-14)
    case.manifold.assert_check_vector_on_tangent(Y, Q)
    for px, pu, pv, y, q in zip(pX, pU, pV, Y, Q, strict=True):
        case.manifold.assert_check_vector_on_tangent(y, q)
        np.testing.assert_allclose(q, case.manifold.transp_follow_retr(px, pu, pv), atol=1e-14)
        np.testing.assert_allclose(q, case.manifold.transp_follow_expmap(px, pu, pv), atol=1e-14)
    # transp(x, y, v) to the point reached is the same transport, as long as the step stays
    # inside the injectivity radius (transp follows the MINIMIZING geodesic)
    short = pU * (0.9 * case.radius / case.manifold.norm(pX, pU, keepdim=True))
    Ys, Qs = case.manifold.retr_transp(pX, short, pV)
    np.testing.assert_allclose(case.manifold.transp(pX, Ys, pV), Qs, atol=1e-12)


def test_reversibility(case):
    pX = _stack(case.x)
    U = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64) / 3)
    Z, Q = case.manifold.retr_transp(pX, U, U)
    X1, U1 = case.manifold.retr_transp(Z, -Q, Q)
    np.testing.assert_allclose(X1, pX, atol=1e-13)
    np.testing.assert_allclose(U1, U, atol=1e-13)
    # and with geoopt's own, longer tangents (|U| ~ 3, beyond pi/2): still exact
    U = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64))
    Z, Q = case.manifold.retr_transp(pX, U, U)
    X1, U1 = case.manifold.retr_transp(Z, -Q, Q)
    np.testing.assert_allclose(X1, pX, atol=1e-13)
    np.testing.assert_allclose(U1, U, atol=1e-13)


def test_logmap(case):
    # geoopt draws U ~ N(0, I) (|U| ~ 3 > pi/2); on a projective manifold logmap correctly
    # returns the way to the NEARER representative, so expmap(x, logmap(x, y)) would be -y
    # there. We rescale U inside the injectivity radius (pi/2; pi for Scaled(., 2)).
    pX = _stack(case.x)
    U = case.manifold.proju(pX, torch.randn(*case.shape, dtype=torch.float64))
    U = (
        U
        * (torch.rand(4, dtype=torch.float64) * 0.95 * case.radius).reshape(
            4, *(1,) * len(case.shape)
        )
        / case.manifold.norm(pX, U, keepdim=True)
    )
    Y = case.manifold.expmap(pX, U)
    Uh = case.manifold.logmap(pX, Y)
    np.testing.assert_allclose(Uh, U, atol=1e-12)
    Yh = case.manifold.expmap(pX, Uh)
    np.testing.assert_allclose(Yh, Y, atol=1e-12, rtol=1e-12)
    # geoopt's long tangents: the same line, reached through the other representative
    U = case.manifold.proju(pX, 3 * torch.randn(*case.shape, dtype=torch.float64))
    Y = case.manifold.expmap(pX, U)
    Yh = case.manifold.expmap(pX, case.manifold.logmap(pX, Y))
    np.testing.assert_allclose(case.manifold.dist(Yh, Y), np.zeros(4), atol=1e-7)


def test_dist(case):
    pX = _stack(case.x)
    U = case.manifold.proju(pX, torch.randn(4, *case.shape, dtype=torch.float64))
    U = U * (0.95 * case.radius / case.manifold.norm(pX, U, keepdim=True))
    U = U * torch.linspace(0.0, 1.0, 4, dtype=torch.float64).reshape(4, *(1,) * len(case.shape))
    Y = case.manifold.expmap(pX, U)
    np.testing.assert_allclose(case.manifold.dist(pX, Y), case.manifold.norm(pX, U), atol=1e-13)
    np.testing.assert_allclose(case.manifold.dist(Y, pX), case.manifold.norm(pX, U), atol=1e-13)


def test_scaled_manifold_scales_distances():
    base, scaled = Grassmann1(), geoopt.Scaled(Grassmann1(), 2)
    x, y = torch.randn(2, 7, dtype=torch.float64)
    np.testing.assert_allclose(scaled.dist(x, y), 2 * base.dist(x, y), rtol=1e-15)
    np.testing.assert_allclose(scaled.logmap(x, y), 2 * base.logmap(x, y), rtol=1e-15)
    assert scaled.dist(x, y) <= math.pi + 1e-15


def test_manifold_tensor_methods():
    man = Grassmann1(ndim=3)
    x = geoopt.ManifoldTensor(torch.randn(3, 2, 2, 2, dtype=torch.float64), manifold=man)
    u = x.proju(torch.randn_like(x))
    lengths = torch.tensor([0.3, 1.1, 2.5], dtype=torch.float64)
    u = u * (lengths / man.norm(x, u)).reshape(3, 1, 1, 1)
    y = x.expmap(u)
    assert y.shape == x.shape
    expected = np.array([0.3, 1.1, math.pi - 2.5])
    np.testing.assert_allclose(x.dist(y, p="g"), expected, atol=1e-13)
    np.testing.assert_allclose(x.logmap(y), man.logmap(x.detach(), y), rtol=0, atol=0)
    np.testing.assert_allclose(x.proj_(), man.projx(torch.as_tensor(x).clone()), atol=1e-15)


# -------------------------------------------------------- geoopt optimizers


def _rayleigh(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Sum over points of y^T A y / y^T y: a function on G(1, n)^k, minimum k * lambda_min."""
    Y = W.reshape(W.shape[0], -1)
    return ((Y @ A) * Y).sum(-1).div((Y * Y).sum(-1)).sum()


@pytest.mark.parametrize("shape", [(4, 6), (4, 2, 3, 1)], ids=["ndim1", "ndim3"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: geoopt.optim.RiemannianSGD(p, lr=0.1, momentum=0.9),
        lambda p: geoopt.optim.RiemannianSGD(p, lr=0.1, momentum=0.9, stabilize=5),
        lambda p: geoopt.optim.RiemannianSGD(p, lr=0.2),
        lambda p: geoopt.optim.RiemannianAdam(p, lr=0.05),
    ],
    ids=["rsgd-momentum", "rsgd-momentum-stabilize", "rsgd", "radam"],
)
def test_geoopt_optimizers_step_on_grassmann1(shape, make_opt):
    gen = torch.Generator().manual_seed(0)
    n = math.prod(shape[1:])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    eig = torch.linspace(1.0, 3.0, n)
    A = Q @ torch.diag(eig) @ Q.T
    W = geoopt.ManifoldParameter(
        5.0 * torch.randn(shape, generator=gen), manifold=Grassmann1(ndim=len(shape) - 1)
    )
    opt = make_opt([W])
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = _rayleigh(W, A)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        rows = W.detach().reshape(shape[0], -1).norm(dim=-1)
        torch.testing.assert_close(rows, torch.ones(shape[0]), rtol=0, atol=1e-5)
    assert isinstance(W, geoopt.ManifoldParameter) and W.dtype == torch.float32
    assert losses[-1] < losses[0] - 1.0
    # converged to the bottom eigenvector: every row's Rayleigh quotient is close to 1
    assert losses[-1] < shape[0] * eig[0].item() + 1e-2, losses[-1]
