r"""Per-point kernels of SGD-G and Adam-G: the one place where the update formulas live.

Every function acts on one parameter tensor ``y`` holding many points of a geoopt manifold
(the trailing ``manifold.ndim`` dimensions form one point) and only calls the manifold's
``egrad2rgrad``, ``norm``, ``inner``, ``retr`` and ``retr_transp``. A later multi-tensor or
fused fast path replaces these functions and is compared against them.

With ``g`` the Euclidean gradient, ``h = egrad2rgrad(y, g)`` and ``|.|_y`` the manifold norm
(Cho & Lee 2017, Algorithm 1 and Adam-G; DESIGN.md section 3):

* clipping: ``h^ = h * min(1, nu / |h|_y)`` per point;
* SGD-G:  ``d = gamma * tau - lr * h^``, ``y <- retr(y, d)``, ``tau <- transp(d)``;
* Adam-G: ``m <- b1 m + (1 - b1) h^``, ``v <- b2 v + (1 - b2) |h^|_y^2`` (one scalar per
  point), ``d = -lr sqrt(1 - b2^t) / (1 - b1^t) * m / sqrt(v + eps)``,
  ``y <- retr(y, d)``, ``m <- transp(m)``;
* orthogonality: the gradient of ``omega / 2 * ||Yh Yh^T - I||_F^2`` with respect to ``y``
  through the normalization ``Yh = y / |y|`` (rows are the unit points of one weight).
"""

from __future__ import annotations

import math

import geoopt
import torch
from geoopt.manifolds.base import Manifold

from ..manifold import Grassmann1

__all__ = [
    "LOW_PRECISION",
    "adamg_point_step",
    "base_manifold",
    "clip_per_point",
    "is_euclidean",
    "is_grassmann1",
    "orthogonality_egrad",
    "point_shape",
    "riemannian_grad",
    "sgdg_point_step",
    "working_dtype",
    "zero_point_index",
]

#: parameter dtypes whose manifold math runs in float32 (and whose state is kept in float32)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the manifold math runs in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def base_manifold(manifold: Manifold) -> Manifold:
    """``manifold`` with any ``geoopt.Scaled`` wrappers removed."""
    while isinstance(manifold, geoopt.Scaled):
        manifold = manifold.base
    return manifold


def is_grassmann1(manifold: Manifold) -> bool:
    """True for ``Grassmann1`` and ``Scaled(Grassmann1(...))``."""
    return isinstance(base_manifold(manifold), Grassmann1)


def is_euclidean(manifold: Manifold) -> bool:
    """True for ``geoopt.Euclidean`` (any ``ndim``): such parameters follow torch's rules."""
    return isinstance(manifold, geoopt.Euclidean)


def point_shape(shape: torch.Size, manifold: Manifold) -> tuple[int, ...]:
    """Shape of a per-point scalar with the point dims kept: ``(*batch, 1, ..., 1)``.

    >>> point_shape(torch.Size([16, 3, 3, 3]), Grassmann1(ndim=3))
    (16, 1, 1, 1)
    """
    ndim = manifold.ndim or 0
    return tuple(shape[: len(shape) - ndim]) + (1,) * ndim


def _rows(y: torch.Tensor, ndim: int) -> torch.Tensor:
    """``y`` as a matrix: one point per row (batch indices flattened)."""
    return y.reshape(-1, math.prod(y.shape[y.dim() - ndim :]))


def zero_point_index(y: torch.Tensor, ndim: int) -> int | None:
    """Flat row index of the first zero-vector point of ``y``, or None when there is none."""
    zero = (_rows(y, ndim) == 0).all(dim=1)
    if not bool(zero.any()):
        return None
    return int(zero.nonzero()[0, 0])


