r"""The optimizer-step benchmark: every measure of the step's speed in one run.

``python -m comparisons.bench [--repeats 30] [--runs 3] [--quick] [--parts] [--ops]
[--device cuda]`` prints

1. **Python calls** per ``step()`` on one ``Grassmann1`` parameter (counted with
   ``sys.setprofile``, Python-level calls only), for SGDG and AdamG, beside torch's
   ``SGD.step()`` and ``Adam.step()`` on a plain parameter of the same shape;
2. **20 small conv weights** ``(16, 8, 3, 3)``, one thread: ``SGDG.step()`` / torch
   ``SGD(momentum, foreach)``, ``AdamG.step()`` / torch ``Adam(foreach)``;
3. **ResNet-18's conv weights** (20 tensors, 11.2M parameters), two threads: the same
   ratios, and the speed-up over geoopt's ``RiemannianSGD`` / ``RiemannianAdam`` on
   ``SphereExact`` (the rows of each weight as points).

Each of measures 2 and 3 is taken ``--runs`` times (fresh optimizers each time) and printed
per run and as ``median (min-max)`` over the runs: on a shared machine the spread between
runs is larger than many changes worth measuring.

``--parts`` prints only where the time of one ``SGDG.step()`` on ResNet-18's conv weights
goes (two threads): the guard's C sweep alone and the fused C kernel alone, called on the
optimizer's own tensors and timed in the same rounds as ``SGDG.step()`` and torch's
``SGD(momentum, foreach)``; what the step costs beyond their sum is Python. The sweep
reads the points and gradients (2 tensor passes), the kernel reads points, gradients and
momenta and writes points and momenta (5); torch's momentum SGD moves 8.

``--ops`` prints only measure 4, the **top-level aten ops per tensor per step** on
ResNet-18's conv weights (width 8: the count depends on the shapes' structure, not their
sizes): every ``aten::`` event that ``torch.profiler`` records during one ``step()`` and
that no other ``aten::`` event encloses, divided by the 20 tensors; for SGDG and AdamG on
the pure-torch twin of the fused kernel (``RBN_GEOOPT_KERNELS=torch``: the path of CUDA
without triton, MPS, XPU; the step guard included) and on the Triton kernels (under
Triton's interpreter when there is no GPU; the ops inside a launch not counted), beside
torch's ``SGD(momentum, foreach)`` and ``Adam(foreach)`` (:func:`.bench_gpu.op_counts`).
On a GPU most such ops are kernel launches. The counts are deterministic.

Every method steps its own copy of the tensors with the same fixed gradients; the methods
are timed in turn inside each round (:func:`comparisons.timing.interleaved`) and the
medians compared, so machine noise hits all of them alike. Only the public API is used:
the step of an optimizer is what a user pays (guard, bookkeeping and kernel). ``--quick``
is the smoke run of the tests (few rounds, no ResNet-18). ``--device cuda`` runs the
device check instead (:mod:`comparisons.bench_gpu`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable

import geoopt
import torch

from rbn_geoopt import SGDG, AdamG, Grassmann1

from .bench_gpu import cuda_check, op_counts, top_level_aten
from .models import resnet18_conv_shapes
from .timing import interleaved

__all__ = ["count_aten_ops", "count_calls", "main", "step_ratios"]

LR, MOMENTUM, BETAS, EPS = 0.01, 0.9, (0.9, 0.99), 1e-8
SMALL = [(16, 8, 3, 3)] * 20


def _tensors(shapes, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ys = [torch.randn(s, generator=gen) for s in shapes]
    gs = [1e-2 * torch.randn(s, generator=gen) for s in shapes]
    return ys, gs


def _with_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


def _ours(cls, shapes, **hyper) -> torch.optim.Optimizer:
    ys, gs = _tensors(shapes)
    params = [geoopt.ManifoldParameter(y, manifold=Grassmann1(ndim=y.dim() - 1)) for y in ys]
    return cls(_with_grads(params, gs), lr=LR, **hyper)


def _torch(cls, shapes, **hyper) -> torch.optim.Optimizer:
    ys, gs = _tensors(shapes)
    params = [torch.nn.Parameter(y) for y in ys]
    return cls(_with_grads(params, gs), lr=LR, foreach=True, **hyper)


def _geoopt(cls, shapes, **hyper) -> torch.optim.Optimizer:
    ys, gs = _tensors(shapes)
    sphere = geoopt.SphereExact()
    params = [
        geoopt.ManifoldParameter(sphere.projx(y.reshape(y.shape[0], -1)), manifold=sphere)
        for y in ys
    ]
    grads = [g.reshape(p.shape) for p, g in zip(params, gs, strict=True)]
    return cls(_with_grads(params, grads), lr=LR, **hyper)


def _methods(shapes, with_geoopt: bool) -> dict[str, Callable[[], object]]:
    methods = {
        "torch SGD": _torch(torch.optim.SGD, shapes, momentum=MOMENTUM).step,
        "SGDG": _ours(SGDG, shapes, momentum=MOMENTUM).step,
        "torch Adam": _torch(torch.optim.Adam, shapes, betas=BETAS, eps=EPS).step,
        "AdamG": _ours(AdamG, shapes, betas=BETAS, eps=EPS).step,
    }
    if with_geoopt:
        methods["geoopt RiemannianSGD"] = _geoopt(
            geoopt.optim.RiemannianSGD, shapes, momentum=MOMENTUM
        ).step
        methods["geoopt RiemannianAdam"] = _geoopt(
            geoopt.optim.RiemannianAdam, shapes, betas=BETAS, eps=EPS
        ).step
    return methods


def count_calls(step: Callable[[], object]) -> int:
    """Python-level function calls made by one ``step()`` (after one warm-up call)."""
    step()
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


def python_calls() -> dict[str, int]:
    """Measure 1 of the module docstring."""
    shape = [(64, 32, 3, 3)]
    return {
        "SGDG": count_calls(_ours(SGDG, shape, momentum=MOMENTUM).step),
        "AdamG": count_calls(_ours(AdamG, shape).step),
        "torch SGD": count_calls(_torch(torch.optim.SGD, shape, momentum=MOMENTUM).step),
        "torch Adam": count_calls(_torch(torch.optim.Adam, shape).step),
    }


def count_aten_ops(step: Callable[[], object]) -> int:
    """Top-level aten ops issued by one ``step()`` after one warm-up call
    (:func:`.bench_gpu.top_level_aten`)."""
    step()
    return len(top_level_aten(step))


def step_ratios(
    shapes, threads: int, rounds: int, with_geoopt: bool = True
) -> tuple[dict[str, float], dict[str, float]]:
    """``(medians in seconds, ratios)`` of the step times on ``shapes`` with ``threads``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        methods = _methods(shapes, with_geoopt)
        times = interleaved(methods, warmup=2, rounds=rounds)
    finally:
        torch.set_num_threads(before)
    med = {label: statistics.median(ts) for label, ts in times.items()}
    ratios = {
        "SGDG / torch SGD": med["SGDG"] / med["torch SGD"],
        "AdamG / torch Adam": med["AdamG"] / med["torch Adam"],
    }
    if with_geoopt:
        ratios["geoopt RiemannianSGD / SGDG"] = med["geoopt RiemannianSGD"] / med["SGDG"]
        ratios["geoopt RiemannianAdam / AdamG"] = med["geoopt RiemannianAdam"] / med["AdamG"]
    return med, ratios


