r"""What the single-tensor paths of SGD-G and Adam-G share: the clipped Riemannian
gradient, the norm-keeping write-back, the store of a half-precision point.

The single-tensor path composes a manifold's own operators (``egrad2rgrad``, ``norm``,
``proju``, ``retr_transp``), so it steps every geoopt manifold; on G(1,n) it is the
reference that the fused kernels are tested against (docs/design.md, "The optimizers
SGD-G and Adam-G").
"""

from __future__ import annotations

import math

import torch
from geoopt.manifolds.base import Manifold

from ..manifold import grassmann1_of
from ._fused.torch_twin import snap

__all__ = ["clip_per_point", "clipped_rgrad", "keep_norm", "store", "working"]

_HALF = (torch.float16, torch.bfloat16)


def working(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a float32 copy when it is half precision."""
    return t.float() if t.dtype in _HALF else t


def clip_per_point(
    manifold: Manifold, y: torch.Tensor, h: torch.Tensor, max_norm: float
) -> torch.Tensor:
    """``h * min(1, max_norm / |h|_y)`` per point, ``|.|_y`` the manifold norm.

    >>> import geoopt
    >>> y = torch.tensor([[1.0, 0.0]]); h = torch.tensor([[0.0, 3.0]])
    >>> clip_per_point(geoopt.Sphere(), y, h, 0.5)
    tensor([[0.0000, 0.5000]])
    """
    norm = manifold.norm(y, h, keepdim=True)
    factor = torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))
    base = grassmann1_of(manifold)
    return h * (factor if base is None else base.per_entry(factor, tuple(h.shape)))


def clipped_rgrad(
    manifold: Manifold,
    y: torch.Tensor,
    grad: torch.Tensor,
    weight_decay: float,
    grad_clip: float | None,
) -> torch.Tensor:
    """``h^ = clip(egrad2rgrad(y, grad + weight_decay * y))`` (``grad`` is not modified)."""
    g = working(grad)
    if weight_decay != 0:
        g = g.add(y, alpha=weight_decay)
    h = manifold.egrad2rgrad(y, g)
    if grad_clip is not None and not math.isinf(grad_clip):
        h = clip_per_point(manifold, y, h, grad_clip)
    return h


def _point_norm(base, t: torch.Tensor) -> torch.Tensor:
    """``|t|`` per point of ``base`` (a Grassmann1), shaped ``base.point_shape``."""
    norm = torch.linalg.vector_norm(base.point_view(t), dim=1)
    return norm.reshape(base.point_shape(tuple(t.shape)))


def keep_norm(
    manifold: Manifold,
    y: torch.Tensor,
    d: torch.Tensor,
    new_y: torch.Tensor,
    new_tangent: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """On G(1,n), the step's result at the norm of ``y`` (``retr`` returns unit points):
    ``new_y * s`` and ``new_tangent * s`` with ``s = |y|``, or ``s = 1`` when ``<y, y>`` is 1
    to within ``snap(dtype)`` and the point moved; a point with ``d = 0`` stays ``y`` bit
    for bit. Other manifolds: unchanged."""
    base = grassmann1_of(manifold)
    if base is None:
        return new_y, new_tangent
    r = _point_norm(base, y)
    moved = _point_norm(base, d) > 0
    s = torch.where(moved & ((r * r - 1).abs() <= snap(dtype)), 1, r)
    s, moved = base.per_entry(s, tuple(y.shape)), base.per_entry(moved, tuple(y.shape))
    new_y = torch.where(moved, new_y * s, y)
    return new_y, None if new_tangent is None else new_tangent * s


def store(
    manifold: Manifold, param: torch.Tensor, new_y: torch.Tensor, tangent: torch.Tensor | None
) -> torch.Tensor | None:
    """``param <- new_y``; returns ``tangent`` re-projected at the point actually stored.

    A half-precision parameter stores a rounded ``new_y`` (relative error ~4e-3 in
    bfloat16); the float32 state transported to the unrounded point would then be off the
    tangent space of the stored one by as much, so it is projected there.
    """
    param.copy_(new_y)
    if tangent is None or param.dtype == new_y.dtype:
        return tangent
    return manifold.proju(working(param), tangent)
