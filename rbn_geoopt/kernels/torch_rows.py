r"""Fused SGD-G and Adam-G steps on G(1, n) in pure torch, batched over the rows of a matrix.

The fallback of :mod:`rbn_geoopt.kernels.dispatch` (any device, any floating dtype) and the
reference of the C kernel ``_crows.c``, which follows these formulas line by line. Each row
``y`` of a ``(rows, n)`` matrix is one point of G(1, n) (any non-zero representative); ``g``
is its Euclidean gradient. With ``yy = <y, y>``, ``yg = <y, g>``, ``gg = <g, g>``,
``r = sqrt(yy)``:

* Riemannian gradient ``h = yy g - yg y``, ``|h|_y^2 = yy gg - yg^2`` (clamped at 0);
  clipping ``c = min(1, nu / |h|_y)`` (``nu = inf``: none);
* SGD-G: ``d = gamma tau - lr c h``, ``t = |d| / r``,
  ``y <- y cos(t)/r + d sinc(t)/r``, ``tau <- d cos(t)/r - y t sin(t)/r``
  (the exact parallel transport of ``d`` along its own geodesic, at the unit new point);
* Adam-G: ``m' = b1 m + (1 - b1) c h``, ``v <- b2 v + (1 - b2) c^2 |h|_y^2`` (one scalar
  per row), ``d = a m'`` with ``a = -step_size / sqrt(v + eps)``, ``t = |d| / r``,
  ``y <- y cos(t)/r + d sinc(t)/r``, ``m <- m' cos(t)/r - y a |m'|^2 sinc(t)/r^3``
  (the exact transport of ``m'`` along ``d``, which is parallel to it).

Pass 1 computes the six dot products of ``y``, ``g`` and the momentum; every norm above is
expanded in them, so pass 2 writes the new point and the new momentum as per-row linear
combinations ``k0 y + k1 mom + k2 g`` and ``k3 y + k4 mom + k5 g``. The per-row scalars
(dot products, angles, coefficients) are computed in float64, as in C (float32 on MPS).

Half-precision tensors are computed in float32 and stored back; the float32 momentum is
then re-projected at the rounded point actually stored. Rows whose ``<y, y>`` is
zero or not finite are not points, and rows with a non-finite gradient cannot be stepped:
both are left unchanged and flagged in the returned mask (the optimizers' step guard
refuses such input before, this keeps a NaN from being written when it is bypassed).

>>> y = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
>>> g = torch.tensor([[0.0, -0.25]], dtype=torch.float64)
>>> tau = torch.zeros_like(y)
>>> bad = sgdg_rows_(y, g, tau, lr=0.5, momentum=0.9)   # d = (0, 0.5), t = 0.25
>>> torch.allclose(y, torch.tensor([[math.cos(0.25), math.sin(0.25)]], dtype=torch.float64))
True
"""

from __future__ import annotations

import math

import torch

__all__ = ["adamg_rows_", "sgdg_rows_", "sinc", "working_dtype"]

_HALF = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision, else ``dtype`` itself."""
    return torch.float32 if dtype in _HALF else dtype


def sinc(t: torch.Tensor) -> torch.Tensor:
    """``sin(t) / t`` for ``t >= 0``, 1 at 0 (series ``1 - t^2/6`` below 1e-4, as in C)."""
    small = t < 1e-4
    return torch.where(small, 1 - t * t / 6, torch.sin(t) / torch.where(small, 1, t))


def _scalar_dtype(device: torch.device) -> torch.dtype:
    """float64 for the per-row scalars (as in C), except where the device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``<a, b>`` of two ``(rows, n)`` matrices, shape ``(rows, 1)``, as scalars.

    Summed in the working dtype, then cast to the scalar dtype (float64 on most devices).
    """
    return (a * b).sum(dim=1, keepdim=True).to(_scalar_dtype(a.device))


def _clip(
    yy: torch.Tensor, yg: torch.Tensor, gg: torch.Tensor, nu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|h|_y^2, c)``: ``max(yy gg - yg^2, 0)`` and ``min(1, nu / |h|_y)``."""
    hn2 = (yy * gg - yg * yg).clamp_min(0)
    if math.isinf(nu):
        return hn2, torch.ones_like(hn2)
    hn = hn2.sqrt()
    return hn2, torch.where(hn > nu, nu / torch.where(hn > nu, hn, 1), 1)


