"""Bad input, one case at a time: the optimizers refuse it before changing anything.

Policy (rbn_geoopt/optim/checks.py): a step whose gradient holds NaN/Inf -- on a manifold
OR a plain parameter -- raises ``NonFiniteGradientError`` (a ValueError) naming the
parameter, and no parameter, state or step counter changes; ``torch.amp.GradScaler`` skips
such steps before the optimizer sees them. Zero / non-finite points of G(1,n), shapes that
hold no points, non-finite hyper-parameters are ValueErrors naming the culprit.
"""

from __future__ import annotations

import copy
import re

import geoopt
import pytest
import torch

from rbn_geoopt import Grassmann1
from rbn_geoopt.optim import SGDG, AdamG, NonFiniteGradientError

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads would only contend for the cores (10-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(cls, seed: int = 0, dtype=torch.float64):
    """A conv-shaped G(1,n) weight, a linear one and a plain bias, stepped twice already."""
    gen = torch.Generator().manual_seed(seed)
    conv = geoopt.ManifoldParameter(
        torch.randn(4, 3, 2, 2, generator=gen, dtype=dtype), manifold=Grassmann1(ndim=3)
    )
    fc = geoopt.ManifoldParameter(torch.randn(3, 5, generator=gen, dtype=dtype), Grassmann1())
    bias = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=dtype))
    named = {"conv.weight": conv, "fc.weight": fc, "fc.bias": bias}
    hyper = {"momentum": 0.9} if cls is SGDG else {}
    opt = cls(
        [
            {"params": [("conv.weight", conv), ("fc.weight", fc)], "omega": 0.1, **hyper},
            {"params": [("fc.bias", bias)], "momentum": 0.9},
        ],
        lr=0.05,
    )
    for _ in range(2):
        _grads(named, gen)
        opt.step()
    return named, opt, gen


def _grads(named, gen) -> None:
    for p in named.values():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _everything(named, opt) -> dict:
    """Parameters, state and param-group counters, deep-copied."""
    return {
        "params": {k: p.detach().clone() for k, p in named.items()},
        "opt": copy.deepcopy(opt.state_dict()),
    }


def _same(a, b) -> None:
    """Bit for bit, NaN included."""
    torch.testing.assert_close(torch.as_tensor(a), b, rtol=0, atol=0, equal_nan=True)


