"""SGDG / AdamG on every geoopt manifold; half precision; stabilize; scale invariance."""

from __future__ import annotations

import geoopt
import pytest
import torch
import torch.nn.functional as F

from rbn_geoopt.manifold import Grassmann1
from rbn_geoopt.optim import SGDG, AdamG


def _unit_rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t, dim=tuple(range(-ndim, 0)), keepdim=True)


def _projective_loss(x: torch.Tensor, target: torch.Tensor, ndim: int) -> torch.Tensor:
    """sum_i 1 - <xh_i, t_i>^2: zero when each line [x_i] is the line [t_i]."""
    dims = tuple(range(-ndim, 0))
    return (1 - (_unit_rows(x, ndim) * target).sum(dim=dims) ** 2).sum()


def _distance_loss(x: torch.Tensor, target: torch.Tensor, ndim: int) -> torch.Tensor:
    return ((x - target) ** 2).sum()


# name -> (manifold, shape, loss); targets are drawn on the manifold
MANIFOLDS = {
    "grassmann1": (lambda: Grassmann1(), (6, 5), _projective_loss),
    "grassmann1_ndim3": (lambda: Grassmann1(ndim=3), (4, 2, 2, 2), _projective_loss),
    "scaled_grassmann1": (lambda: geoopt.Scaled(Grassmann1(), 2), (6, 5), _projective_loss),
    "sphere": (lambda: geoopt.Sphere(), (6, 5), _distance_loss),
    "sphere_exact": (lambda: geoopt.SphereExact(), (6, 5), _distance_loss),
    "stiefel": (lambda: geoopt.Stiefel(), (2, 5, 3), _distance_loss),
    "euclidean": (lambda: geoopt.Euclidean(ndim=1), (6, 5), _distance_loss),
}


def _on_manifold(name: str, manifold, x: torch.Tensor) -> bool:
    if name.endswith("grassmann1") or name == "grassmann1_ndim3":
        ndim = manifold.ndim
        norms = torch.linalg.vector_norm(x, dim=tuple(range(-ndim, 0)))
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-12))  # unit reps
    return bool(manifold.check_point_on_manifold(x, atol=1e-10, rtol=1e-10))


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
@pytest.mark.parametrize(
    "cls, hyper",
    [
        (SGDG, dict(lr=0.05, momentum=0.9, grad_clip=1.0)),
        (AdamG, dict(lr=0.05, grad_clip=1.0)),
    ],
    ids=["sgdg", "adamg"],
)
def test_stays_on_manifold_and_loss_decreases(name, cls, hyper):
    make, shape, loss_fn = MANIFOLDS[name]
    manifold = make()
    gen = torch.Generator().manual_seed(0)
    ndim = manifold.ndim
    start = torch.randn(shape, dtype=torch.float64, generator=gen)
    target = torch.randn(shape, dtype=torch.float64, generator=gen)
    if name != "euclidean":
        start, target = manifold.projx(start), manifold.projx(target)
    x = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
    opt = cls([x], **hyper)
    first = float(loss_fn(x.detach(), target, ndim))
    for _ in range(60):
        opt.zero_grad()
        loss_fn(x, target, ndim).backward()
        opt.step()
        assert _on_manifold(name, manifold, x.detach())
    assert float(loss_fn(x.detach(), target, ndim)) < 0.3 * first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_half_precision_is_stepped_in_float32_and_stored_back(dtype, cls):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(8, 16, generator=gen)
    target = _unit_rows(torch.randn(8, 16, generator=gen), 1)
    hyper = dict(lr=0.05, grad_clip=0.5, omega=0.01)
    if cls is SGDG:
        hyper["momentum"] = 0.9
    half = geoopt.ManifoldParameter(start.to(dtype), manifold=Grassmann1())
    full = geoopt.ManifoldParameter(start.to(dtype).float(), manifold=Grassmann1())
    opts = [cls([half], **hyper), cls([full], **hyper)]
    for _ in range(20):
        for p, opt in zip((half, full), opts, strict=True):
            opt.zero_grad()
            _projective_loss(p.float(), target, 1).backward()
            opt.step()
    assert half.dtype == dtype
    for value in opts[0].state[half].values():
        if value.is_floating_point() and value.dim() > 0:
            assert value.dtype == torch.float32
    norms = half.detach().float().norm(dim=1)  # each point keeps its norm (to rounding)
    assert torch.allclose(norms, start.to(dtype).float().norm(dim=1), rtol=1e-2)
    assert (half.detach().float() - full.detach()).abs().max() < 0.05 * norms.max()


