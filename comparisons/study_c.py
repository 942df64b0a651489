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

From the same run, after the timed steps: each optimizer's state size, the bytes of every
tensor in ``optimizer.state`` (``numel * element_size``, step counters included), and its
ratio to the baseline's (Adam-G keeps one second-moment scalar per row, torch Adam one per
coordinate). Then (:mod:`.train_step`) one whole training step of study A's VGG BN-CNN,
SGD-G / Adam-G through ``rbn_geoopt.nn.paper_optimizer`` against torch SGD / Adam.

Example::

    result = run_study_c(BUDGETS["smoke"], progress=False)
    result["ratios"]["SGD-G"]  # SGD-G step time / torch SGD (foreach) step time
    result["state_ratios"]["Adam-G"]  # Adam-G state bytes / torch Adam's
    result["train_step"]["ratios"]["SGD-G (paper recipe)"]  # training step / torch SGD's
"""

from __future__ import annotations

import math
import statistics

import geoopt
import torch
from tqdm import tqdm

from .models import resnet18_conv_shapes
from .timing import interleaved
from .train_step import TRAIN_LABELS, run_train_step

__all__ = ["BUDGETS", "BASELINE_OF", "run_study_c", "state_bytes", "summary_lines"]

#: ``width``, ``warmup``, ``rounds``: the step timing; ``train``: the training-step timing
#: (study A's VGG widths, batch 128; about 0.3 s per step on 2 shared cores, so the quick
#: budget's 12 rounds of 4 methods add about 15-20 s)
BUDGETS = {
    "smoke": {
        "width": 8,
        "warmup": 1,
        "rounds": 3,
        "train": {"widths": (4, 8, 8, 8), "batch": 16, "warmup": 1, "rounds": 2},
    },
    "quick": {
        "width": 64,
        "warmup": 2,
        "rounds": 7,
        "train": {"widths": (16, 32, 64, 64), "batch": 128, "warmup": 2, "rounds": 10},
    },
    "full": {
        "width": 64,
        "warmup": 3,
        "rounds": 25,
        "train": {"widths": (16, 32, 64, 64), "batch": 128, "warmup": 3, "rounds": 30},
    },
}

#: method label -> the torch baseline its time is divided by
BASELINE_OF = {
    "SGD-G": "SGD (foreach)",
    "RiemannianSGD (SphereExact)": "SGD (foreach)",
    "Adam-G": "Adam (foreach)",
    "RiemannianAdam (SphereExact)": "Adam (foreach)",
}
#: ours -> geoopt's optimizer on SphereExact: "speedups" = geoopt's time / ours
GEOOPT_OF = {"SGD-G": "RiemannianSGD (SphereExact)", "Adam-G": "RiemannianAdam (SphereExact)"}
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


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (``numel * element_size``)."""
    return sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if torch.is_tensor(t)
    )


def run_study_c(
    budget: dict,
    progress: bool = True,
    labels: tuple[str, ...] = LABELS,
    device: str | torch.device = "cpu",
) -> dict:
    """Interleaved step timing, state sizes and (when ``budget`` has ``train``) the
    training-step timing; returns medians (seconds), ratios, bytes and the parameter count."""
    device = torch.device(device)
    shapes = resnet18_conv_shapes(budget["width"])
    n_params = sum(math.prod(s) for s in shapes)
    optimizers = {}
    for i, label in enumerate(labels):
        optimizers[label] = _optimizer(label, _params(label, shapes, seed=i, device=device))
    train = budget.get("train")
    total = (budget["warmup"] + budget["rounds"]) * len(labels)
    if train:
        total += (train["warmup"] + train["rounds"]) * len(TRAIN_LABELS)
    bar = tqdm(total=total, desc="study C", leave=False, disable=not progress)
    steps = {label: opt.step for label, opt in optimizers.items()}
    times = interleaved(steps, budget["warmup"], budget["rounds"], device, lambda: bar.update(1))
    medians = {label: statistics.median(t) for label, t in times.items()}
    ratios = _ratios(medians, BASELINE_OF)
    sizes = {label: state_bytes(opt) for label, opt in optimizers.items()}
    del optimizers
    result = {
        "shapes": [list(s) for s in shapes],
        "n_params": n_params,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": budget["rounds"],
        "median_seconds": medians,
        "ratios": ratios,
        "baseline_of": BASELINE_OF,
        "state_bytes": sizes,
        "state_ratios": _ratios(sizes, BASELINE_OF),
        "speedups": {
            ours: medians[theirs] / medians[ours]
            for ours, theirs in GEOOPT_OF.items()
            if ours in medians and theirs in medians
        },
    }
    if train:
        result["train_step"] = run_train_step(train, device=device, tick=lambda: bar.update(1))
    bar.close()
    return result


def _ratios(values: dict[str, float], baseline_of: dict[str, str]) -> dict[str, float]:
    return {
        label: values[label] / values[base]
        for label, base in baseline_of.items()
        if label in values and base in values
    }


def summary_lines(result: dict) -> list[str]:
    """The ratios of a study C result, one line each (printed by ``python -m comparisons``)."""
    lines = ["study C, optimizer step on ResNet-18 conv weights (time; state bytes):"]
    for label, ratio in result["ratios"].items():
        base = result["baseline_of"][label]
        state = result.get("state_ratios", {}).get(label)
        extra = "" if state is None else f"; state {state:.2f}x"
        lines.append(f"  {label}: {ratio:.2f}x {base}{extra}")
    for ours, speedup in result.get("speedups", {}).items():
        lines.append(f"  {ours} is {speedup:.1f}x faster than {GEOOPT_OF[ours]}")
    train = result.get("train_step")
    if train:
        lines.append(f"study C, training step of vgg{tuple(train['model']['widths'])}:")
        for label, ratio in train["ratios"].items():
            lines.append(f"  {label}: {ratio:.2f}x {train['baseline_of'][label]}")
    return lines
