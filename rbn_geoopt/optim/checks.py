r"""The step guard: refuse a step whose inputs would silently produce NaN parameters.

Before a step changes anything, SGDG and AdamG check, in one pass over the gradients:

* every gradient is finite (plain parameters too);
* every G(1,n) point ``y_i`` is a non-zero vector with ``|y_i| <= L`` and its gradient is
  small enough that the float math cannot overflow: the Riemannian gradient satisfies
  ``|h_i| <= 2 |y_i|^2 |g_i|``, so ``|g_i| |y_i|^2 <= L`` keeps its square finite, with
  ``L = sqrt(max) / 4`` (``max`` the working dtype's largest value: ``L`` ~ 4.6e18 in
  float32, 3.4e153 in float64);
* points of other geoopt manifolds are finite.

A G(1,n) parameter that this optimizer stepped last and nobody has modified since (its
autograd version counter is the one recorded after that step: ``StepItem.trusted``) holds
the unit points that step wrote, so only its gradient is read: the norm of the whole
gradient bounds every ``|g_i|`` and ``|y_i| = 1`` up to rounding. That keeps the guard at one
read of the gradients; the first step, and any step after the parameter was changed in
place (``stabilize``, a user's ``mul_``), checks the points again. On CPU that read is one
C sweep per gradient (:func:`rbn_geoopt.kernels.dispatch.sum_squares`: its squared norm
and whether it is finite, at memory speed), also for plain parameters and other manifolds;
elsewhere torch reductions, read after one synchronization per device.

A failure raises before any parameter or state is touched: :class:`NonFiniteGradientError`
(a ``ValueError``) for a gradient, ``ValueError`` for a point, naming the parameter (and the
row). ``torch.amp.GradScaler`` skips steps with Inf/NaN gradients before the optimizer sees
them, so mixed-precision training with a scaler never reaches this error. For DTensor (FSDP2)
parameters each rank checks its shard and the verdict is reduced over the device mesh, so
all ranks raise together.

>>> import geoopt
>>> from rbn_geoopt import Grassmann1
>>> from rbn_geoopt.optim import SGDG
>>> w = geoopt.ManifoldParameter(torch.randn(2, 3), manifold=Grassmann1())
>>> opt = SGDG([("fc.weight", w)], lr=0.1)
>>> w.grad = torch.full((2, 3), float("nan"))
>>> opt.step()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rbn_geoopt.optim.checks.NonFiniteGradientError: SGDG: the gradient of parameter 'fc.weight' ...
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from geoopt.manifolds.base import Manifold

from ..kernels.dispatch import c_enabled, sum_squares
from .distributed import is_dtensor, local, reduce_max
from .groups import param_label
from .kernels import is_euclidean, is_grassmann1, working_dtype, zero_point_index

__all__ = ["NonFiniteGradientError", "StepItem", "check_step_inputs"]

# verdict codes, reduced with MAX across ranks
_OK, _BAD_GRAD, _BAD_POINT = 0, 1, 2


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN/Inf (or values so large that the step would overflow).

    Raised by ``step`` before anything changes: catch it to skip the batch, or train with
    ``torch.amp.GradScaler``, which skips such steps itself.
    """


@dataclass
class StepItem:
    """One parameter with a gradient, as the step sees it."""

    group: dict[str, Any]
    group_index: int
    param_index: int
    param: torch.Tensor
    grad: torch.Tensor
    manifold: Manifold
    trusted: bool = False  # holds the unit points of this optimizer's last step

    @property
    def label(self) -> str:
        return param_label(self.group, self.group_index, self.param_index)


def _rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, math.prod(t.shape[t.dim() - ndim :]))


@functools.cache
def _limit(dtype: torch.dtype) -> float:
    """Bound on ``|y|`` and on ``|g| |y|^2`` per point (see the module docstring)."""
    return math.sqrt(torch.finfo(working_dtype(dtype)).max) / 4


def _finite(t: torch.Tensor, fast_ok: bool) -> float | torch.Tensor:
    """0 when ``t`` is finite, else NaN (a host float from the C sweep, or a 0-dim tensor)."""
    fast = sum_squares(t, enabled=fast_ok)
    if fast is not None:
        return 0.0 if fast[1] else math.nan
    return t.abs().amax() * 0


def _norm(t: torch.Tensor, fast_ok: bool) -> float | torch.Tensor:
    """``|t|`` (NaN/Inf when ``t`` is not finite or the square overflows)."""
    fast = sum_squares(t, enabled=fast_ok)
    if fast is not None:
        return math.sqrt(fast[0]) if fast[1] else math.nan
    return torch.linalg.vector_norm(t, dtype=working_dtype(t.dtype))


