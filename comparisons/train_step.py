"""Study C, part 2: the cost of one whole training step of a BN-CNN, recipe vs torch.

One step is ``zero_grad(set_to_none=True)``, forward, cross-entropy, backward and
``step()`` on one fixed batch of random 28x28 one-channel images and random labels, for the
VGG-style BN-CNN of study A (``models.VGGNet``; the GPU check, :mod:`.bench_gpu`, times
the ImageNet ``models.ResNet18`` on 224x224 images instead). Every method trains its own
deep copy of one initialized model (same initial weights):

* ``SGD (foreach)``: torch ``SGD(lr 0.01, momentum 0.9, nesterov, weight_decay 5e-4,
  foreach=True)`` on every parameter;
* ``SGD-G (paper recipe)``: ``rbn_geoopt.nn.to_grassmann`` then
  ``rbn_geoopt.nn.paper_optimizer(model, "sgdg", foreach=True)`` with the library's
  defaults (``foreach`` as for the baseline; so also its
  forward through the converted weights and its non-G groups);
* ``Adam (foreach)``: torch ``Adam(lr 1e-3, foreach=True)``;
* ``Adam-G (paper recipe)``: as SGD-G with ``paper_optimizer(model, "adamg")``.

The methods are timed interleaved (:mod:`.timing`); the median step time of each recipe is
divided by its torch baseline's (``TRAIN_BASELINE_OF``).

Example::

    result = run_train_step({"widths": (4, 8, 8, 8), "batch": 16, "warmup": 1, "rounds": 2})
    result["ratios"]["SGD-G (paper recipe)"]  # training-step time / torch SGD's
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import build_model
from .timing import interleaved

__all__ = ["TRAIN_BASELINE_OF", "TRAIN_LABELS", "run_train_step"]

#: recipe label -> the torch baseline its training-step time is divided by
TRAIN_BASELINE_OF = {
    "SGD-G (paper recipe)": "SGD (foreach)",
    "Adam-G (paper recipe)": "Adam (foreach)",
}
TRAIN_LABELS = ("SGD (foreach)", "SGD-G (paper recipe)", "Adam (foreach)", "Adam-G (paper recipe)")


def _optimizer(label: str, model: nn.Module) -> torch.optim.Optimizer:
    """``label``'s optimizer for ``model`` (converted to G(1, n) in place for the recipes)."""
    from rbn_geoopt.nn import paper_optimizer, to_grassmann

    if label == "SGD (foreach)":
        return torch.optim.SGD(
            model.parameters(),
            lr=0.01,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            foreach=True,
        )
    if label == "Adam (foreach)":
        return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    to_grassmann(model)
    method = "sgdg" if label.startswith("SGD-G") else "adamg"
    return paper_optimizer(model, method, foreach=True)


def _step_fn(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def run_train_step(
    budget: dict,
    labels: tuple[str, ...] = TRAIN_LABELS,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tick: Callable[[], object] | None = None,
) -> dict:
    """Interleaved training-step timing; ``budget``: ``batch``, ``warmup``, ``rounds`` and
    either ``widths`` (study A's VGG on 1x28x28 images, 10 classes) or ``model`` (a
    :func:`.models.build_model` spec) with ``image`` (C, H, W) and ``classes``. Returns
    median seconds per method and the recipe / torch ratios."""
    device = torch.device(device)
    spec = dict(budget.get("model") or {"name": "vgg", "widths": tuple(budget["widths"])})
    base = build_model(spec, seed).to(device).train()
    image = tuple(budget.get("image", (1, 28, 28)))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(budget["batch"], *image, generator=gen).to(device)
    y = torch.randint(0, budget.get("classes", 10), (budget["batch"],), generator=gen).to(device)
    steps = {}
    for label in labels:
        model = copy.deepcopy(base)
        steps[label] = _step_fn(model, _optimizer(label, model), x, y)
    times = interleaved(steps, budget["warmup"], budget["rounds"], device, tick)
    medians = {label: statistics.median(t) for label, t in times.items()}
    ratios = {
        label: medians[label] / medians[b]
        for label, b in TRAIN_BASELINE_OF.items()
        if label in medians and b in medians
    }
    return {
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
        "n_params": sum(p.numel() for p in base.parameters()),
        "batch": budget["batch"],
        "rounds": budget["rounds"],
        "median_seconds": medians,
        "ratios": ratios,
        "baseline_of": TRAIN_BASELINE_OF,
    }
