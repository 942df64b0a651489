r"""The fused SGD-G and Adam-G row steps in pure torch: the twin of the C kernel ``_crows.c``.

Used for every tensor the C kernel does not take (CUDA and other devices, half precision,
strided views, or no compiler at install) and as the reference the C kernel follows line
by line. Each row ``y`` of a ``(rows, n)`` matrix is one point of G(1, n) (any non-zero
representative), ``g`` its Euclidean gradient, ``mom`` its momentum (SGD-G's ``tau``,
Adam-G's ``m``). With ``yy = <y, y>``, ``yg = <y, g>``, ``gg = <g, g>``, ``my = <mom, y>``,
``r = sqrt(yy)`` (docs/design.md, "The optimizers SGD-G and Adam-G"):

* Riemannian gradient ``h = yy g - yg y``, ``|h|_y^2 = yy gg - yg^2`` (clamped at 0);
  clipping ``c = min(1, nu / |h|_y)`` (``nu = inf``: none);
* the momentum is made horizontal first: ``mom_h = mom - (my / yy) y``;
* SGD-G: ``d = gamma tau_h - lr c h``, ``t = |d| / r``,
  ``y <- y cos(t) + d sinc(t)``, ``tau <- d cos(t) - y t sin(t)``
  (the exact parallel transport of ``d`` along its own geodesic);
* Adam-G: ``m' = b1 m_h + (1 - b1) c h``, ``v <- b2 v + (1 - b2) c^2 |h|_y^2`` (one scalar
  per row), ``d = a m'`` with ``a = -step_size / sqrt(v + eps)``, ``t = |d| / r``,
  ``y <- y cos(t) + d sinc(t)``, ``m <- m' cos(t) - y a |m'|^2 sinc(t) / r^2``.

The new point keeps the norm of the old one, and the momentum is its lift there; a row
whose ``<y, y>`` is 1 to within ``snap(dtype)`` and that moves is written at norm exactly 1,
so that rounding does not accumulate on unit rows; a zero step leaves a row bit-identical.
Pass 1 computes the dot products; every norm above is expanded in them, so pass 2 writes
the new point and momentum as per-row linear combinations ``k0 y + k1 mom + k2 g`` and
``k3 y + k4 mom + k5 g``. The per-row scalars are float64 (float32 on MPS). Half-precision
tensors are computed in float32 and stored back; the float32 momentum is then re-projected
at the rounded point actually stored.

The optimizers' step guard has refused zero, non-finite and out-of-range rows before this
runs; a row whose ``<y, y>`` is not positive and finite or whose gradient is not finite is
still left unchanged and flagged in the returned mask, so that no NaN is ever written.

>>> y = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
>>> g = torch.tensor([[0.0, -0.125]], dtype=torch.float64)
>>> tau = torch.zeros_like(y)
>>> bad = sgdg_rows_(y, g, tau, lr=0.5, momentum=0.9)  # h = <y,y> g, d = (0, 0.25), t = 0.125
>>> torch.allclose(y, 2 * torch.tensor([[math.cos(0.125), math.sin(0.125)]], dtype=torch.float64))
True
"""

from __future__ import annotations

import functools
import math

import torch

from ...manifold import sinc

__all__ = ["adamg_rows_", "sgdg_rows_", "snap"]

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def snap(dtype: torch.dtype) -> float:
    """Tolerance on ``|<y, y> - 1|`` under which a row is written back at norm 1:
    ``sqrt(eps)`` of the parameter's dtype (float32: 3.5e-4, float64: 1.5e-8)."""
    return math.sqrt(torch.finfo(dtype).eps)