def _assert_unchanged(before: dict, named, opt) -> None:
    after = _everything(named, opt)
    for k, p in before["params"].items():
        _same(after["params"][k], p)
    assert after["opt"]["param_groups"] == before["opt"]["param_groups"]
    assert after["opt"]["state"].keys() == before["opt"]["state"].keys()
    for pid, entry in before["opt"]["state"].items():
        assert after["opt"]["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            _same(after["opt"]["state"][pid][key], value)


POISONS = [("nan", NAN), ("+inf", INF), ("-inf", -INF)]


@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("name", ["conv.weight", "fc.weight", "fc.bias"])
@pytest.mark.parametrize("kind, value", POISONS, ids=[p[0] for p in POISONS])
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(
    cls, name, kind, value
):
    named, opt, gen = _setup(cls)
    _grads(named, gen)
    named[name].grad.view(-1)[1] = value
    before = _everything(named, opt)
    with pytest.raises(NonFiniteGradientError, match=rf"gradient of parameter '{name}'.*NaN/Inf"):
        opt.step()
    _assert_unchanged(before, named, opt)
    # the user skips the batch; the next finite step works and keeps each point's norm
    points = [named["conv.weight"], named["fc.weight"]]
    norms = [p.detach().reshape(p.shape[0], -1).norm(dim=1) for p in points]
    _grads(named, gen)
    opt.step()
    for p, norm in zip(points, norms, strict=True):
        rows = p.detach().reshape(p.shape[0], -1)
        assert torch.allclose(rows.norm(dim=1), norm, rtol=1e-12)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", [0, 1 << 15, -1])
def test_poison_anywhere_in_a_large_gradient_is_found(kernels, cls, dtype, where, monkeypatch):
    """Multi-block, multi-thread gradients (C sweep or torch), after trusted steps."""
    monkeypatch.setenv("RBN_GEOOPT_KERNELS", kernels)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    w = geoopt.ManifoldParameter(
        torch.randn(100, 16, 5, 5, generator=gen, dtype=dtype), manifold=Grassmann1(ndim=3)
    )
    b = torch.nn.Parameter(torch.randn(40_000, generator=gen, dtype=dtype))
    named = {"w": w, "b": b}
    opt = cls([("w", w), ("b", b)], lr=0.05)
    for name in named:
        for _ in range(2):  # the second step sees w as trusted (only its gradient is read)
            _grads(named, gen)
            opt.step()
        _grads(named, gen)
        named[name].grad.view(-1)[where] = NAN
        before = _everything(named, opt)
        with pytest.raises(NonFiniteGradientError, match=f"'{name}'"):
            opt.step()
        _assert_unchanged(before, named, opt)


def test_non_finite_gradient_error_is_a_value_error():
    assert issubclass(NonFiniteGradientError, ValueError)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_gradient_so_large_that_the_step_would_overflow_is_refused(cls):
    """float32 |g| = 1e30: |h|^2 overflows and plain SGD-G would write NaN points."""
    w = geoopt.ManifoldParameter(Grassmann1().projx(torch.randn(3, 8)), manifold=Grassmann1())
    opt = cls([("w", w)], lr=0.1)
    start = w.detach().clone()
    w.grad = torch.randn(3, 8) * 1e30
    with pytest.raises(NonFiniteGradientError, match="'w' holds values so large"):
        opt.step()
    assert torch.equal(w.detach(), start) and not opt.state
    w.grad = torch.randn(3, 8) * 1e6  # large but representable: stepped, finite points
    opt.step()
    assert not torch.equal(w.detach(), start) and torch.isfinite(w).all()
    # a ~1e5 rad step: Grassmann1.expmap in float32 is unit only to ~1e-2 there, because
    # torch.sinc(t / pi) and torch.cos(t) see differently rounded angles
    assert torch.allclose(w.detach().norm(dim=1), torch.ones(3), atol=0.1)


def test_large_finite_gradient_on_a_plain_parameter_is_stepped_as_torch_does():
    b = torch.nn.Parameter(torch.zeros(3))
    ref = torch.nn.Parameter(torch.zeros(3))
    ours, theirs = SGDG([b], lr=0.1), torch.optim.SGD([ref], lr=0.1)
    b.grad = torch.full((3,), 1e30)
    ref.grad = b.grad.clone()
    ours.step()
    theirs.step()
    assert torch.equal(b, ref)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_grad_scaler_skips_a_nan_step_without_reaching_the_check(cls):
    named, opt, gen = _setup(cls, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(6, 5, generator=gen)

    def loss():
        fc, bias = named["fc.weight"], named["fc.bias"]
        return ((x @ fc.T + bias) ** 2).mean() + named["conv.weight"].square().sum()

    opt.zero_grad()
    scaler.scale(loss()).backward()
    named["conv.weight"].grad[0, 0, 0, 0] = NAN
    before = _everything(named, opt)
    scaler.step(opt)  # skipped: no exception
    scaler.update()
    _assert_unchanged(before, named, opt)
    assert scaler.get_scale() == 2.0**9
    opt.zero_grad()
    scaler.scale(loss()).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(named["fc.weight"].detach(), before["params"]["fc.weight"])


# ------------------------------------------------------------------------- points
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_row_zeroed_after_some_steps_is_refused_at_the_next_step(cls):
    named, opt, gen = _setup(cls)
    with torch.no_grad():
        named["fc.weight"][2] = 0.0
    _grads(named, gen)
    before = _everything(named, opt)
    with pytest.raises(ValueError, match="'fc.weight' holds a zero vector at row 2"):
        opt.step()
    _assert_unchanged(before, named, opt)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_data_replaced_after_some_steps_is_checked_again(cls):
    """``p.data = ...`` keeps the autograd version; the new storage still revokes trust."""
    named, opt, gen = _setup(cls)
    fc = named["fc.weight"]
    fc.data = torch.zeros_like(fc)
    fc.data[0] = 1.0
    _grads(named, gen)
    before = _everything(named, opt)
    with pytest.raises(ValueError, match="'fc.weight' holds a zero vector at row 1"):
        opt.step()
    _assert_unchanged(before, named, opt)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_zero_row_written_behind_autograds_back_is_refused_and_nothing_changes(cls, how):
    """Writes through ``p.data`` or numpy bypass autograd's version counter; the guard
    remembers nothing between steps, so it refuses them like any other write."""
    named, opt, gen = _setup(cls)
    fc = named["fc.weight"]
    if how == "data":
        fc.data[1] = 0.0
    else:
        fc.detach().numpy()[1] = 0.0
    _grads(named, gen)
    before = _everything(named, opt)
    with pytest.raises(ValueError, match="'fc.weight' holds a zero vector at row 1"):
        opt.step()
    _assert_unchanged(before, named, opt)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_point_is_refused_naming_parameter_and_row(cls, value):
    named, opt, gen = _setup(cls)
    with torch.no_grad():
        named["conv.weight"][3, 1, 0, 1] = value
    _grads(named, gen)
    before = _everything(named, opt)
    with pytest.raises(ValueError, match=r"'conv.weight' holds a NaN/Inf .* at row 3"):
        opt.step()
    _assert_unchanged(before, named, opt)


def test_non_finite_point_of_another_manifold_is_refused():
    x = geoopt.ManifoldParameter(geoopt.Sphere().projx(torch.randn(3, 4)), geoopt.Sphere())
    opt = SGDG([("x", x)], lr=0.1)
    with torch.no_grad():
        x[1, 1] = NAN
    x.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'x' holds NaN/Inf values: a point of Sphere"):
        opt.step()


# ------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "shape, ndim, match",
    [
        ((4, 5), 3, "needs at least 3"),  # a linear weight declared as conv points
        ((4, 1), 1, "points of size 1"),  # G(1,1) is a single point
        ((5,), 2, "needs at least 2"),
    ],
)
def test_group_manifold_on_a_tensor_without_such_points_is_refused(shape, ndim, match):
    p = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(
        ValueError, match=rf"parameter 'w' of shape {re.escape(str(shape))}.*{match}"
    ):
        SGDG([{"params": [("w", p)], "manifold": Grassmann1(ndim=ndim)}], lr=0.1)


def test_gradient_of_a_wrong_shape_cannot_even_be_assigned():
    """torch refuses it before the optimizer could see it."""
    w = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=Grassmann1())
    with pytest.raises(RuntimeError, match="gradient of size"):
        w.grad = torch.randn(4, 3)


