r"""The orthogonality term of Cho & Lee (2017): its value and its gradient, in one place.

For one weight whose points are the rows ``y_i`` of ``Y`` (batch indices flattened into
rows, each point flattened into a row) and ``Yh`` the matrix of unit rows
``y_i / |y_i|``::

    L_O(omega, Y) = omega / 2 * ||Yh Yh^T - I||_F^2

It is scale invariant in every row, so it is a function on G(1, n)^p. With
``G = 2 omega (Yh Yh^T Yh - Yh)``, its gradient with respect to ``Yh``, the chain rule
through the normalisation gives the Euclidean gradient with respect to ``y_i``::

    dL_O / dy_i = (G_i - <G_i, yh_i> yh_i) / |y_i|

which is horizontal, and equal to the paper's ``2 omega (Y Y^T Y - Y)`` up to its radial
part at unit rows. :func:`orthogonality_penalty` (the value, differentiable, for a loss or
a log) and the optimizers' ``omega`` (which adds :func:`orthogonality_egrad` to the
gradient) therefore give the same step. See ``docs/design.md``, "Orthogonality".
"""

from __future__ import annotations

import math

import torch

__all__ = ["orthogonality_egrad", "orthogonality_value", "point_rows"]


def point_rows(y: torch.Tensor, ndim: int) -> torch.Tensor:
    """``y`` as a matrix with one point per row: the trailing ``ndim`` dims flattened.

    >>> point_rows(torch.zeros(16, 3, 3, 3), 3).shape
    torch.Size([16, 27])
    """
    return y.reshape(-1, math.prod(y.shape[y.dim() - ndim :]))


def _unit_rows(y: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = point_rows(y, ndim)
    radius = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / radius, radius


def orthogonality_value(y: torch.Tensor, ndim: int, omega: float) -> torch.Tensor:
    """``omega / 2 * ||Yh Yh^T - I||_F^2`` for one weight ``y`` (differentiable).

    >>> y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    >>> round(orthogonality_value(y, 1, 1.0).item(), 6)  # 2 * cos(45 deg)^2 / 2
    0.5
    """
    yh, _ = _unit_rows(y, ndim)
    gram = yh @ yh.transpose(0, 1)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * omega * (gram - eye).square().sum()


def orthogonality_egrad(y: torch.Tensor, ndim: int, omega: float) -> torch.Tensor:
    r"""Euclidean gradient of :func:`orthogonality_value` with respect to ``y`` (module
    docstring): per row ``(G_i - <G_i, yh_i> yh_i) / |y_i|``, ``G = 2 omega (Yh Yh^T Yh - Yh)``.

    >>> y = torch.eye(3, dtype=torch.float64)
    >>> orthogonality_egrad(y, 1, 0.1).abs().max().item()
    0.0
    """
    yh, radius = _unit_rows(y, ndim)
    g_yh = (2.0 * omega) * ((yh @ yh.transpose(0, 1)) @ yh - yh)
    g_y = (g_yh - (g_yh * yh).sum(dim=1, keepdim=True) * yh) / radius
    return g_y.reshape(y.shape)