def _scalar_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``<a, b>``, shape ``(rows, 1)``: summed in the working dtype, then cast to
    the per-row scalar dtype (the guard keeps every such sum finite)."""
    return (a * b).sum(dim=1, keepdim=True).to(_scalar_dtype(a.device))


def _clip(yy, yg, gg, nu: float):
    """``(|h|_y^2, c)``: ``max(yy gg - yg^2, 0)`` and ``min(1, nu / |h|_y)``."""
    hn2 = (yy * gg - yg * yg).clamp_min(0)
    if math.isinf(nu):
        return hn2, torch.ones_like(hn2)
    hn = hn2.sqrt()
    return hn2, torch.where(hn > nu, nu / torch.where(hn > nu, hn, 1), 1)


def _step_coefficients(yy, a, p, q, r, mm2, tol: float):
    """Pass-2 coefficients of a step along ``d = a mom'``, ``mom' = p y + q mom + r g``,
    ``mm2 = |mom'|^2``: ``(k0, k1, k2)`` of the new point, ``(k3, k4, k5)`` of ``mom'``
    transported (SGD-G: ``mom' = d``, ``a = 1``)."""
    t = (a * a * mm2 / yy).sqrt()
    co, si = torch.cos(t), sinc(t)
    s = torch.where((t > 0) & ((yy - 1).abs() <= tol), yy.rsqrt(), 1)
    return (
        (co + a * p * si) * s,
        a * q * si * s,
        a * r * si * s,
        (p * co - a * mm2 * si / yy) * s,
        q * co * s,
        r * co * s,
    )


def _combine(k0, k1, k2, y, mom, g):
    """``k0 y + k1 mom + k2 g`` (``mom`` may be None), the scalars cast to ``y``'s dtype."""
    out = torch.mul(y, k0.to(y.dtype))
    if mom is not None:
        out.addcmul_(mom, k1.to(y.dtype))
    return out.addcmul_(g, k2.to(y.dtype))


def _row_dots(y, g, mom):
    """``(yy, yg, gg, mm, my, mg, bad)`` with ``yy`` set to 1 on bad rows."""
    yy, yg, gg = _dot(y, y), _dot(y, g), _dot(g, g)
    bad = ~((yy > 0) & torch.isfinite(yy) & torch.isfinite(yg) & torch.isfinite(gg))
    yy = torch.where(bad, 1, yy)
    if mom is None:
        zero = torch.zeros_like(yy)
        return yy, yg, gg, zero, zero, zero, bad
    return yy, yg, gg, _dot(mom, mom), _dot(mom, y), _dot(mom, g), bad


def _store(y, new_y, mom, new_mom, bad) -> None:
    """Write the new point and momentum (bad rows keep their old values). A half-precision
    ``y`` stores a rounded point; the float32 momentum is projected onto its horizontal
    space, ``mom - <ys, mom> / <ys, ys> ys``, so that it stays tangent."""
    keep = bool(bad.any())
    y.copy_(torch.where(bad, y, new_y) if keep else new_y)
    if mom is None:
        return
    if y.dtype != new_y.dtype:
        ys = y.to(new_y.dtype)
        coef = _dot(ys, new_mom) / torch.where(bad, 1, _dot(ys, ys))
        new_mom = new_mom - coef.to(new_mom.dtype) * ys
    mom.copy_(torch.where(bad, mom, new_mom) if keep else new_mom)


def _working(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype in _HALF else t


def sgdg_rows_(y, g, tau, *, lr: float, momentum: float, nu: float = math.inf) -> torch.Tensor:
    """One SGD-G step on every row of ``y`` (and ``tau``, None without momentum), in place;
    returns the ``(rows, 1)`` mask of rows left unchanged (module docstring)."""
    yw, gw, tw = _working(y), _working(g), _working(tau)
    yy, yg, gg, mm, my, mg, bad = _row_dots(yw, gw, tw)
    hn2, c = _clip(yy, yg, gg, nu)
    lc = lr * c
    gamma = 0.0 if tau is None else momentum
    pm = my / yy  # radial part of tau, removed: tau_h = tau - pm y
    th = yy * mg - yg * my  # <tau, h> = <tau_h, h>
    dd = gamma * gamma * (mm - my * pm).clamp_min(0) + lc * lc * yy * hn2 - 2 * gamma * lc * th
    one = torch.ones_like(yy)
    k = _step_coefficients(
        yy, one, lc * yg - gamma * pm, gamma * one, -lc * yy, dd.clamp_min(0), snap(y.dtype)
    )
    new_y = _combine(*k[:3], yw, tw, gw)
    new_tau = None if tau is None else _combine(*k[3:], yw, tw, gw)
    _store(y, new_y, tau, new_tau, bad)
    return bad


def adamg_rows_(
    y, g, m, v, *, step_size: float, beta1: float, beta2: float, eps: float, nu: float = math.inf
) -> torch.Tensor:
    """One Adam-G step on every row of ``y``, ``m`` and ``v`` (one second moment per row,
    ``rows`` elements), in place; returns the mask of rows left unchanged.
    ``step_size = lr sqrt(1 - beta2^k) / (1 - beta1^k)`` at step ``k``. The new ``v`` is
    stored in ``v``'s dtype and the stored value is the one the step uses."""
    yw, gw, mw = _working(y), _working(g), _working(m)
    yy, yg, gg, mm, my, mg, bad = _row_dots(yw, gw, mw)
    hn2, c = _clip(yy, yg, gg, nu)
    v_rows = v.view(-1, 1)
    v_old = v_rows.to(yy.dtype)
    v_rows.copy_(torch.where(bad, v_old, beta2 * v_old + (1 - beta2) * c * c * hn2))
    v_new = v_rows.to(yy.dtype)
    w = (1 - beta1) * c
    pm = my / yy  # radial part of m, removed
    mh = yy * mg - yg * my  # <m, h> = <m_h, h>
    mm2 = beta1 * beta1 * (mm - my * pm).clamp_min(0) + w * w * yy * hn2 + 2 * beta1 * w * mh
    mm2 = mm2.clamp_min(0)
    a = torch.where(mm2 > 0, -step_size / (v_new + eps).sqrt(), 0)
    k = _step_coefficients(
        yy, a, -w * yg - beta1 * pm, beta1 * torch.ones_like(yy), w * yy, mm2, snap(y.dtype)
    )
    _store(y, _combine(*k[:3], yw, mw, gw), m, _combine(*k[3:], yw, mw, gw), bad)
    return bad
