r"""Micro-benchmark of the fused SGD-G / Adam-G steps on the conv weights of a ResNet-18.

Run ``python -m rbn_geoopt.kernels.bench [--repeats 30] [--threads T] [--dtype float32]``.
The parameter set is the 20 conv weights of a ResNet-18 (11.2M parameters): the 7x7 stem,
then for widths 64/128/256/512 two basic blocks of 3x3 convs each, plus the 1x1 downsample
convs of stages 2-4. Every method steps its own copy of the tensors with the same fixed
gradients; the methods are timed in turn inside each repeat (interleaved, so that machine
noise hits all of them alike) and the medians are printed with their ratios to
``torch.optim.SGD(momentum=0.9, foreach=True)`` and ``torch.optim.Adam(foreach=True)``.

Methods: the optimizers' whole ``step()`` (step guard included), the multi-tensor fused
step alone through the C kernel and through the torch fallback, the
straightforward per-tensor composition of ``Grassmann1`` operators (``egrad2rgrad``,
``expmap_transp``), and geoopt's ``RiemannianSGD`` / ``RiemannianAdam`` on ``SphereExact``
(rows as points) unless ``--no-geoopt``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import geoopt
import torch

from ..manifold import Grassmann1
from ..optim import SGDG, AdamG
from . import dispatch

LR, MOMENTUM, BETAS, EPS = 0.01, 0.9, (0.9, 0.99), 1e-8


def resnet18_conv_shapes() -> list[tuple[int, ...]]:
    """Shapes of the 20 conv weights of a ResNet-18 (11,166,912 parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7)]
    c_in = 64
    for width in (64, 128, 256, 512):
        for block in range(2):
            shapes.append((width, c_in, 3, 3))
            shapes.append((width, width, 3, 3))
            if block == 0 and c_in != width:
                shapes.append((width, c_in, 1, 1))
            c_in = width
    return shapes


