r"""The step guard: no step starts unless every parameter of it can be stepped.

Before a step of SGDG or AdamG changes anything, one read of every gradient and every
point of G(1,n) decides (docs/design.md, "Reliability contract"):

* G(1,n) parameters: every row ``y`` of the point, with its gradient row ``g``, must satisfy
  ``tiny^(1/4) <= |y| <= sqrt(max) / 4``, ``|g| <= sqrt(max) / 4`` and
  ``|g| |y|^2 <= sqrt(max) / 4`` (``tiny``, ``max``: the working dtype's; float32 rows from
  3.3e-10 to 4.6e18, float64 from 1.2e-77 to 3.4e153), which keeps every dot product and
  coefficient of the step finite and normal (the Riemannian gradient has
  ``|h| <= 2 |y|^2 |g|``). On CPU this is one C sweep over the rows of all float32/float64
  G(1,n) tensors (``_fused.check_rows``), elsewhere torch reductions;
* other geoopt manifolds: point and gradient finite; plain parameters: gradient finite.

Nothing is remembered from one step to the next: the same guarantee holds whatever way a
point was changed in between (an in-place write, ``.data``, numpy). A failure raises
before any parameter or state is touched: :class:`NonFiniteGradientError` (a
``ValueError``) for a gradient, ``ValueError`` for a point, naming the parameter, the row
and the cause. ``torch.amp.GradScaler`` skips steps with Inf/NaN gradients before the
optimizer sees them. For DTensor (FSDP2) parameters each rank checks its shard and the
verdict is reduced over the device mesh, so all ranks raise together.

>>> import geoopt
>>> from rbn_geoopt import Grassmann1
>>> from rbn_geoopt.optim import SGDG
>>> w = geoopt.ManifoldParameter(torch.randn(2, 3), manifold=Grassmann1())
>>> opt = SGDG([("fc.weight", w)], lr=0.1)
>>> w.grad = torch.full((2, 3), float("nan"))
>>> opt.step()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rbn_geoopt.optim.NonFiniteGradientError: SGDG: the gradient of parameter 'fc.weight' ...
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from geoopt.manifolds.base import Manifold

from ..manifold import grassmann1_of
from . import _fused
from ._distributed import is_dtensor, reduce_max
from ._validate import param_label

__all__ = ["GRASSMANN", "OTHER", "PLAIN", "Item", "NonFiniteGradientError", "check_step"]

# verdict codes, reduced with MAX across ranks
_OK, _BAD_GRAD, _BAD_POINT = 0, 1, 2


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN/Inf (or values so large that the step would overflow).

    Raised by ``step`` before anything changes: catch it to skip the batch, or train with
    ``torch.amp.GradScaler``, which skips such steps itself.
    """


#: what a step does with a parameter: torch's rule, the G(1,n) rule, another manifold's
PLAIN, GRASSMANN, OTHER = 0, 1, 2


class Item(NamedTuple):
    """One parameter with a gradient, as a step sees it: ``point`` and ``grad`` are the
    rank-local tensors the step reads and writes (a DTensor's shard; for a geoopt
    ``ManifoldParameter``, a plain ``detach()`` alias: same storage and version counter,
    without the subclass's slower attribute reads), ``kind`` one of PLAIN / GRASSMANN /
    OTHER, ``index`` its place in the group (for error messages), ``sharded`` whether the
    parameter is a DTensor (its state is sharded like it)."""

    param: torch.Tensor
    point: torch.Tensor
    grad: torch.Tensor
    manifold: Manifold
    kind: int
    index: int
    sharded: bool


def check_step(
    optimizer: str,
    work: list[tuple[int, dict[str, Any], list[Item], list[Item]]],
    choice: str,
) -> None:
    """Raise (module docstring) unless every item of ``work`` (``(group index, group,
    plain items, manifold items)`` per group) can be stepped; ``choice`` is
    ``_fused.backend()``."""
    ys, gs, ns, where_rows, finite = [], [], [], [], []
    dtensors = False
    for gi, group, plain, curved in work:
        for item in plain + curved:
            if item.point.is_meta:  # (a meta DTensor's shard is on the meta device too)
                raise ValueError(
                    f"{optimizer}: {param_label(group, gi, item.index)} is on the meta device: "
                    "it holds no values to step; materialize the model first "
                    "(model.to_empty(device=...), then initialize its weights)"
                )
            dtensors = dtensors or item.sharded
            if item.kind == GRASSMANN:
                ys.append(item.point)
                gs.append(item.grad)
                # row length of the (points, n) view
                ns.append(grassmann1_of(item.manifold).point_size(item.point.shape))
                where_rows.append((gi, group, item))
            elif item.kind == PLAIN:
                finite.append(((gi, group, item), (item.grad,)))
            else:
                finite.append(((gi, group, item), (item.point, item.grad)))
    failed = []  # (code, where, row)
    if ys:
        verdicts = _fused.check_rows(ys, gs, ns, choice)
        for where, (point, grad) in zip(where_rows, verdicts, strict=True):
            if point >= 0:
                failed.append((_BAD_POINT, where, point))
            elif grad >= 0:
                failed.append((_BAD_GRAD, where, grad))
    if finite:
        failed += _finite_verdicts(finite, choice)
    code = max((f[0] for f in failed), default=_OK) if failed else _OK
    if dtensors:
        params = [item.param for _, _, plain, curved in work for item in plain + curved]
        code = reduce_max(code, [p for p in params if is_dtensor(p)])
    if code != _OK:
        _raise(optimizer, code, [f for f in failed if f[0] == code])