def test_half_precision_sphere_works_although_geoopt_eps_table_lacks_it():
    """geoopt 0.5.1's Sphere raises KeyError on half tensors (its EPS table lacks them); we
    step it in float32."""
    x = geoopt.ManifoldParameter(
        geoopt.Sphere().projx(torch.randn(4, 6)).to(torch.bfloat16), manifold=geoopt.SphereExact()
    )
    opt = SGDG([x], lr=0.1, momentum=0.9)
    for _ in range(3):
        x.grad = torch.randn(4, 6).to(torch.bfloat16)
        opt.step()
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_weight_decay_on_other_manifolds_is_added_to_the_euclidean_gradient(cls):
    """As geoopt does: wd * p joins the Euclidean gradient before egrad2rgrad."""
    gen = torch.Generator().manual_seed(0)
    start = 0.3 * torch.randn(4, 5, dtype=torch.float64, generator=gen)
    ball = geoopt.PoincareBall()  # there wd * p is not projected away
    a, b, c = (geoopt.ManifoldParameter(start.clone(), manifold=ball) for _ in range(3))
    opts = [cls([a], lr=0.01, weight_decay=0.3), cls([b], lr=0.01), cls([c], lr=0.01)]
    for _ in range(5):
        g = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        a.grad, b.grad, c.grad = g.clone(), g + 0.3 * b.detach(), g.clone()
        for opt in opts:
            opt.step()
        assert torch.allclose(a, b, rtol=0, atol=1e-14)
    assert (a - c).abs().max() > 1e-4  # the decay did act


def test_stabilize_projects_points_and_momentum_every_n_steps():
    gen = torch.Generator().manual_seed(0)
    x = geoopt.ManifoldParameter(
        geoopt.Sphere().projx(torch.randn(5, 4, dtype=torch.float64, generator=gen)),
        manifold=geoopt.Sphere(),
    )
    b = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = SGDG([x, b], lr=0.1, momentum=0.9, stabilize=2)

    def spoil():
        with torch.no_grad():
            x.mul_(1.5)
            buf = opt.state[x]["momentum_buffer"]
            buf.add_(x.detach())  # a radial component

    def radial():
        buf = opt.state[x]["momentum_buffer"]
        return float((buf * x.detach()).sum(dim=1).abs().max())

    for step in range(1, 5):
        x.grad = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        b.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        if step % 2 == 0:  # stabilized
            assert torch.allclose(x.norm(dim=1), torch.ones(5, dtype=torch.float64))
            assert radial() < 1e-12
        spoil()
        assert radial() > 0.1
    opt.stabilize()  # geoopt's public entry point
    assert torch.allclose(x.norm(dim=1), torch.ones(5, dtype=torch.float64)) and radial() < 1e-12