def _step_coefficients(yy, a, p, q, r, mm2):
    """Pass-2 coefficients of a step along ``d = a mom'``, ``mom' = p y + q mom + r g``.

    ``mm2 = |mom'|^2``. Returns ``(k0, k1, k2)`` of the new point and ``(k3, k4, k5)`` of
    the transported ``mom'``; SGD-G uses ``mom' = d`` and ``a = 1``.
    """
    radius = yy.sqrt()
    t2 = a * a * mm2 / yy
    t = t2.sqrt()
    co, si = torch.cos(t), sinc(t)
    k = (
        (co + a * p * si) / radius,
        a * q * si / radius,
        a * r * si / radius,
        (p * co - a * mm2 * si / yy) / radius,
        q * co / radius,
        r * co / radius,
    )
    return k


def _as_working(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _combine(k0, k1, k2, y, mom, g):
    """``k0 y + k1 mom + k2 g`` (``mom`` may be None), the scalars cast to ``y``'s dtype."""
    k0, k1, k2 = (k.to(y.dtype) for k in (k0, k1, k2))
    out = torch.mul(y, k0)
    if mom is not None:
        out.addcmul_(mom, k1)
    return out.addcmul_(g, k2)


def _check_rows(y: torch.Tensor, **others: torch.Tensor | None) -> None:
    if y.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, n) matrix y, got shape {tuple(y.shape)}")
    for name, t in others.items():
        if t is not None and t.shape != y.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, y has {tuple(y.shape)}")