def _tensors(shapes, dtype, seed=0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ys = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    gs = [1e-2 * torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return ys, gs


def _torch_opt(cls, shapes, dtype, **kw) -> Callable[[], None]:
    ys, gs = _tensors(shapes, dtype)
    params = [torch.nn.Parameter(y) for y in ys]
    for p, g in zip(params, gs, strict=True):
        p.grad = g
    opt = cls(params, lr=LR, foreach=True, **kw)
    return opt.step


def _geoopt_opt(cls, shapes, dtype, **kw) -> Callable[[], None]:
    ys, gs = _tensors(shapes, dtype)
    sphere = geoopt.SphereExact()
    params = [
        geoopt.ManifoldParameter(sphere.projx(y.reshape(y.shape[0], -1)), manifold=sphere)
        for y in ys
    ]
    for p, g in zip(params, gs, strict=True):
        p.grad = g.reshape(p.shape)
    opt = cls(params, lr=LR, **kw)
    return opt.step


def _fused_sgdg(shapes, dtype, backend) -> Callable[[], None]:
    ys, gs = _tensors(shapes, dtype)
    taus = [torch.zeros_like(y) for y in ys]

    ndims = [y.dim() - 1 for y in ys]

    def step() -> None:
        dispatch.sgdg_foreach_(ys, gs, taus, ndims=ndims, lr=LR, momentum=MOMENTUM, backend=backend)

    return step


def _fused_adamg(shapes, dtype, backend) -> Callable[[], None]:
    ys, gs = _tensors(shapes, dtype)
    ms = [torch.zeros_like(y) for y in ys]
    vs = [torch.zeros(y.shape[0], dtype=dtype) for y in ys]
    count = [0]

    ndims = [y.dim() - 1 for y in ys]

    def step() -> None:
        count[0] += 1
        dispatch.adamg_foreach_(
            ys, gs, ms, vs, ndims=ndims, steps=count[0], lr=LR, beta1=BETAS[0],
            beta2=BETAS[1], eps=EPS, backend=backend,
        )  # fmt: skip

    return step


def _optimizer(cls, shapes, dtype, **kw) -> Callable[[], None]:
    """The whole ``step()`` of SGDG / AdamG: step guard, bookkeeping and the fused kernel."""
    ys, gs = _tensors(shapes, dtype)
    params = [geoopt.ManifoldParameter(y, manifold=Grassmann1(ndim=y.dim() - 1)) for y in ys]
    for p, g in zip(params, gs, strict=True):
        p.grad = g
    return cls(params, lr=LR, **kw).step


def _composed_sgdg(shapes, dtype) -> Callable[[], None]:
    """The straightforward path: one tensor at a time through Grassmann1's operators."""
    ys, gs = _tensors(shapes, dtype)
    taus = [torch.zeros_like(y) for y in ys]
    manifolds = [Grassmann1(ndim=y.dim() - 1) for y in ys]

    def step() -> None:
        for man, y, g, tau in zip(manifolds, ys, gs, taus, strict=True):
            h = man.egrad2rgrad(y, g)
            d = tau * MOMENTUM - LR * h
            new_y, new_tau = man.expmap_transp(y, d, d)
            y.copy_(new_y)
            tau.copy_(new_tau)

    return step


def _composed_adamg(shapes, dtype) -> Callable[[], None]:
    ys, gs = _tensors(shapes, dtype)
    ms = [torch.zeros_like(y) for y in ys]
    manifolds = [Grassmann1(ndim=y.dim() - 1) for y in ys]
    vs = [torch.zeros((y.shape[0],) + (1,) * (y.dim() - 1), dtype=dtype) for y in ys]
    count = [0]

    def step() -> None:
        count[0] += 1
        b1, b2 = BETAS
        size = LR * math.sqrt(1 - b2 ** count[0]) / (1 - b1 ** count[0])
        for man, y, g, m, v in zip(manifolds, ys, gs, ms, vs, strict=True):
            h = man.egrad2rgrad(y, g)
            m.mul_(b1).add_(h, alpha=1 - b1)
            v.mul_(b2).add_(man.inner(y, h, keepdim=True), alpha=1 - b2)
            d = m * (-size) / (v + EPS).sqrt()
            new_y, new_m = man.expmap_transp(y, d, m)
            y.copy_(new_y)
            m.copy_(new_m)

    return step


def _time(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(
    repeats: int = 30,
    dtype: torch.dtype = torch.float32,
    with_geoopt: bool = True,
    shapes: list[tuple[int, ...]] | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """Median seconds per step of every method (interleaved repeats, after one warm-up)."""
    shapes = resnet18_conv_shapes() if shapes is None else shapes
    methods: dict[str, Callable[[], None]] = {
        "torch SGD (momentum, foreach)": _torch_opt(
            torch.optim.SGD, shapes, dtype, momentum=MOMENTUM
        ),
        "torch Adam (foreach)": _torch_opt(torch.optim.Adam, shapes, dtype, betas=BETAS),
        "SGDG.step()": _optimizer(SGDG, shapes, dtype, momentum=MOMENTUM),
        "SGD-G fused, C": _fused_sgdg(shapes, dtype, "c"),
        "SGD-G fused, torch": _fused_sgdg(shapes, dtype, "torch"),
        "SGD-G composed": _composed_sgdg(shapes, dtype),
        "AdamG.step()": _optimizer(AdamG, shapes, dtype, betas=BETAS, eps=EPS),
        "Adam-G fused, C": _fused_adamg(shapes, dtype, "c"),
        "Adam-G fused, torch": _fused_adamg(shapes, dtype, "torch"),
        "Adam-G composed": _composed_adamg(shapes, dtype),
    }
    if not dispatch.c_available():
        del methods["SGD-G fused, C"], methods["Adam-G fused, C"]
    if with_geoopt:
        methods["geoopt RiemannianSGD (SphereExact)"] = _geoopt_opt(
            geoopt.optim.RiemannianSGD, shapes, dtype, momentum=MOMENTUM
        )
        methods["geoopt RiemannianAdam (SphereExact)"] = _geoopt_opt(
            geoopt.optim.RiemannianAdam, shapes, dtype, betas=BETAS
        )
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in methods.items():
                times[name].append(_time(fn))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    if verbose:
        _report(medians, shapes, dtype, repeats)
    return medians


def _isa() -> str:
    return dispatch._crows.isa() if dispatch.c_available() else "not built"


def _report(medians: dict[str, float], shapes, dtype, repeats: int) -> None:
    numel = sum(math.prod(s) for s in shapes)
    rows = sum(s[0] for s in shapes)
    sgd, adam = medians["torch SGD (momentum, foreach)"], medians["torch Adam (foreach)"]
    print(
        f"{len(shapes)} tensors, {numel:,} parameters ({rows} points), {dtype}, "
        f"{torch.get_num_threads()} threads, C extension: {_isa()}, "
        f"medians of {repeats} interleaved repeats"
    )
    print(f"{'method':40s} {'ms/step':>9s} {'/ SGD':>7s} {'/ Adam':>7s}")
    for name, sec in medians.items():
        print(f"{name:40s} {1e3 * sec:9.2f} {sec / sgd:7.2f} {sec / adam:7.2f}")
    item = torch.empty((), dtype=dtype).element_size()
    adam_state, adamg_state = 2 * numel * item, (numel + rows) * item
    print(
        f"optimizer state: Adam {adam_state:,} B, Adam-G {adamg_state:,} B "
        f"({adamg_state / adam_state:.3f}x)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-geoopt", action="store_true", help="skip geoopt's optimizers")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(args.repeats, getattr(torch, args.dtype), with_geoopt=not args.no_geoopt)


if __name__ == "__main__":
    main()
