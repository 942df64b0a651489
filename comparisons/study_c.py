"""Study C: the cost of one optimizer step on the conv weights of a ResNet-18.

Every method gets its own copy of the 20 conv weights of an ImageNet ResNet-18 (11.2M
parameters, shapes from ``models.resnet18_conv_shapes``) with a fixed random gradient, and
``step()`` is timed alone (no forward/backward). The methods are measured interleaved, one
step of each in turn per round (after warm-up rounds), so that a change of machine load hits
all of them alike; the median over rounds is compared as a ratio:

* SGD-G (momentum 0.9, ``Grassmann1(ndim=3)``) and geoopt ``RiemannianSGD`` (momentum 0.9,
  ``SphereExact`` on the weights flattened to rows) against torch ``SGD(momentum=0.9,
  foreach=True)``;
* Adam-G and geoopt ``RiemannianAdam`` (``SphereExact``) against torch ``Adam(foreach=True)``.

Example::

    result = run_study_c(BUDGETS["smoke"], progress=False)
    result["ratios"]["SGD-G"]  # SGD-G step time / torch SGD (foreach) step time
"""

from __future__ import annotations

import math
import statistics
import time

import geoopt
import torch
from tqdm import tqdm

from .models import resnet18_conv_shapes

__all__ = ["BUDGETS", "BASELINE_OF", "run_study_c"]

BUDGETS = {
    "smoke": {"width": 8, "warmup": 1, "rounds": 3},
    "quick": {"width": 64, "warmup": 2, "rounds": 7},
    "full": {"width": 64, "warmup": 3, "rounds": 25},
}

#: method label -> the torch baseline its time is divided by
BASELINE_OF = {
    "SGD-G": "SGD (foreach)",
    "RiemannianSGD (SphereExact)": "SGD (foreach)",
    "Adam-G": "Adam (foreach)",
    "RiemannianAdam (SphereExact)": "Adam (foreach)",
}
LABELS = ("SGD (foreach)", "SGD-G", "RiemannianSGD (SphereExact)") + (
    "Adam (foreach)",
    "Adam-G",
    "RiemannianAdam (SphereExact)",
)


def _params(
    label: str, shapes: list[tuple[int, ...]], seed: int, device: torch.device
) -> list[torch.Tensor]:
    from rbn_geoopt import Grassmann1

    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen).to(device)
        g = torch.randn(shape, generator=gen).to(device)
        if "-G" in label:
            w = geoopt.ManifoldParameter(w, manifold=Grassmann1(ndim=3))
        elif "Riemannian" in label:
            manifold = geoopt.SphereExact()
            w = geoopt.ManifoldParameter(manifold.projx(w.reshape(shape[0], -1)), manifold=manifold)
            g = g.reshape(shape[0], -1)
        else:
            w = torch.nn.Parameter(w)
        w.grad = g
        params.append(w)
    return params


def _optimizer(label: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from rbn_geoopt.optim import create

    if label == "SGD (foreach)":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    if label == "Adam (foreach)":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if label == "SGD-G":
        return create("sgdg", params, lr=0.01, momentum=0.9)
    if label == "Adam-G":
        return create("adamg", params, lr=1e-3)
    if label == "RiemannianSGD (SphereExact)":
        return geoopt.optim.RiemannianSGD(params, lr=0.01, momentum=0.9)
    return geoopt.optim.RiemannianAdam(params, lr=1e-3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_study_c(
    budget: dict,
    progress: bool = True,
    labels: tuple[str, ...] = LABELS,
    device: str | torch.device = "cpu",
) -> dict:
    """Interleaved step timing; returns medians (seconds), ratios and the parameter count."""
    device = torch.device(device)
    shapes = resnet18_conv_shapes(budget["width"])
    n_params = sum(math.prod(s) for s in shapes)
    optimizers = {}
    for i, label in enumerate(labels):
        optimizers[label] = _optimizer(label, _params(label, shapes, seed=i, device=device))
    times: dict[str, list[float]] = {label: [] for label in labels}
    rounds = budget["warmup"] + budget["rounds"]
    bar = tqdm(total=rounds * len(labels), desc="study C", leave=False, disable=not progress)
    for r in range(rounds):
        order = labels if r % 2 == 0 else tuple(reversed(labels))
        for label in order:
            _sync(device)
            start = time.perf_counter()
            optimizers[label].step()
            _sync(device)
            elapsed = time.perf_counter() - start
            if r >= budget["warmup"]:
                times[label].append(elapsed)
            bar.update(1)
    bar.close()
    medians = {label: statistics.median(t) for label, t in times.items()}
    ratios = {
        label: medians[label] / medians[base]
        for label, base in BASELINE_OF.items()
        if label in medians and base in medians
    }
    return {
        "shapes": [list(s) for s in shapes],
        "n_params": n_params,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": budget["rounds"],
        "median_seconds": medians,
        "ratios": ratios,
        "baseline_of": BASELINE_OF,
    }