# ------------------------------------------------------------------ hyper-parameters
@pytest.mark.parametrize("key", ["lr", "omega", "weight_decay", "eps"])
def test_infinite_hyper_parameter_is_refused(key):
    plain = torch.nn.Parameter(torch.zeros(3))
    w = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=Grassmann1())
    params = [w] if key == "omega" else [plain]
    hyper = {"lr": 0.1, key: INF}
    with pytest.raises(ValueError, match=rf"invalid {key} inf: must be finite"):
        AdamG(params, **hyper)


def test_infinite_grad_clip_means_no_clipping():
    gen = torch.Generator().manual_seed(3)
    start, grad = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    a = geoopt.ManifoldParameter(start.clone(), manifold=Grassmann1())
    b = geoopt.ManifoldParameter(start.clone(), manifold=Grassmann1())
    opts = [SGDG([a], lr=0.3, grad_clip=INF), SGDG([b], lr=0.3)]
    for p, opt in zip((a, b), opts, strict=True):
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(a, b) and not torch.equal(a.detach(), Grassmann1().projx(start))


# ----------------------------------------------------------------------- lr = 0
@pytest.mark.parametrize("cls, hyper", [(SGDG, {}), (SGDG, {"momentum": 0.9}), (AdamG, {})])
def test_zero_learning_rate_changes_no_bit_of_the_points(cls, hyper):
    """As torch's SGD/Adam with lr=0 (and torch.distributed.checkpoint's state-init step)."""
    start = torch.randn(4, 7, dtype=torch.float64) * 3.0  # non-unit rows stay as they are
    w = geoopt.ManifoldParameter(start.clone(), manifold=Grassmann1())
    opt = cls([w], lr=0.0, **hyper)
    w.grad = torch.randn(4, 7, dtype=torch.float64)
    opt.step()
    assert torch.equal(w.detach(), start)


# ------------------------------------------------------------- mixed dtypes/devices
MIXED = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_one_group_mixing_dtypes_steps_each_parameter_as_if_alone(cls):
    gen = torch.Generator().manual_seed(5)
    starts = [torch.randn(3, 6, generator=gen).to(d) for d in MIXED]
    grads = [[torch.randn(3, 6, generator=gen).to(d) for d in MIXED] for _ in range(4)]
    plain_start = [torch.randn(3, generator=gen).to(d) for d in (torch.float64, torch.float32)]
    plain_grads = [
        [torch.randn(3, generator=gen).to(p.dtype) for p in plain_start] for _ in range(4)
    ]

    def build(indices, plain_indices):
        ws = [geoopt.ManifoldParameter(starts[i].clone(), Grassmann1()) for i in indices]
        bs = [torch.nn.Parameter(plain_start[i].clone()) for i in plain_indices]
        hyper = {"momentum": 0.9} if cls is SGDG else {}
        return ws, bs, cls([*ws, *bs], lr=0.05, grad_clip=0.5, **hyper)

    together = build(range(len(MIXED)), range(2))
    alone = [build([i], []) for i in range(len(MIXED))] + [build([], [i]) for i in range(2)]
    for k in range(4):
        for ws, bs, opt in [together, *alone]:
            for w in ws:
                w.grad = grads[k][MIXED.index(w.dtype)].clone()
            for b in bs:
                b.grad = plain_grads[k][0 if b.dtype == torch.float64 else 1].clone()
            opt.step()
    for i, w in enumerate(together[0]):
        assert w.dtype == MIXED[i] and torch.equal(w, alone[i][0][0]), MIXED[i]
    for i, b in enumerate(together[1]):
        assert torch.equal(b, alone[len(MIXED) + i][1][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_one_group_mixing_devices_steps_each_parameter_on_its_device(cls):
    gen = torch.Generator().manual_seed(6)
    start, grad = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    cpu = geoopt.ManifoldParameter(start.clone(), Grassmann1())
    gpu = geoopt.ManifoldParameter(start.clone().cuda(), Grassmann1())
    bias = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    opt = cls([cpu, gpu, bias], lr=0.05)
    cpu.grad, gpu.grad, bias.grad = grad.clone(), grad.cuda(), torch.ones(3, device="cuda")
    opt.step()
    assert all(v.device == gpu.device for v in opt.state[gpu].values() if v.dim() > 0)
    assert torch.allclose(cpu.detach(), gpu.detach().cpu(), atol=1e-6)
    gpu.grad[0, 0] = NAN
    with pytest.raises(NonFiniteGradientError):
        opt.step()