def orthogonality_egrad(y: torch.Tensor, ndim: int, omega: float) -> torch.Tensor:
    r"""Euclidean gradient of ``omega / 2 * ||Yh Yh^T - I||_F^2`` with respect to ``y``.

    The rows of ``Yh`` are the unit points ``y_i / |y_i|`` of ``y`` (all batch indices
    flattened into rows, each point flattened into a row). With
    ``G = 2 omega (Yh Yh^T Yh - Yh)`` (the gradient with respect to ``Yh``) the chain rule
    through the normalization gives, per row, ``(G_i - <G_i, yh_i> yh_i) / |y_i|``: scale
    invariant, and equal to the paper's ``2 omega (Y Y^T Y - Y)`` up to its radial part at
    unit rows.

    >>> y = torch.eye(3, dtype=torch.float64)
    >>> orthogonality_egrad(y, 1, 0.1).abs().max().item()
    0.0
    """
    rows = _rows(y, ndim)
    radius = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    yh = rows / radius
    g_yh = (2.0 * omega) * ((yh @ yh.transpose(0, 1)) @ yh - yh)
    g_y = (g_yh - (g_yh * yh).sum(dim=1, keepdim=True) * yh) / radius
    return g_y.reshape(y.shape)


def riemannian_grad(
    manifold: Manifold,
    y: torch.Tensor,
    grad: torch.Tensor,
    *,
    weight_decay: float = 0.0,
    omega: float = 0.0,
) -> torch.Tensor:
    """``h = egrad2rgrad(y, grad + weight_decay * y + orthogonality_egrad(y))``.

    ``grad`` is not modified. ``omega`` only makes sense on ``Grassmann1`` (the optimizers
    refuse it elsewhere); ``weight_decay`` is refused on ``Grassmann1`` by the optimizers.
    """
    g = grad
    if weight_decay != 0:
        g = g.add(y, alpha=weight_decay)
    if omega != 0:
        g = g + orthogonality_egrad(y, manifold.ndim, omega)
    return manifold.egrad2rgrad(y, g)


def clip_per_point(
    manifold: Manifold, y: torch.Tensor, h: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """``h * min(1, max_norm / |h|_y)`` per point, ``|.|_y`` the manifold norm.

    A point whose norm is at most ``max_norm`` (zero included) is left unchanged.

    >>> m = geoopt.Sphere()
    >>> y = torch.tensor([[1.0, 0.0]]); h = torch.tensor([[0.0, 3.0]])
    >>> clip_per_point(m, y, h, 0.5)
    tensor([[0.0000, 0.5000]])
    """
    norm = manifold.norm(y, h, keepdim=True)
    scale = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
    return h * scale


def sgdg_point_step(
    manifold: Manifold,
    y: torch.Tensor,
    h: torch.Tensor,
    tau: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SGD-G step: ``d = momentum * tau - lr * h``; returns ``(retr(y, d), transp(d))``.

    ``tau = None`` is the zero momentum of the first step. With ``momentum == 0`` no
    momentum is carried and the second result is None. A step that is exactly zero
    (``lr == 0`` without momentum) returns ``y`` itself, so ``lr = 0`` changes no bit.
    """
    if tau is None or momentum == 0:
        if lr == 0:  # a zero step leaves the point bit-identical (as torch's SGD does)
            return y, (None if momentum == 0 else torch.zeros_like(h))
        d = h * (-lr)
    else:
        d = torch.add(tau * momentum, h, alpha=-lr)
    if momentum == 0:
        return manifold.retr(y, d), None
    return manifold.retr_transp(y, d, d)


def adamg_point_step(
    manifold: Manifold,
    y: torch.Tensor,
    h: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam-G step at step number ``step`` (1 for the first).

    Updates ``exp_avg`` (m, tangent) and ``exp_avg_sq`` (v, one scalar per point, keepdim
    shape) in place and returns ``(retr(y, d), transp(m))`` with
    ``d = -lr * sqrt(1 - beta2^step) / (1 - beta1^step) * m / sqrt(v + eps)``; with
    ``lr == 0`` it returns ``(y, exp_avg)`` themselves (the moments still update).
    """
    exp_avg.mul_(beta1).add_(h, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(manifold.inner(y, h, keepdim=True), alpha=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    if step_size == 0:  # lr = 0: the point stays bit-identical, m is not moved
        return y, exp_avg
    d = exp_avg * (-step_size) / (exp_avg_sq + eps).sqrt()
    return manifold.retr_transp(y, d, exp_avg)