def step_parts(threads: int, rounds: int) -> dict[str, float]:
    """Median seconds of torch's momentum SGD step, ``SGDG.step()``, and the two C calls
    of that step alone (the guard's sweep, the fused kernel) on the optimizer's own
    ResNet-18 conv weights, timed in the same rounds (``--parts``)."""
    from rbn_geoopt.optim import _fused

    crows = _fused._crows
    if crows is None:
        raise RuntimeError("--parts times the C extension, which is not built here")
    shapes = resnet18_conv_shapes()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _ours(SGDG, shapes, momentum=MOMENTUM)
        ours.step()  # creates the momentum buffers
        params = ours.param_groups[0]["params"]
        ys = [p.detach() for p in params]
        gs = [p.grad for p in params]
        taus = [ours.state[p]["momentum_buffer"] for p in params]
        ns = [y[0].numel() for y in ys]
        lo2, hi2, glim2 = _fused.limits(torch.float32)
        sweep = [(y.data_ptr(), g.data_ptr(), len(y), n, lo2, hi2, glim2)
                 for y, g, n in zip(ys, gs, ns, strict=True)]  # fmt: skip
        kernel = [(y.data_ptr(), g.data_ptr(), t.data_ptr(), len(y), n)
                  for y, g, t, n in zip(ys, gs, taus, ns, strict=True)]  # fmt: skip
        snap = _fused.torch_twin.snap(torch.float32)
        methods = {
            "torch SGD": _torch(torch.optim.SGD, shapes, momentum=MOMENTUM).step,
            "SGDG.step()": ours.step,
            "guard sweep (C)": lambda: crows.check_rows(sweep, 0, threads),
            "kernel (C)": lambda: crows.sgdg_many(kernel, 0, LR, MOMENTUM, math.inf, snap, threads),
        }
        times = interleaved(methods, warmup=2, rounds=rounds)
    finally:
        torch.set_num_threads(before)
    return {label: statistics.median(ts) for label, ts in times.items()}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def _print_table(title: str, meds: list[dict[str, float]], ratios: list[dict[str, float]]):
    """One column per run, then the median (min-max) of the ratios over the runs."""
    print(f"\n{title}")
    for label in meds[0]:
        cells = " ".join(f"{1e3 * med[label]:9.3f}" for med in meds)
        print(f"  {label:24s} {cells} ms")
    for label in ratios[0]:
        cells = " ".join(f"{r[label]:6.2f}x" for r in ratios)
        summary = _spread([r[label] for r in ratios]) if len(ratios) > 1 else ""
        print(f"  {label:32s} {cells}   {summary}")