def _bad_rows(
    yy: torch.Tensor, yg: torch.Tensor, gg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bad, yy_safe)``: rows whose ``<y, y>`` is zero or not finite or whose gradient is
    not finite (``<y, g>``, ``<g, g>``), and ``yy`` with 1 there."""
    bad = ~((yy > 0) & torch.isfinite(yy) & torch.isfinite(yg) & torch.isfinite(gg))
    return bad, torch.where(bad, 1, yy)


def _keep(bad: torch.Tensor):
    """``(old, new) -> new`` with the bad rows of ``old`` kept (a full pass only if any)."""
    if not bool(bad.any()):  # one synchronization on CUDA
        return lambda old, new: new
    return lambda old, new: torch.where(bad, old, new)


def _tangent_at_stored(
    y: torch.Tensor, new_y: torch.Tensor, mom: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    """``mom``, re-projected at the point actually stored when ``y`` is half precision.

    The stored point is ``new_y`` rounded (relative error ~4e-3 in bfloat16); the float32
    momentum, tangent at ``new_y``, is projected onto the horizontal space of the stored
    point, ``mom - <ys, mom> / <ys, ys> ys``, as the straightforward path does.
    """
    if y.dtype == new_y.dtype:
        return mom
    ys = y.to(new_y.dtype)
    yy = _dot(ys, ys)
    coef = torch.where(bad, 0, _dot(ys, mom) / torch.where(bad, 1, yy))
    return mom - coef.to(mom.dtype) * ys


def sgdg_rows_(
    y: torch.Tensor,
    g: torch.Tensor,
    tau: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    nu: float = math.inf,
) -> torch.Tensor:
    """One SGD-G step on every row of ``y``, in place; returns the ``(rows, 1)`` bad-row mask.

    ``tau`` (the transported last step, same shape) is updated in place; ``tau=None`` means
    no momentum buffer (``momentum`` is then ignored). ``nu = inf`` disables clipping.
    """
    _check_rows(y, g=g, tau=tau)
    wd = working_dtype(y.dtype)
    yw, gw = _as_working(y, wd), _as_working(g, wd)
    tw = None if tau is None else _as_working(tau, wd)
    yy, yg, gg = _dot(yw, yw), _dot(yw, gw), _dot(gw, gw)
    bad, yy = _bad_rows(yy, yg, gg)
    hn2, c = _clip(yy, yg, gg, nu)
    lc = lr * c
    gamma = 0.0 if tw is None else momentum
    # d = gamma tau - lc h = (lc yg) y + gamma tau - (lc yy) g
    dd = lc * lc * yy * hn2
    if tw is not None:
        th = yy * _dot(tw, gw) - yg * _dot(tw, yw)  # <tau, h>
        dd = gamma * gamma * _dot(tw, tw) + dd - 2 * gamma * lc * th
    dd = dd.clamp_min(0)
    one = torch.ones_like(yy)
    k = _step_coefficients(yy, one, lc * yg, gamma * one, -lc * yy, dd)
    keep = _keep(bad)
    new_y = keep(yw, _combine(*k[:3], yw, tw, gw))
    new_tau = None if tau is None else _combine(*k[3:], yw, tw, gw)
    y.copy_(new_y)
    if tau is not None:
        tau.copy_(keep(tw, _tangent_at_stored(y, new_y, new_tau, bad)))
    return bad


def adamg_rows_(
    y: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    nu: float = math.inf,
) -> torch.Tensor:
    """One Adam-G step on every row of ``y``, in place; returns the ``(rows, 1)`` bad-row mask.

    ``m`` (tangent first moment, same shape as ``y``) and ``v`` (one second moment per row,
    ``rows`` elements, viewable as ``(rows, 1)``) are updated in place;
    ``step_size = lr sqrt(1 - beta2^k) / (1 - beta1^k)`` at step ``k``. The new ``v`` is
    stored in ``v``'s dtype and the stored value is the one the step uses.
    """
    _check_rows(y, g=g, m=m)
    if v.numel() != y.shape[0]:
        raise ValueError(f"v has {v.numel()} elements, expected one per row ({y.shape[0]})")
    wd = working_dtype(y.dtype)
    yw, gw, mw = _as_working(y, wd), _as_working(g, wd), _as_working(m, wd)
    v_rows = v.view(-1, 1)
    yy, yg, gg = _dot(yw, yw), _dot(yw, gw), _dot(gw, gw)
    bad, yy = _bad_rows(yy, yg, gg)
    hn2, c = _clip(yy, yg, gg, nu)
    sd = yy.dtype
    v_old = v_rows.to(sd)
    v_rows.copy_(torch.where(bad, v_old, beta2 * v_old + (1 - beta2) * c * c * hn2))
    v_new = v_rows.to(sd)  # the stored value is the one the step uses
    # m' = b1 m + (1 - b1) c h = p y + b1 m + r g
    w = (1 - beta1) * c
    mh = yy * _dot(mw, gw) - yg * _dot(mw, yw)  # <m, h>
    mm2 = beta1 * beta1 * _dot(mw, mw) + w * w * yy * hn2 + 2 * beta1 * w * mh
    mm2 = mm2.clamp_min(0)
    # when m' = 0 the step is 0 whatever a is (no 0 * inf at v + eps = 0)
    a = torch.where(mm2 > 0, -step_size / (v_new + eps).sqrt(), 0)
    k = _step_coefficients(yy, a, -w * yg, beta1 * torch.ones_like(yy), w * yy, mm2)
    keep = _keep(bad)
    new_y = keep(yw, _combine(*k[:3], yw, mw, gw))
    new_m = _combine(*k[3:], yw, mw, gw)
    y.copy_(new_y)
    m.copy_(keep(mw, _tangent_at_stored(y, new_y, new_m, bad)))
    return bad
