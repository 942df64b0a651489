r"""The GPU path's measures, two sections of ``python -m comparisons.bench``.

``--ops``: top-level aten ops per ``Grassmann1`` tensor in one ``step()`` of SGDG / AdamG on
given conv weight shapes (CPU, counted with ``torch.profiler``), with the torch
twin (``RBN_GEOOPT_KERNELS=torch``, the path of CUDA without triton) and with the Triton
kernels forced under Triton's interpreter (the ops the interpreter itself runs inside a
launch are not counted: on a GPU a launch is one kernel), beside torch's foreach SGD/Adam.
Counts are deterministic (a unit test asserts the Triton one).

``--device cuda``: the device check. Times ``SGDG.step()`` / ``AdamG.step()`` (Triton
kernels, and again on the torch twin, the path of CUDA without triton) on ResNet-18's conv
weights against torch's SGD and Adam (foreach and fused, the faster of each) and geoopt's
``RiemannianSGD`` / ``RiemannianAdam`` on ``SphereExact``, synchronising the device around
every timed step; beside each, the host's time per step when steps are only enqueued
(close to the synchronized time: bound by launches, not by the device); then one whole
training step of the ImageNet ResNet-18 (batch 128, 224x224; :data:`TRAIN_BUDGET`) with
the paper recipe against the same step with torch's SGD / Adam, then runs the CUDA test
subset
(``tests/test_triton_kernel.py`` compiled, on CUDA tensors). Without CUDA it says so in one
line and exits with status 2.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import geoopt
import torch

from rbn_geoopt import SGDG, AdamG, Grassmann1
from rbn_geoopt.optim._fused import ENV_VAR

from .models import resnet18_conv_shapes
from .timing import interleaved, sync
from .train_step import run_train_step

__all__ = ["cuda_check", "device_measures", "op_counts", "top_level_aten"]

LR, MOMENTUM, BETAS, EPS = 0.01, 0.9, (0.9, 0.99), 1e-8
#: the training-step measure of the device check: the ImageNet ResNet-18 (built here, random
#: weights), one fixed batch of random images, the paper recipe against torch's SGD / Adam
TRAIN_BUDGET = {
    "model": {"name": "resnet18"},
    "image": (3, 224, 224),
    "classes": 1000,
    "batch": 128,
    "warmup": 3,
    "rounds": 20,
}
SMALL = [(16, 8, 3, 3)] * 20


def _params(shapes, device, kind: str):
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        y = torch.randn(s, generator=gen).to(device)
        if kind == "ours":
            p = geoopt.ManifoldParameter(y, manifold=Grassmann1(ndim=y.dim() - 1))
        elif kind == "geoopt":
            sphere = geoopt.SphereExact()
            p = geoopt.ManifoldParameter(sphere.projx(y.reshape(s[0], -1)), manifold=sphere)
        else:
            p = torch.nn.Parameter(y)
        p.grad = 1e-2 * torch.randn(p.shape, generator=gen).to(device)
        out.append(p)
    return out


def top_level_aten(step, exclude_triton: bool = False, launches: list | None = None) -> list[str]:
    """The aten ops of ``step()`` called by no other aten op (the optimizers' own
    ``record_function`` ranges are looked through); with ``exclude_triton``, not those run
    inside a Triton launch (``launches`` then gets one entry per launch)."""
    from rbn_geoopt.optim._fused import triton_rows

    real = triton_rows._launch

    def launch(*args, **kw):
        if launches is not None:
            launches.append(args[0])
        with torch.profiler.record_function("triton launch"):
            real(*args, **kw)

    if exclude_triton:
        triton_rows._launch = launch
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    finally:
        triton_rows._launch = real
    out = []
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not (
            parent.name.startswith("aten::") or parent.name == "triton launch"
        ):
            parent = parent.cpu_parent
        if parent is None:
            out.append(e.name)
    return out


def op_counts(shapes=SMALL) -> dict[str, float]:
    """Top-level aten ops per tensor per step on ``shapes`` (module docstring)."""
    out: dict[str, float] = {}
    old = os.environ.get("RBN_GEOOPT_KERNELS")
    backends = ["torch"]
    try:
        import triton  # noqa: F401

        from rbn_geoopt.optim._fused import triton_rows

        if triton_rows.INTERPRET:
            backends.append("triton")
    except ImportError:
        pass
    try:
        for backend in backends:
            os.environ["RBN_GEOOPT_KERNELS"] = backend
            for cls, hyper in ((SGDG, {"momentum": MOMENTUM}), (AdamG, {})):
                opt = cls(_params(shapes, "cpu", "ours"), lr=LR, **hyper)
                opt.step()  # state created
                ops = top_level_aten(opt.step, exclude_triton=backend == "triton")
                out[f"{cls.__name__} ({backend})"] = len(ops) / len(shapes)
    finally:
        if old is None:
            os.environ.pop("RBN_GEOOPT_KERNELS", None)
        else:
            os.environ["RBN_GEOOPT_KERNELS"] = old
    for cls, hyper in ((torch.optim.SGD, {"momentum": MOMENTUM}), (torch.optim.Adam, {})):
        opt = cls(_params(shapes, "cpu", "torch"), lr=LR, foreach=True, **hyper)
        opt.step()
        out[f"torch {cls.__name__} (foreach)"] = len(top_level_aten(opt.step)) / len(shapes)
    return out


class _Backend:
    """``step()`` with ``RBN_GEOOPT_KERNELS`` set to ``choice`` for the call (the twin's
    timing on the same device)."""

    def __init__(self, step, choice: str) -> None:
        self.step, self.choice = step, choice

    def __call__(self) -> None:
        before = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = self.choice
        try:
            self.step()
        finally:
            if before is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = before


def _enqueue_seconds(step, device: torch.device, count: int = 20) -> float:
    """Host seconds per ``step()`` over ``count`` calls with no synchronization between
    them: close to the synchronized time, the step is bound by launches, not the device."""
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    host = time.perf_counter() - start
    sync(device)
    return host / count


def device_measures(device, shapes, rounds: int, train_budget: dict) -> dict[str, dict]:
    """The device check's timings on ``device`` (CPU in the tests, with small shapes):
    interleaved medians of SGDG / AdamG (default kernels, then the torch twin), torch's
    SGD and Adam (foreach and fused) and geoopt's; host-side seconds per step; one
    training step (:func:`.train_step.run_train_step` on ``train_budget``)."""
    device = torch.device(device)
    sgd = {"momentum": MOMENTUM}
    adam = {"betas": BETAS, "eps": EPS}
    ours = {
        "SGDG": SGDG(_params(shapes, device, "ours"), lr=LR, **sgd).step,
        "AdamG": AdamG(_params(shapes, device, "ours"), lr=LR, **adam).step,
    }
    methods = dict(ours)
    for label in ("SGDG", "AdamG"):
        cls, hyper = (SGDG, sgd) if label == "SGDG" else (AdamG, adam)
        twin = cls(_params(shapes, device, "ours"), lr=LR, **hyper).step
        methods[f"{label} (torch twin)"] = _Backend(twin, "torch")
    methods["geoopt RiemannianSGD"] = geoopt.optim.RiemannianSGD(
        _params(shapes, device, "geoopt"), lr=LR, **sgd
    ).step
    methods["geoopt RiemannianAdam"] = geoopt.optim.RiemannianAdam(
        _params(shapes, device, "geoopt"), lr=LR, **adam
    ).step
    modes = ("foreach", "fused") if device.type == "cuda" else ("foreach",)
    for cls, hyper in ((torch.optim.SGD, sgd), (torch.optim.Adam, adam)):
        for mode in modes:
            opt = cls(_params(shapes, device, "torch"), lr=LR, **{mode: True}, **hyper)
            methods[f"torch {cls.__name__} ({mode})"] = opt.step
    times = interleaved(methods, warmup=3, rounds=rounds, device=device)
    med = {label: statistics.median(ts) for label, ts in times.items()}
    best_sgd = min(med[f"torch SGD ({mode})"] for mode in modes)
    best_adam = min(med[f"torch Adam ({mode})"] for mode in modes)
    ratios = {
        "SGDG / torch SGD (faster)": med["SGDG"] / best_sgd,
        "AdamG / torch Adam (faster)": med["AdamG"] / best_adam,
        "SGDG (torch twin) / torch SGD (faster)": med["SGDG (torch twin)"] / best_sgd,
        "AdamG (torch twin) / torch Adam (faster)": med["AdamG (torch twin)"] / best_adam,
        "geoopt RiemannianSGD / SGDG": med["geoopt RiemannianSGD"] / med["SGDG"],
        "geoopt RiemannianAdam / AdamG": med["geoopt RiemannianAdam"] / med["AdamG"],
    }
    host = {label: _enqueue_seconds(step, device) for label, step in methods.items()}
    train = run_train_step(train_budget, device=device)
    return {"median_seconds": med, "ratios": ratios, "host_seconds": host, "train": train}


def cuda_check(rounds: int) -> dict[str, float]:
    """The device check (module docstring); exits with status 2 without CUDA."""
    if not torch.cuda.is_available():
        print("comparisons.bench --device cuda: no CUDA device here; nothing was timed")
        raise SystemExit(2)
    device = torch.device("cuda")
    out = device_measures(device, resnet18_conv_shapes(), rounds, TRAIN_BUDGET)
    med, ratios, host = out["median_seconds"], out["ratios"], out["host_seconds"]
    print(f"\nResNet-18 conv weights on {torch.cuda.get_device_name(device)}:")
    print(f"  {'':28s} {'synchronized':>12s} {'host only':>10s}")
    for label, sec in med.items():
        print(f"  {label:28s} {1e3 * sec:9.3f} ms {1e3 * host[label]:7.3f} ms")
    for label, value in ratios.items():
        print(f"  {label:40s} {value:6.2f}x")
    train = out["train"]
    print(f"\nOne training step of ResNet-18, batch {TRAIN_BUDGET['batch']}, 224x224:")
    for label, sec in train["median_seconds"].items():
        print(f"  {label:28s} {1e3 * sec:9.3f} ms")
    for label, value in train["ratios"].items():
        ratios[f"training step, {label}"] = value
        print(f"  {label:32s} {value:6.2f}x")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("\nCUDA test subset: tests/test_triton_kernel.py (compiled kernels)", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_triton_kernel.py"],
        cwd=root, env=env,
    )  # fmt: skip
    ratios["cuda tests passed"] = float(done.returncode == 0)
    return ratios