def _runs(shapes, threads: int, rounds: int, runs: int, with_geoopt: bool, title: str):
    """``--runs`` repetitions of :func:`step_ratios`, printed; the median ratios."""
    meds, ratios = [], []
    for _ in range(runs):
        med, ratio = step_ratios(shapes, threads, rounds, with_geoopt)
        meds.append(med)
        ratios.append(ratio)
    _print_table(title, meds, ratios)
    return {label: statistics.median(r[label] for r in ratios) for label in ratios[0]}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per measure")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each timed measure")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, no ResNet")
    parser.add_argument(
        "--ops", action="store_true", help="only the top-level aten ops per tensor per step"
    )
    parser.add_argument(
        "--parts", action="store_true", help="only where SGDG.step()'s time goes (ResNet-18)"
    )
    parser.add_argument("--device", default="cpu", help="cuda: the device check instead")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeats < 1:
        parser.error("--runs and --repeats must be at least 1")
    if args.ops:
        ops = op_counts(resnet18_conv_shapes(width=8))
        print("Top-level aten ops per tensor per step, ResNet-18's 20 conv weights:")
        for label, count in ops.items():
            print(f"  {label:28s} {count:7.2f}")
        return {"aten_ops": ops}
    rounds = 3 if args.quick else args.repeats
    if args.parts:
        med = step_parts(threads=2, rounds=rounds)
        print("One SGDG.step() on ResNet-18's conv weights, 2 threads (ratio to torch SGD):")
        for label, sec in med.items():
            print(f"  {label:18s} {1e3 * sec:8.3f} ms  {sec / med['torch SGD']:5.2f}x")
        rest = med["SGDG.step()"] - med["guard sweep (C)"] - med["kernel (C)"]
        print(f"  {'rest (Python)':18s} {1e3 * rest:8.3f} ms  {rest / med['torch SGD']:5.2f}x")
        return {"parts": med}
    if args.device != "cpu":
        if args.device != "cuda":
            parser.error("--device must be cpu or cuda")
        return {"cuda": cuda_check(rounds)}
    runs = 1 if args.quick else args.runs
    out: dict[str, object] = {"python_calls": python_calls()}
    print("Python calls per step() on one (64, 32, 3, 3) parameter:")
    for label, calls in out["python_calls"].items():
        print(f"  {label:12s} {calls:5d}")
    title = "20 conv weights (16, 8, 3, 3), 1 thread:"
    out["small"] = _runs(SMALL, 1, rounds * 4, runs, False, title)
    if not args.quick:
        title = "ResNet-18 conv weights (11.2M parameters), 2 threads:"
        out["resnet18"] = _runs(resnet18_conv_shapes(), 2, rounds, runs, True, title)
    return out


if __name__ == "__main__":
    main()
