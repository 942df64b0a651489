r"""Angular-update diagnostics: how far each optimizer step turns each weight.

For a scale-invariant weight (one feeding a BatchNorm) only the direction matters, so the
natural measure of a step is the angle it turns the weight by (see ``docs/design.md``,
*Angular-update diagnostics*). Per point, with ``a`` the point before and ``b`` after a
step, ``ah = a / |a|``, ``bh = b / |b|`` and ``s = sign(<a, b>)`` (``+1`` at 0):

================  ==============================================  ==========
line (G(1, n))    ``2 atan2(|ah - s bh|, |ah + s bh|)``            [0, pi/2]
vector (sphere)   ``2 atan2(|ah - bh|, |ah + bh|)``                [0, pi]
effective lr      ``lr / |a|^2`` (plain weights: the rate SGD turns ``ah`` at)
================  ==============================================  ==========

The half-angle form is exact to a few ulps everywhere (no ``acos`` of a rounded cosine,
which loses half the digits near 0 and pi), gives exactly 0 for identical points, and is
computed in float64 on points pre-scaled by a power of two (exact), so very small or very
large representatives neither underflow nor overflow.

* :func:`point_angles` -- the angle per point between two tensors;
* :class:`AngleMonitor` -- per parameter and per param group of any optimizer, the angle
  one step turns each point: ``with monitor.track(): optimizer.step()``.

>>> import math, torch
>>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
>>> b = torch.tensor([[1.0, 1.0], [0.0, -5.0]], dtype=torch.float64)
>>> [round(math.degrees(t), 6) for t in point_angles(a, b).tolist()]
[45.0, 180.0]
>>> [round(math.degrees(t), 6) for t in point_angles(a, b, lines=True).tolist()]
[45.0, 0.0]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from geoopt import Scaled, Sphere

from .manifold import Grassmann1

__all__ = ["AngleMonitor", "point_angles"]


def _unscaled(manifold: Any) -> Any:
    while isinstance(manifold, Scaled):
        manifold = manifold.base
    return manifold


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _pow2_scaled(x: torch.Tensor) -> torch.Tensor:
    """``x / 2^e`` per row with ``2^e`` near the row's largest entry (exact, no rounding)."""
    top = x.abs().amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top) & (top > 0), top, torch.ones_like(top))
    return x * torch.ldexp(torch.ones_like(top), -torch.frexp(top).exponent)


def point_angles(
    before: torch.Tensor, after: torch.Tensor, *, ndim: int = 1, lines: bool = False
) -> torch.Tensor:
    """Angle (radians) between corresponding points of ``before`` and ``after``.

    The trailing ``ndim`` dimensions form one point (``ndim = 0``: every entry is a point;
    ``ndim = before.dim()``: the whole tensor is one point). ``lines=True`` gives the angle
    between the lines ``[a]`` and ``[b]`` of G(1, n), in ``[0, pi/2]`` (``a`` and ``-a``
    are the same point); otherwise the angle between the vectors, in ``[0, pi]``. Both are
    invariant under ``a -> k a``, ``b -> k' b`` (``k, k' > 0``; any sign with ``lines``).
    The result has the batch shape ``before.shape[:dim - ndim]``, in float64 (float32 on
    MPS); it is NaN where a point is zero or not finite (no angle is defined there).

    >>> import torch
    >>> y = torch.randn(3, 5, dtype=torch.float64)
    >>> point_angles(y, -2 * y, lines=True).abs().max().item()
    0.0
    >>> point_angles(torch.zeros(2, 3), torch.ones(2, 3)).tolist()
    [nan, nan]
    """
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        raise TypeError(
            f"point_angles: before and after must be tensors, got {type(before).__name__} "
            f"and {type(after).__name__}"
        )
    if before.shape != after.shape:
        raise ValueError(
            f"point_angles: before has shape {tuple(before.shape)} but after has shape "
            f"{tuple(after.shape)}"
        )
    if isinstance(ndim, bool) or not isinstance(ndim, int) or not 0 <= ndim <= before.dim():
        raise ValueError(
            f"point_angles: ndim must be an int in [0, {before.dim()}] for a tensor of shape "
            f"{tuple(before.shape)}, got {ndim!r}"
        )
    if before.is_complex() or after.is_complex():
        raise TypeError("point_angles: complex tensors have no real angle")
    batch = before.shape[: before.dim() - ndim]
    dtype = _work_dtype(before)
    with torch.no_grad():
        a = _pow2_scaled(before.detach().reshape(*batch, -1).to(dtype))
        b = _pow2_scaled(after.detach().reshape(*batch, -1).to(a.device, dtype))
        na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
        ah, bh = a / na, b / nb
        if lines:
            bh = torch.where((ah * bh).sum(-1, keepdim=True) < 0, -bh, bh)
        diff = torch.linalg.vector_norm(ah - bh, dim=-1)
        total = torch.linalg.vector_norm(ah + bh, dim=-1)
        theta = 2.0 * torch.atan2(diff, total)
        if lines:  # |ah - s bh| <= |ah + s bh| up to rounding: keep [0, pi/2] exactly
            theta = theta.clamp(max=math.pi / 2)
        na, nb = na.squeeze(-1), nb.squeeze(-1)
        defined = torch.isfinite(na) & torch.isfinite(nb) & (na > 0) & (nb > 0)
        return torch.where(defined, theta, torch.full_like(theta, math.nan))