def _finite_verdicts(finite, choice: str) -> list[tuple[int, Any, int]]:
    """Failures among non-G(1,n) items: a non-finite point (_BAD_POINT) or gradient."""
    failed, pending = [], []
    for where, tensors in finite:
        for k, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            fast = _fused.sum_squares(t, choice)
            if fast is not None:
                if not fast[1]:
                    failed.append((_code(k, len(tensors)), where, -1))
            else:
                pending.append((where, k, len(tensors), torch.isfinite(t).all()))
    by_device: dict[torch.device, list] = {}
    for entry in pending:
        by_device.setdefault(entry[3].device, []).append(entry)
    for entries in by_device.values():
        for (where, k, count, _), ok in zip(
            entries, torch.stack([e[3] for e in entries]).tolist(), strict=True
        ):
            if not ok:
                failed.append((_code(k, count), where, -1))
    return failed


def _code(k: int, count: int) -> int:
    """Tensor ``k`` of ``(point, grad)`` or ``(grad,)``: which verdict it fails."""
    return _BAD_GRAD if k == count - 1 else _BAD_POINT


def _raise(optimizer: str, code: int, mine: list) -> None:
    if not mine:  # another rank failed
        if code == _BAD_POINT:
            raise ValueError(
                f"{optimizer}: a point on another rank cannot be stepped; nothing was stepped"
            )
        raise NonFiniteGradientError(
            f"{optimizer}: a gradient shard on another rank holds NaN/Inf values; no parameter "
            "or state was changed"
        )
    _, (gi, group, item), row = mine[0]
    label = param_label(group, gi, item.index)
    shard = " of this rank's shard" if is_dtensor(item.param) else ""
    if code == _BAD_POINT:
        raise ValueError(_point_message(optimizer, label, item, row, shard))
    raise NonFiniteGradientError(_grad_message(optimizer, label, item, row, shard))


def _robust_norm(row: torch.Tensor) -> float:
    """``|row|`` without overflow or underflow (scaled by its largest entry), in float64."""
    row = row.double()
    scale = row.abs().max()
    return 0.0 if scale == 0 else float(scale * torch.linalg.vector_norm(row / scale))


def _point_message(optimizer: str, label: str, item: Item, row: int, shard: str) -> str:
    y = item.point
    if row < 0:  # another manifold: the whole point
        return (
            f"{optimizer}: {label} holds NaN/Inf values: a point of {item.manifold.name} must "
            "be finite; nothing was stepped"
        )
    base = grassmann1_of(item.manifold)
    values = base.point_view(y)[row]
    lo2, hi2, _ = _fused.limits(y.dtype)
    low, high = lo2**0.5, hi2**0.5
    if not bool(torch.isfinite(values).all()):
        cause = "holds a NaN/Inf vector"
    else:
        norm = _robust_norm(values)
        if norm == 0:
            cause = "holds a zero vector"
        elif norm < low:
            cause = f"holds a vector of norm {norm:.3g}, below the smallest a step supports"
        else:
            cause = f"holds a vector of norm {norm:.3g}, above the largest a step supports"
    return (
        f"{optimizer}: {label} {cause} at {base.point_label(row, tuple(y.shape))}{shard}: "
        "a point of G(1,n) must be a "
        f"finite vector with norm in [{low:.2g}, {high:.2g}] ({y.dtype}); nothing was stepped"
    )


def _grad_message(optimizer: str, label: str, item: Item, row: int, shard: str) -> str:
    grad = item.grad
    if row < 0:
        values, at = grad, ""
    else:
        base = grassmann1_of(item.manifold)
        values = base.point_view(grad)[row]
        at = f" ({base.point_label(row, tuple(grad.shape))}{shard})"
    if bool(torch.isfinite(values).all()):
        what = "values so large that the step would overflow"
    else:
        what = "NaN/Inf values"
    return (
        f"{optimizer}: the gradient of {label} holds {what}{at}; no parameter or state was "
        "changed. Skip this batch (catch NonFiniteGradientError), lower the learning rate, "
        "or use torch.amp.GradScaler, which skips such steps"
    )