@pytest.mark.parametrize("manifold", [Grassmann1(), geoopt.Sphere()], ids=["g1", "sphere"])
def test_first_momentum_step_starts_from_the_projected_gradient(manifold):
    gen = torch.Generator().manual_seed(0)
    start = manifold.projx(torch.randn(4, 7, dtype=torch.float64, generator=gen))
    g = torch.randn(4, 7, dtype=torch.float64, generator=gen)

    def first_step(cls, momentum):
        x = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
        opt = cls([x], lr=0.3, momentum=momentum)
        x.grad = g.clone()
        opt.step()
        return x.detach(), opt.state.get(x, {}).get("momentum_buffer")

    with_momentum, buf = first_step(SGDG, 0.9)
    without, _ = first_step(SGDG, 0.0)
    assert torch.equal(with_momentum, without)  # d = 0.9 * 0 - lr * h
    # tau = the step -lr * h carried to the new point by the manifold's transport
    h = manifold.egrad2rgrad(start, g)
    assert float((buf * with_momentum).sum(dim=1).abs().max()) < 1e-12
    expected = manifold.transp_follow_retr(start, -0.3 * h, -0.3 * h)
    assert torch.allclose(buf, expected, rtol=0, atol=1e-14)
    if isinstance(manifold, Grassmann1):  # exact parallel transport keeps the length
        assert torch.allclose(buf.norm(dim=1), 0.3 * h.norm(dim=1), rtol=1e-12)
    # contrast: geoopt's RiemannianSGD seeds its buffer with the raw Euclidean gradient
    rsgd_momentum, _ = first_step(geoopt.optim.RiemannianSGD, 0.9)
    rsgd_plain, _ = first_step(geoopt.optim.RiemannianSGD, 0.0)
    assert not torch.allclose(rsgd_momentum, rsgd_plain)


# --------------------------------------------------------------------- scale invariance
_BN_EPS = 1e-30  # BN is scale invariant only up to its eps (must be > 0 in training)


class _Net(torch.nn.Module):
    """BN-fed first layer (its rows are scale invariant), then a classifier."""

    def __init__(self, conv: bool):
        super().__init__()
        if conv:
            self.first = torch.nn.Conv2d(2, 3, 3, bias=False)
            self.bn = torch.nn.BatchNorm2d(3, eps=_BN_EPS)
            self.head = torch.nn.Linear(3, 4)
        else:
            self.first = torch.nn.Linear(7, 4, bias=False)
            self.bn = torch.nn.BatchNorm1d(4, eps=_BN_EPS)
            self.head = torch.nn.Linear(4, 3)
        self.conv = conv

    def forward(self, x):
        z = F.relu(self.bn(self.first(x)))
        if self.conv:
            z = z.mean(dim=(2, 3))
        return self.head(z)


def _make(conv: bool, scales: torch.Tensor | None) -> _Net:
    torch.manual_seed(0)
    net = _Net(conv).double()
    w = net.first.weight.detach().clone()
    if scales is not None:
        w = w * scales.reshape(-1, *([1] * (w.dim() - 1)))
    ndim = w.dim() - 1
    net.first.weight = geoopt.ManifoldParameter(w, manifold=Grassmann1(ndim=ndim))
    return net


def _optimizer(net: _Net, adam: bool):
    rest = [p for n, p in net.named_parameters() if not n.startswith("first")]
    other = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if adam:
        return AdamG(
            [
                {"params": [net.first.weight], "lr": 0.05, "grad_clip": 0.1, "omega": 0.1},
                {"params": rest, "euclidean": "sgd", **other},
            ],
            lr=0.05,
        )
    return SGDG(
        [
            {"params": [net.first.weight], "lr": 0.2, "momentum": 0.9, "grad_clip": 0.1},
            {"params": rest, **other},
        ],
        lr=0.2,
        omega=0.0,
    )


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
@pytest.mark.parametrize("adam", [False, True], ids=["sgdg", "adamg"])
def test_rescaled_bn_fed_rows_follow_the_same_trajectory_of_directions(conv, adam):
    gen = torch.Generator().manual_seed(1)
    rows = 3 if conv else 4
    scales = torch.exp(torch.empty(rows, dtype=torch.float64).uniform_(-3, 3, generator=gen))
    nets = [_make(conv, None), _make(conv, scales)]
    opts = [_optimizer(n, adam) for n in nets]
    shape = (16, 2, 5, 5) if conv else (32, 7)
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    ndim = nets[0].first.weight.dim() - 1
    start = _unit_rows(nets[0].first.weight.detach().clone(), ndim)
    losses = []
    for _ in range(25):
        for net, opt in zip(nets, opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        a, b = (_unit_rows(n.first.weight.detach(), ndim) for n in nets)
        assert (a - b).abs().max() < 1e-10
        for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
            if not name.startswith("first"):
                assert (p - q).abs().max() < 1e-10
    assert (a - start).abs().max() > 0.05  # the directions did move
    assert losses[-1] < losses[0]