def _measures(item: StepItem, fast_ok: bool) -> list[float | torch.Tensor]:
    """Numbers the verdict needs: host floats, or 0-dim tensors read after one sync.

    G(1,n): ``[min_i |y_i|, max_i |y_i|, max_i |g_i| |y_i|^2]``, or ``[|g|]`` when
    ``item.trusted``; other manifolds: ``[0 or NaN, 0 or NaN]`` (point, gradient finite);
    Euclidean: ``[0 or NaN]``. Empty shards give ``[]``. On CPU the gradient-only
    measures are one C sweep (:func:`rbn_geoopt.kernels.dispatch.sum_squares`).
    """
    grad, y = local(item.grad), local(item.param)
    if grad.numel() == 0:
        return []
    if is_euclidean(item.manifold):
        return [_finite(grad, fast_ok)]
    if item.trusted:
        return [_norm(grad, fast_ok)]
    if not is_grassmann1(item.manifold):
        return [_finite(y, fast_ok), _finite(grad, fast_ok)]
    ndim, dtype = item.manifold.ndim, working_dtype(y.dtype)
    rn = torch.linalg.vector_norm(_rows(y, ndim), dim=1, dtype=dtype)
    gn = torch.linalg.vector_norm(_rows(grad, ndim), dim=1, dtype=dtype)
    low, high = torch.aminmax(rn)
    return [low, high, (gn * rn * rn).amax()]


def _verdict(item: StepItem, values: list[float]) -> int:
    """The code of ``item`` from its measures (NaN fails every comparison)."""
    if not values:
        return _OK
    if is_euclidean(item.manifold):
        return _OK if math.isfinite(values[0]) else _BAD_GRAD
    if not is_grassmann1(item.manifold):
        point, grad = values
        if not math.isfinite(point):
            return _BAD_POINT
        return _OK if math.isfinite(grad) else _BAD_GRAD
    limit = _limit(item.param.dtype)
    if item.trusted:  # unit points: |g_i| |y_i|^2 <= |g| (1 + rounding)
        return _OK if values[0] <= limit / 2 else _BAD_GRAD
    low, high, product = values
    if not (low > 0 and high <= limit):
        return _BAD_POINT
    return _OK if product <= limit else _BAD_GRAD


def _local_verdict(items: list[StepItem]) -> list[tuple[int, StepItem]]:
    """Failing ``(code, item)`` pairs on this rank (empty when all pass): one sync per device."""
    fast_ok = c_enabled()
    measures = [_measures(item, fast_ok) for item in items]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for values in measures:
        for value in values:
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, []).append(value)
    host = {device: iter(torch.stack(vals).tolist()) for device, vals in by_device.items()}
    failed = []
    for item, values in zip(items, measures, strict=True):
        numbers = [next(host[v.device]) if isinstance(v, torch.Tensor) else v for v in values]
        code = _verdict(item, numbers)
        if code != _OK:
            failed.append((code, item))
    return failed


def _point_message(optimizer: str, item: StepItem) -> str:
    y = local(item.param)
    where = " of this rank's shard" if is_dtensor(item.param) else ""
    if not is_grassmann1(item.manifold):
        return (
            f"{optimizer}: {item.label} holds NaN/Inf values: a point of {item.manifold.name} "
            "must be finite; nothing was stepped"
        )
    row = zero_point_index(y, item.manifold.ndim)
    if row is not None:
        return (
            f"{optimizer}: {item.label} holds a zero vector at row {row}{where}: "
            "a point of G(1,n) must be a non-zero vector; nothing was stepped"
        )
    rows = _rows(y, item.manifold.ndim)
    norms = torch.linalg.vector_norm(rows, dim=1, dtype=working_dtype(y.dtype))
    limit = _limit(y.dtype)
    bad = (~(norms <= limit)).nonzero()
    row = int(bad[0, 0]) if len(bad) else 0
    return (
        f"{optimizer}: {item.label} holds a NaN/Inf vector, or one too long to step "
        f"(norm > {limit:.2g}), at row {row}{where}: a point of G(1,n) must be a finite "
        "non-zero vector; nothing was stepped"
    )


def _grad_message(optimizer: str, item: StepItem) -> str:
    grad = local(item.grad)
    what = "NaN/Inf values" if not bool(torch.isfinite(grad).all()) else "values so large"
    tail = "" if what.startswith("NaN") else " that the step would overflow"
    return (
        f"{optimizer}: the gradient of {item.label} holds {what}{tail}; no parameter or "
        "state was changed. Skip this batch (catch NonFiniteGradientError), lower the "
        "learning rate, or use torch.amp.GradScaler, which skips such steps"
    )


def check_step_inputs(optimizer: str, items: list[StepItem]) -> None:
    """Raise (see the module docstring) unless every gradient and point can be stepped."""
    failed = _local_verdict(items)
    code = max((c for c, _ in failed), default=_OK)
    code = reduce_max(code, [item.param for item in items])
    if code == _OK:
        return
    mine = [item for c, item in failed if c == code]
    if code == _BAD_POINT:
        if mine:
            raise ValueError(_point_message(optimizer, mine[0]))
        raise ValueError(f"{optimizer}: a point on another rank is zero or non-finite")
    if mine:
        raise NonFiniteGradientError(_grad_message(optimizer, mine[0]))
    raise NonFiniteGradientError(
        f"{optimizer}: a gradient shard on another rank holds NaN/Inf values; no parameter "
        "or state was changed"
    )
