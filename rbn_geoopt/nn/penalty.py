"""The orthogonality regularizer as a loss term.

``L_O = omega / 2 * sum_W ||Yh Yh^T - I||_F^2`` over the model's ``Grassmann1`` weights
``W``, where the rows of ``Yh`` are the unit points ``y_i / |y_i|`` of ``W`` (batch indices
flattened into rows, each point flattened into a row). It is the term whose gradient the
optimizers add for ``omega`` (at unit rows, ``2 omega (Y Y^T Y - Y)`` projected on the
tangent space; rows of other norms give the same value and the same step), so it is the
value to log -- or to add to the loss yourself with the optimizer's ``omega=0``, which gives
the same step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..manifold import grassmann1_of, is_grassmann1
from ..optim._distributed import is_dtensor
from ..orthogonality import orthogonality_value

__all__ = ["orthogonality_penalty"]


def orthogonality_penalty(
    model_or_params: nn.Module | torch.Tensor | Iterable[torch.Tensor], omega: float = 0.1
) -> torch.Tensor:
    """``omega / 2 * sum ||Yh Yh^T - I||_F^2`` over the Grassmann1 weights, differentiable.

    ``model_or_params``: a module (its parameters), one tensor or an iterable of tensors;
    tensors that are not on ``Grassmann1`` are skipped (a model without any gives 0).
    It is computed on the normalised rows ``y_i / |y_i|``, so it is scale invariant in each
    row and the same for any representative: unit rows (the paper) or the non-unit rows of a
    converted trained model, whose norms the optimizers keep. Rows must be non-zero.

    >>> import geoopt
    >>> from rbn_geoopt import Grassmann1
    >>> y = geoopt.ManifoldParameter(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), manifold=Grassmann1())
    >>> round(orthogonality_penalty([y], omega=1.0).item(), 6)  # 2 * cos(45deg)^2 / 2
    0.5
    """
    if isinstance(omega, bool) or not isinstance(omega, numbers.Real):
        raise TypeError(f"orthogonality_penalty: omega must be a real number, got {omega!r}")
    if not math.isfinite(omega) or omega < 0:
        raise ValueError(f"orthogonality_penalty: omega must be finite and >= 0, got {omega!r}")
    if isinstance(model_or_params, nn.Module):
        params = list(model_or_params.parameters())
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    elif isinstance(model_or_params, Iterable):
        params = list(model_or_params)
    else:
        raise TypeError(
            "orthogonality_penalty: expected a module, a tensor or an iterable of tensors, "
            f"got {type(model_or_params).__name__}"
        )
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"orthogonality_penalty: expected tensors, got {type(p).__name__}")
    terms = []
    for p in params:
        if not is_grassmann1(p):
            if is_dtensor(p):
                raise TypeError(
                    "orthogonality_penalty: a DTensor parameter (FSDP2 fully_shard) has lost "
                    "its ManifoldParameter class, so its manifold is unknown here; give the "
                    "manifold per param group to SGDG/AdamG and use their omega, which "
                    "gathers the full weight"
                )
            continue
        terms.append(orthogonality_value(grassmann1_of(p).point_view(p), 1, 1.0))
    if not terms:
        like = params[0] if params else torch.zeros(())
        return torch.zeros((), dtype=like.dtype, device=like.device)
    return omega * torch.stack(terms).sum()