def _kind(param: torch.Tensor, group: dict) -> tuple[str, Any]:
    """``("grassmann" | "sphere" | "plain", layout)`` of a parameter in its group: the
    ``Grassmann1`` (whose ``point_view`` lays out the points, blocks of rows included) or
    the number of trailing dims that form one point."""
    manifold = _unscaled(getattr(param, "manifold", None) or group.get("manifold"))
    if isinstance(manifold, Grassmann1):
        return "grassmann", manifold
    if isinstance(manifold, Sphere):
        return "sphere", manifold.ndim
    return "plain", param.dim() - 1 if param.dim() >= 2 else param.dim()


def _lr(group: dict) -> float:
    lr = group.get("lr", math.nan)
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else math.nan


def _summary(values: torch.Tensor) -> torch.Tensor:
    """``[sum, max, count]`` over the non-NaN entries (max is -inf when there are none)."""
    valid = ~torch.isnan(values)
    count = valid.sum().to(values.dtype)
    total = torch.where(valid, values, 0).sum()
    top = torch.where(valid, values, -math.inf).amax() if values.numel() else -math.inf
    return torch.stack([total, torch.as_tensor(top, dtype=values.dtype), count])


class AngleMonitor:
    """Per parameter and per param group, the angle one optimizer step turns each point.

    Works with any object that has ``param_groups`` (``SGDG``, ``AdamG``, torch's and
    geoopt's optimizers). What a "point" is follows the parameter:

    * ``Grassmann1`` (the parameter's or the group's ``manifold``, ``Scaled`` included):
      each point of G(1, n), angle between the lines, in ``[0, pi/2]``;
    * geoopt ``Sphere`` / ``SphereExact``: each point, angle between the vectors;
    * any other parameter ("plain"): each row ``w[i]`` (the whole tensor when it has fewer
      than 2 dimensions), angle between the vectors in ``[0, pi]``; also the angle of the
      whole tensor and the effective learning rate ``lr / |w[i]|^2`` (norm before the
      step): the rate at which SGD moves a scale-invariant row's direction.

    ``after()`` returns (angles in radians; means and maxima over the points where an angle
    is defined, i.e. not zero, NaN when there is none)::

        {"params": {name: {"kind", "group", "points", "mean", "max", "whole",
                           "effective_lr"}},   # whole, effective_lr: None unless plain
         "groups": [{"params": [names], "lr", "points", "mean", "max"}, ...]}

    one ``groups`` entry per param group, in order. Names come from ``params`` (e.g.
    ``model.named_parameters()``, which also restricts the monitor to those tensors), else
    from a group's ``param_names``, else ``"group<g>.param<i>"``. Nothing is kept and
    nothing runs between steps that are not tracked; tracking copies the tracked tensors
    once (``before``) and never changes a parameter, gradient or optimizer state.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> monitor = AngleMonitor(opt, {"w": w})
    >>> w.grad = torch.tensor([[0.0, -3.0], [1.0, 0.0]])   # turns row 0 by 45 degrees
    >>> with monitor.track() as report:
    ...     opt.step()
    >>> stats = report["params"]["w"]
    >>> round(stats["max"], 6), stats["points"], round(stats["effective_lr"], 6)
    (0.785398, 2, 0.180556)
    >>> report["groups"][0]["params"]
    ['w']
    """

    def __init__(
        self,
        optimizer: Any,
        params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        if not isinstance(getattr(optimizer, "param_groups", None), list):
            raise TypeError(
                "AngleMonitor: optimizer must have a list of param_groups (a torch, geoopt "
                f"or rbn_geoopt optimizer), got {type(optimizer).__name__}"
            )
        self._optimizer = optimizer
        self._names: dict[int, str] | None = None
        if params is not None:
            items = list(params.items() if isinstance(params, Mapping) else params)
            self._names = {}
            for i, item in enumerate(items):
                if (
                    not isinstance(item, tuple)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not isinstance(item[1], torch.Tensor)
                ):
                    raise TypeError(
                        f"AngleMonitor: params entry {i} must be a (name, tensor) pair, got "
                        f"{type(item).__name__}"
                    )
                name, tensor = item
                if id(tensor) in self._names:
                    raise ValueError(
                        f"AngleMonitor: parameter {name!r} is the same tensor as "
                        f"{self._names[id(tensor)]!r}"
                    )
                if name in self._names.values():
                    raise ValueError(f"AngleMonitor: two parameters are named {name!r}")
                self._names[id(tensor)] = name
        self._snapshot: list[tuple] | None = None
        self._group_lrs: list[float] = []
        self._entries()  # validate now: unknown or complex parameters are refused here

    def _entries(self) -> list[tuple[str, torch.Tensor, int, str, int, float]]:
        """``(name, param, group index, kind, ndim, lr)`` of every tracked parameter."""
        entries, found = [], set()
        for g, group in enumerate(self._optimizer.param_groups):
            names = group.get("param_names")
            params = list(group["params"])
            if names is not None and len(names) != len(params):
                names = None
            for i, p in enumerate(params):
                if self._names is not None:
                    if id(p) not in self._names:
                        continue
                    name = self._names[id(p)]
                    found.add(id(p))
                else:
                    name = names[i] if names is not None else f"group{g}.param{i}"
                if p.is_complex():
                    raise TypeError(f"AngleMonitor: parameter {name!r} is complex: no angle")
                entries.append((name, p, g, *_kind(p, group), _lr(group)))
        if self._names is not None and len(found) != len(self._names):
            missing = [n for k, n in self._names.items() if k not in found]
            raise ValueError(
                f"AngleMonitor: parameter(s) {', '.join(map(repr, missing))} are in no "
                "param group of the optimizer"
            )
        return entries

    def before(self) -> None:
        """Snapshot the tracked parameters (and each group's current ``lr``)."""
        with torch.no_grad():
            self._snapshot = [(*e, e[1].detach().clone()) for e in self._entries()]
        self._group_lrs = [_lr(group) for group in self._optimizer.param_groups]

    def after(self) -> dict[str, Any]:
        """The angles from the snapshot of :meth:`before` to the parameters now."""
        if self._snapshot is None:
            raise RuntimeError("AngleMonitor.after() needs a snapshot: call before() first")
        snapshot, self._snapshot = self._snapshot, None
        rows: list[torch.Tensor] = []
        with torch.no_grad():
            for name, p, _, kind, ndim, lr, old in snapshot:
                new = p.detach()
                if new.shape != old.shape:
                    raise ValueError(
                        f"AngleMonitor: parameter {name!r} changed shape during the step, "
                        f"{tuple(old.shape)} -> {tuple(new.shape)}"
                    )
                if kind == "grassmann":  # ndim: the manifold, see _kind
                    angles = point_angles(ndim.point_view(old), ndim.point_view(new), lines=True)
                else:
                    angles = point_angles(old, new, ndim=ndim)
                stats = [_summary(angles.reshape(-1))]
                if kind == "plain":
                    whole = point_angles(old, new, ndim=old.dim()).reshape(1)
                    dtype = _work_dtype(old)
                    sq = torch.linalg.vector_norm(
                        old.reshape(angles.numel(), -1).to(dtype), dim=-1
                    ).square()
                    eff = torch.where((sq > 0) & torch.isfinite(sq), lr / sq, math.nan)
                    stats += [whole, _summary(eff)]
                rows.append(torch.cat(stats).cpu())
        values = [r.tolist() for r in rows]
        return self._report(snapshot, values)

    def _report(self, snapshot: list[tuple], values: list[list[float]]) -> dict[str, Any]:
        def mean(total: float, count: float) -> float:
            return total / count if count else math.nan

        groups = [
            {"params": [], "lr": lr, "points": 0, "_sum": 0.0, "max": -math.inf}
            for lr in self._group_lrs
        ]
        params = {}
        for (name, _, g, kind, *_), v in zip(snapshot, values, strict=True):
            total, top, count = v[:3]
            params[name] = {
                "kind": kind,
                "group": g,
                "points": int(count),
                "mean": mean(total, count),
                "max": top if count else math.nan,
                "whole": v[3] if kind == "plain" else None,
                "effective_lr": mean(v[4], v[6]) if kind == "plain" else None,
            }
            group = groups[g]
            group["params"].append(name)
            group["points"] += int(count)
            group["_sum"] += total
            group["max"] = max(group["max"], top)
        for group in groups:
            total = group.pop("_sum")
            group["mean"] = mean(total, group["points"])
            if not group["points"]:
                group["max"] = math.nan
        return {"params": params, "groups": groups}

    @contextlib.contextmanager
    def track(self, enabled: bool = True) -> Iterator[dict[str, Any]]:
        """``with monitor.track() as report: optimizer.step()`` fills ``report`` with
        :meth:`after`'s result on exit. ``enabled=False`` (e.g. ``step % 100 != 0``) does
        nothing at all and leaves ``report`` empty; an exception in the block drops the
        snapshot and fills nothing."""
        report: dict[str, Any] = {}
        if not enabled:
            yield report
            return
        self.before()
        try:
            yield report
        except BaseException:
            self._snapshot = None
            raise
        report.update(self.after())
