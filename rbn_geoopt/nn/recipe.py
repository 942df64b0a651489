"""Cho & Lee's training recipe as one optimizer and one LR scheduler.

Param groups (every value overridable):

* G(1, n) weights (``ManifoldParameter`` on ``Grassmann1``, e.g. from ``to_grassmann``):
  SGD-G with ``lr_g = 0.2``, momentum 0.9 -- or Adam-G with ``lr_g = 0.05``,
  ``betas = (0.9, 0.99)``, ``eps = 1e-8`` -- both with ``grad_clip = 0.1`` (nu) and
  ``omega = 0.1`` (orthogonality), no weight decay;
* every other weight: Nesterov SGD (``euclidean="sgd"``), ``lr = 0.01``, momentum 0.9,
  ``weight_decay = 5e-4``;
* normalization-layer parameters (BatchNorm gamma/beta ...) and every bias: the same SGD
  with ``norm_bias_weight_decay = 0``: the paper's code puts parameters whose name contains
  ``'bn'`` or ``'bias'`` in a group with ``--bnDecay`` (default 0).

The G(1, n) rule runs on each row's unit representative (``lr_g``, ``grad_clip`` and
``omega`` mean the same for a row of any norm) and writes the row back at its own norm: rows
that start unit stay unit, as in the paper, and the rows of a trained model converted by
``to_grassmann`` keep their lengths, so fine-tuning starts from the model's own outputs.

Schedule: every learning rate times 0.2 at 30 %, 60 % and 80 % of training (epochs 60, 120,
160 of 200 in the paper): :func:`paper_scheduler`, one ``MultiStepLR`` on the one optimizer.

>>> import torch.nn as nn
>>> from rbn_geoopt.nn import to_grassmann
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
>>> _ = to_grassmann(net)
>>> opt = paper_optimizer(net, "adamg")
>>> [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
[(0.05, 0.0, 1), (0.01, 0.0005, 1), (0.01, 0.0, 4)]
>>> paper_scheduler(opt, 200).milestones
Counter({60: 1, 120: 1, 160: 1})
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..optim import SGDG, AdamG
from .dataflow import is_grassmann1

__all__ = ["paper_optimizer", "paper_param_groups", "paper_scheduler"]

METHODS = {"sgdg": SGDG, "adamg": AdamG}
#: the paper's G(1, n) learning rate for each method
LR_G = {"sgdg": 0.2, "adamg": 0.05}

_NORM_LAYERS = tuple(
    getattr(nn, name)
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "GroupNorm",
        "LayerNorm",
        "RMSNorm",
    )
    if hasattr(nn, name)
)


def _norm_or_bias(model: nn.Module) -> set[int]:
    """ids of normalization-layer parameters and of every parameter named ``bias``."""
    found = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, _NORM_LAYERS):
                found.add(id(param))
    return found


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"paper recipe: {name} must be a finite real number, got {value!r}")
    if value < 0:
        raise ValueError(f"paper recipe: {name} must be >= 0, got {value!r}")
    return value


def paper_param_groups(
    model: nn.Module,
    method: str = "sgdg",
    *,
    lr_g: float | None = None,
    momentum_g: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    grad_clip: float | None = 0.1,
    omega: float = 0.1,
    lr: float = 0.01,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    norm_bias_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The paper's param groups for ``model`` (see the module docstring), empty groups left out.

    ``method``: ``"sgdg"`` or ``"adamg"`` (the rule for the G(1, n) weights). ``lr_g``
    defaults to 0.2 / 0.05; ``momentum_g`` (default 0.9) is SGD-G's, ``betas`` (default
    ``(0.9, 0.99)``) and ``eps`` (default ``1e-8``) are Adam-G's: giving one to the other
    method is a ValueError. Each group carries ``param_names``. Convert the model first:
    a warning says when it has no Grassmann1 parameter.

    >>> from rbn_geoopt.nn import to_grassmann
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    >>> to_grassmann(net)
    ['1.weight']
    >>> [g["param_names"] for g in paper_param_groups(net)]
    [['1.weight'], ['1.bias', '2.weight', '2.bias']]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"paper recipe: expected an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"paper recipe: method must be one of {sorted(METHODS)}, got {method!r}")
    if method == "sgdg" and (betas is not None or eps is not None):
        raise ValueError("paper recipe: betas and eps are Adam-G's; method='sgdg' uses momentum_g")
    if method == "adamg" and momentum_g is not None:
        raise ValueError("paper recipe: momentum_g is SGD-G's; method='adamg' uses betas and eps")
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("omega", omega)):
        _real(name, value)
    _real("norm_bias_weight_decay", norm_bias_weight_decay)
    geometric: dict[str, Any] = {
        "lr": LR_G[method] if lr_g is None else _real("lr_g", lr_g),
        "weight_decay": 0.0,
        "grad_clip": grad_clip,
        "omega": omega,
    }
    if method == "sgdg":
        geometric.update(momentum=0.9 if momentum_g is None else momentum_g, nesterov=False)
    else:
        geometric.update(betas=(0.9, 0.99) if betas is None else betas)
        geometric.update(eps=1e-8 if eps is None else eps)
    plain = {
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "dampening": 0.0,
        "euclidean": "sgd",
        "grad_clip": None,
        "omega": 0.0,
    }
    no_decay = _norm_or_bias(model)
    buckets: list[tuple[dict[str, Any], list]] = [
        (geometric, []),
        ({**plain, "weight_decay": weight_decay}, []),
        ({**plain, "weight_decay": norm_bias_weight_decay}, []),
    ]
    for name, param in model.named_parameters():
        if is_grassmann1(param):
            bucket = buckets[0][1]
        elif id(param) in no_decay:
            bucket = buckets[2][1]
        else:
            bucket = buckets[1][1]
        bucket.append((name, param))
    if not buckets[0][1]:
        warnings.warn(
            f"paper recipe: {type(model).__name__} has no Grassmann1 parameter; "
            "call rbn_geoopt.nn.to_grassmann(model) first",
            stacklevel=2,
        )
    return [
        {
            **hyper,
            "params": [p for _, p in named],
            "param_names": [n for n, _ in named],
        }
        for hyper, named in buckets
        if named
    ]


def paper_optimizer(
    model: nn.Module, method: str = "sgdg", *, foreach: bool | None = None, **overrides: Any
) -> SGDG | AdamG:
    """One optimizer (``SGDG`` or ``AdamG``) over :func:`paper_param_groups`.

    ``overrides``: any keyword of :func:`paper_param_groups`. ``foreach``: the optimizer's
    (torch's multi-tensor path for the plain parameters when True; ``False`` also turns
    the fused G(1,n) kernels off, see :class:`~rbn_geoopt.optim.SGDG`).

    >>> from rbn_geoopt.nn import to_grassmann
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> _ = to_grassmann(net)
    >>> opt = paper_optimizer(net, "sgdg", lr_g=0.1)
    >>> type(opt).__name__, opt.param_groups[0]["lr"], opt.param_groups[0]["omega"]
    ('SGDG', 0.1, 0.1)
    """
    groups = paper_param_groups(model, method, **overrides)
    return METHODS[method](groups, lr=overrides.get("lr", 0.01), foreach=foreach)


def paper_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    *,
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8),
    gamma: float = 0.2,
) -> torch.optim.lr_scheduler.MultiStepLR:
    """``MultiStepLR`` multiplying every group's lr by ``gamma`` at the given fractions.

    ``total``: the number of ``scheduler.step()`` calls in training (epochs when stepped
    once per epoch). ``round(f * total)`` must give distinct steps >= 1.

    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sorted(paper_scheduler(opt, 10).milestones)
    [3, 6, 8]
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"paper_scheduler: total must be an int >= 1, got {total!r}")
    fractions = list(milestones)
    if not all(isinstance(f, numbers.Real) and 0 < f < 1 for f in fractions):
        raise ValueError(
            f"paper_scheduler: milestones must be fractions in (0, 1), got {fractions}"
        )
    steps = [round(f * total) for f in fractions]
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps[:-1], steps[1:], strict=True)):
        raise ValueError(
            f"paper_scheduler: milestones {fractions} of total={total} give steps {steps}; "
            "they must be increasing and >= 1 (use a larger total)"
        )
    _real("gamma", gamma)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
