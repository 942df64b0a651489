"""Optimizers by name: what users and ``comparisons/`` select optimizers by.

>>> import torch
>>> opt = create("sgd", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
>>> type(opt).__name__
'SGD'
"""

from __future__ import annotations

from typing import Any

import geoopt
import torch

from .adamg import AdamG
from .sgdg import SGDG

__all__ = ["OPTIMIZERS", "create"]

#: name -> optimizer class: ours, geoopt's Riemannian SGD/Adam, torch's SGD/Adam
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgdg": SGDG,
    "adamg": AdamG,
    "rsgd": geoopt.optim.RiemannianSGD,
    "radam": geoopt.optim.RiemannianAdam,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def create(name: str, params: Any, **hyper: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``: ``OPTIMIZERS[name](params, **hyper)``.

    Raises ValueError, listing the known names, for an unknown ``name``.
    """
    try:
        cls = OPTIMIZERS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in OPTIMIZERS)
        raise ValueError(f"unknown optimizer {name!r}; known names: {known}") from None
    return cls(params, **hyper)
