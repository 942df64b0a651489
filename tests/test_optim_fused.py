"""The fused path (default) and the single-tensor path (fused=False or foreach=False) of
SGDG/AdamG agree.

The fused kernels of rbn_geoopt.optim._fused step float32/float64 Grassmann1 parameters;
every other manifold and half precision take the single-tensor composition of the
manifold's operators. Both must give the same trajectories to float rounding.
"""

from __future__ import annotations

import geoopt
import pytest
import torch

from rbn_geoopt import SGDG, AdamG, Grassmann1
from rbn_geoopt.optim import _fused, adamg, sgdg

F64 = torch.float64
CONFIGS = [
    dict(momentum=0.9),
    dict(momentum=0.0),
    dict(momentum=0.9, grad_clip=0.05),
    dict(momentum=0.9, grad_clip=0.05, omega=0.1),
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trajectory(cls, shape, ndim, dtype, hyper, foreach, steps=25, fused=None):
    gen = torch.Generator().manual_seed(3)
    w = geoopt.ManifoldParameter(
        torch.randn(shape, generator=gen, dtype=dtype) * 3.0, manifold=Grassmann1(ndim=ndim)
    )
    target = torch.randn(shape, generator=gen, dtype=dtype)
    opt = cls([w], foreach=foreach, fused=fused, **hyper)
    for _ in range(steps):
        opt.zero_grad()
        rows = w.reshape(shape[0], -1)
        unit = rows / rows.norm(dim=1, keepdim=True)
        loss = ((unit - target.reshape(shape[0], -1)) ** 2).sum() + (unit @ unit.T).sum()
        loss.backward()
        opt.step()
    return w.detach().clone(), opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, ndim", [((6, 10), 1), ((5, 3, 2, 2), 3)])
@pytest.mark.parametrize("hyper", CONFIGS)
@pytest.mark.parametrize("cls, lr", [(SGDG, 0.2), (AdamG, 0.05)])
def test_fused_equals_straightforward(cls, lr, hyper, shape, ndim, dtype):
    hyper = dict(hyper, lr=lr)
    if cls is AdamG:
        hyper.pop("momentum")
    fused, opt_f = _trajectory(cls, shape, ndim, dtype, hyper, foreach=None)
    plain, opt_p = _trajectory(cls, shape, ndim, dtype, hyper, foreach=False)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    scale = fused.abs().max().item()  # the points keep their norms (~3 sqrt(n) here)
    torch.testing.assert_close(fused, plain, rtol=0, atol=tol * scale)
    (p_f,), (p_p,) = opt_f.param_groups[0]["params"], opt_p.param_groups[0]["params"]
    for key, value in opt_p.state[p_p].items():
        torch.testing.assert_close(opt_f.state[p_f][key], value, rtol=0, atol=tol * 10 * scale)
    rows = fused.reshape(shape[0], -1).norm(dim=1)  # each point keeps its norm
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 3.0
    torch.testing.assert_close(rows, start.reshape(shape[0], -1).norm(dim=1), rtol=tol, atol=0)
    also, _ = _trajectory(cls, shape, ndim, dtype, hyper, foreach=None, fused=False)
    assert torch.equal(also, plain)  # fused=False is the single-tensor path too


def _count_fused_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for module, name in ((sgdg, "_fused_sgdg"), (adamg, "_fused_adamg")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_path_selection(cls, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    hyper = dict(lr=0.1, momentum=0.9) if cls is SGDG else dict(lr=0.1)
    _trajectory(cls, (4, 6), 1, torch.float64, hyper, foreach=None, steps=2)
    assert len(calls) == 2  # default: fused for a float64 Grassmann1 parameter, one call a step
    calls.clear()
    _trajectory(cls, (4, 6), 1, torch.float64, hyper, foreach=False, steps=2)
    assert calls == []  # foreach=False: the straightforward composition
    scaled = geoopt.ManifoldParameter(torch.randn(4, 6), manifold=geoopt.Scaled(Grassmann1(), 2))
    half = geoopt.ManifoldParameter(torch.randn(4, 6, dtype=torch.bfloat16), manifold=Grassmann1())
    opt = cls([scaled, half], **hyper)
    scaled.grad, half.grad = torch.randn(4, 6), torch.randn(4, 6, dtype=torch.bfloat16)
    opt.step()
    assert calls == []  # Scaled changes the math; half precision keeps float32 composition


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_one_fused_call_steps_every_grassmann_parameter_of_a_group(cls, monkeypatch):
    """The multi-tensor path: float32 and float64 parameters of several shapes and ndims,
    mixed with a Scaled one (straightforward path), equal the per-parameter straightforward
    run, with one fused call per step."""
    calls = _count_fused_calls(monkeypatch)
    hyper = dict(lr=0.1, momentum=0.9, grad_clip=0.05) if cls is SGDG else dict(lr=0.05)
    specs = [((5, 3, 2, 2), 3, torch.float64), ((7, 4), 1, torch.float32), ((3, 6), 1, F64)]
    runs = {}
    for foreach in (None, False):
        gen = torch.Generator().manual_seed(9)
        params = [
            geoopt.ManifoldParameter(torch.randn(s, generator=gen, dtype=d), Grassmann1(ndim=k))
            for s, k, d in specs
        ]
        scaled_manifold = geoopt.Scaled(Grassmann1(), 2)
        scaled = geoopt.ManifoldParameter(
            torch.randn(4, 5, generator=gen, dtype=F64), scaled_manifold
        )
        opt = cls(params + [scaled], foreach=foreach, **hyper)
        for _ in range(4):
            for p in params + [scaled]:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        runs[foreach] = [p.detach().clone() for p in params + [scaled]]
    assert calls == [("_fused_sgdg" if cls is SGDG else "_fused_adamg")] * 4
    for fused, plain in zip(runs[None], runs[False], strict=True):
        tol = 1e-12 if fused.dtype == F64 else 2e-5
        torch.testing.assert_close(fused, plain, rtol=0, atol=tol)


def test_fused_backend_torch_equals_c(monkeypatch):
    """With the C extension forced off, the optimizer's fused path runs in pure torch."""
    if _fused._crows is None:
        pytest.skip("C extension not built: the torch backend is the only one")
    hyper = dict(lr=0.2, momentum=0.9, grad_clip=0.05)
    with_c, _ = _trajectory(SGDG, (6, 10), 1, torch.float64, hyper, foreach=None)
    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    with_torch, _ = _trajectory(SGDG, (6, 10), 1, torch.float64, hyper, foreach=None)
    torch.testing.assert_close(with_c, with_torch, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_fused_true_insists_and_refuses_what_it_cannot_step(cls):
    w = geoopt.ManifoldParameter(torch.randn(4, 6), manifold=Grassmann1())
    cls([w], lr=0.1, fused=True)
    half = geoopt.ManifoldParameter(torch.randn(4, 6, dtype=torch.bfloat16), Grassmann1())
    with pytest.raises(ValueError, match="fused=True, but the fused kernels step float32"):
        cls([half], lr=0.1, fused=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        cls([w], lr=0.1, fused=True, foreach=True)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("cls", [SGDG, AdamG])
def test_a_step_writes_the_manifold_parameter_itself(cls, foreach, kernels, monkeypatch):
    """A step reads and writes a geoopt ManifoldParameter through a plain alias: the
    parameter's own storage changes, its version counter is bumped (autograd detects a
    step between forward and backward), and it keeps its class and manifold."""
    monkeypatch.setenv(_fused.ENV_VAR, kernels)
    gen = torch.Generator().manual_seed(5)
    w = geoopt.ManifoldParameter(
        torch.randn(4, 3, 2, dtype=F64, generator=gen), manifold=Grassmann1(ndim=2)
    )
    before, pointer, version = w.detach().clone(), w.data_ptr(), w._version
    w.grad = torch.randn(4, 3, 2, dtype=F64, generator=gen)
    loss = (w * w).sum()
    cls([w], lr=0.1, foreach=foreach).step()
    assert w._version > version and w.data_ptr() == pointer
    assert type(w) is geoopt.ManifoldParameter and isinstance(w.manifold, Grassmann1)
    assert (w.detach() - before).abs().amax(dim=(1, 2)).min() > 1e-6  # every point moved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
