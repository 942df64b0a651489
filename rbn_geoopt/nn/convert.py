"""Move a model's scale-invariant weights onto G(1, n), in place, keeping its outputs.

Each chosen weight ``W`` (``p`` rows of length ``n``) becomes
``geoopt.ManifoldParameter(W, manifold=Grassmann1(ndim=W.dim() - 1))`` when its rows are
scale invariant one by one (BatchNorm), or ``Grassmann1Blocks(points)`` when they are
invariant in ``points`` blocks of consecutive rows (``Finding.points``: GroupNorm,
LayerNorm over the channels): the SAME values
(same dtype, device, memory layout and ``requires_grad``), every row kept as it is. Nothing
else is touched -- no bias, no BatchNorm running statistic -- so the model computes exactly
the same outputs, bit for bit, in train and eval mode, whatever the layers' ``eps``.
``Grassmann1`` takes any non-zero row as a representative of its line, and SGD-G / Adam-G
step each point keeping its norm (docs/design.md, "Settled choices" (a)): rows that start
unit stay unit (the paper), the rows of a trained model keep their trained lengths.

A point (a row, or a block of rows) is converted only if the optimizers can step it: its
norm (computed in float64, scaled by its largest entry, so it neither overflows nor
underflows) must lie in the range of the step guard, :func:`rbn_geoopt.optim._fused.limits`
(float32: 3.3e-10 to 4.6e18, float64: 1.2e-77 to 3.4e153); otherwise ``to_grassmann``
raises ValueError naming the weight, the point and its norm before anything changes.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> to_grassmann(net)
['0.weight']
>>> type(net[0].weight).__name__, type(net[0].weight.manifold).__name__, net[0].weight.manifold.ndim
('ManifoldParameter', 'Grassmann1', 3)
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Iterable
from typing import Any

import geoopt
import torch
import torch.nn as nn

from ..manifold import Grassmann1, Grassmann1Blocks
from ..optim._fused import limits
from ._trace import UntraceableModelError
from .dataflow import Finding, Plan, _manifold_name, analyse, is_grassmann1

__all__ = ["to_grassmann"]

_ROW_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _names(value: Iterable[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise TypeError(f"to_grassmann: {what} must be a list of parameter names, not a str")
    names = list(value)
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"to_grassmann: {what} must hold parameter names, got {n!r}")
    return names


def _canonical(model: nn.Module, names: list[str], what: str) -> list[str]:
    """Map aliases of tied parameters to their ``named_parameters()`` name; refuse unknowns."""
    first: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
    lookup = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    out = []
    for n in names:
        if n not in lookup:
            close = difflib.get_close_matches(n, list(lookup), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"to_grassmann: {what} names no parameter '{n}'{hint}")
        out.append(lookup[n])
    return list(dict.fromkeys(out))


def _fallback_plan(model: nn.Module, name: str) -> Plan:
    """Plan for a named weight without a traced graph: the places it lives under."""
    param = model.get_parameter(name)
    places = []
    for alias, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            prefix, _, attr = alias.rpartition(".")
            places.append((model.get_submodule(prefix), attr))
    return Plan(param, places)


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    """``|row|`` of each (finite, non-zero) row, in float64 and scaled by the row's largest
    entry, so that neither the squares nor their sum overflow or underflow.

    >>> _row_norms(torch.tensor([[3e-30, 4e-30], [3e30, 4e30]], dtype=torch.float32))
    tensor([5.0000e-30, 5.0000e+30], dtype=torch.float64)
    """
    rows = rows.detach().to(torch.float64)
    scale = rows.abs().amax(dim=1, keepdim=True)
    return scale.squeeze(1) * torch.linalg.vector_norm(rows / scale, dim=1)


def _manifold(param: torch.Tensor, points: int | None) -> Grassmann1:
    """The manifold of ``param`` with ``points`` points: its rows (None), or blocks of
    rows."""
    if points is None or points == param.shape[0]:
        return Grassmann1(ndim=param.dim() - 1)
    return Grassmann1Blocks(points)


def _check_range(where: str, name: str, rows: torch.Tensor, label) -> None:
    """Refuse a point (a row of ``rows``, named by ``label(k)``) the optimizers could not
    step: its norm outside the step guard's range (the same
    :func:`rbn_geoopt.optim._fused.limits` the guard reads)."""
    lo2, hi2, _ = limits(rows.dtype)
    low, high = lo2**0.5, hi2**0.5
    norms = _row_norms(rows)
    bad = ~((norms >= low) & (norms <= high))
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    norm = float(norms[row])
    side = "below the smallest" if norm < low else "above the largest"
    raise ValueError(
        f"{where}: {label(row)} has norm {norm:.3g}, {side} norm SGDG/AdamG can step "
        f"({rows.dtype}: {low:.2g} to {high:.2g}); nothing was converted. Rescale that "
        f"layer's weight (with its bias and the BatchNorm statistics it feeds), convert the "
        f"model to float64 first, or exclude=['{name}']"
    )


def _check_weight(name: str, param: torch.Tensor, points: int | None = None) -> None:
    """Everything that could make the conversion fail, raised before anything changes;
    ``points``: of the manifold it goes on (None: one per row)."""
    where = f"to_grassmann: '{name}'"
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise ValueError(f"{where} is uninitialized (lazy module): run one forward pass first")
    if param.dim() < 2:
        raise ValueError(f"{where} has {param.dim()} dimension(s); a weight needs >= 2 (rows)")
    if not param.is_floating_point():
        raise TypeError(f"{where} has dtype {param.dtype}; G(1,n) needs a floating point weight")
    other = _manifold_name(param)
    if other is not None:
        raise ValueError(f"{where} is already a ManifoldParameter on {other}")
    manifold = _manifold(param, points)
    rows = manifold.point_view(param.detach())
    label = functools.partial(manifold.point_label, shape=tuple(param.shape))
    if rows.shape[1] < 2:
        raise ValueError(f"{where} has rows of length {rows.shape[1]}: G(1,1) is a single point")
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{where}: {label(row)} is not finite (NaN or Inf)")
    zero = (rows == 0).all(dim=1)
    if bool(zero.any()):
        row = int(zero.nonzero()[0, 0])
        raise ValueError(
            f"{where}: {label(row)} is zero; a zero weight vector is no point of G(1,n) "
            f"(re-initialise it, or exclude=['{name}'])"
        )
    _check_range(where, name, rows, label)


@torch.no_grad()
def _new_parameter(w: torch.Tensor, points: int | None) -> geoopt.ManifoldParameter:
    """The G(1, n) parameter (``points`` points: rows or blocks of rows) holding exactly
    ``w``'s values (a copy: same dtype, device, strides and requires_grad; the old
    parameter object is left as it was)."""
    return geoopt.ManifoldParameter(
        w.detach().clone(), manifold=_manifold(w, points), requires_grad=w.requires_grad
    )


def _points(findings: dict[str, Finding], name: str) -> int | None:
    """The points ``name`` is converted with: the finding's blocks when its rows are
    invariant in blocks (``0 < points < rows``), else None (one per row)."""
    finding = findings.get(name)
    if finding is not None and 0 < finding.points < finding.rows:
        return finding.points
    return None


def _selection(
    findings: dict[str, Finding], include: list[str], exclude: list[str], all_shapes: bool
) -> list[str]:
    auto = [
        n
        for n, f in findings.items()
        if f.selected(all_shapes) and not f.converted and n not in exclude
    ]
    return list(dict.fromkeys(auto + include))


def to_grassmann(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    all_shapes: bool = False,
    detect: bool = True,
    example_inputs: torch.Tensor | tuple[Any, ...] | None = None,
    leaf_modules: Iterable[str] = (),
) -> list[str]:
    """Put every scale-invariant conv/linear weight of ``model`` on G(1, n), in place.

    A weight is chosen when :func:`find_scale_invariant` finds every output row reaching a
    BatchNorm channel (or another per-row normaliser) only through operations that commute
    with positive scaling, it is not tied, and -- as in the paper -- its fan-out is smaller
    than its fan-in (``p < n``; ``all_shapes=True`` drops that last condition). ``exclude``
    removes names from that choice; ``include`` adds names whatever the analysis says (tied
    weights, transposed convolutions, the paper's by-name choices; a warning says when such
    a weight is not scale invariant: the optimizers keep each row's norm, so training can no
    longer change what that norm did). ``detect=False`` converts only ``include`` and, when
    the model cannot be traced, skips the analysis (a warning says that scale invariance was
    not checked). ``example_inputs`` and ``leaf_modules``: as in
    :func:`find_scale_invariant`.

    A weight whose rows are scale invariant only jointly in ``points`` blocks of consecutive
    rows (``Finding.points``: behind ``GroupNorm(G, C)``, a LayerNorm over the channels, a
    QK-norm per head) is chosen the same way (``wide``: fewer points than entries per
    point) and goes on ``Grassmann1Blocks(points)``, each block one point.

    Each chosen weight becomes a ``geoopt.ManifoldParameter`` on
    ``Grassmann1(ndim=w.dim() - 1)`` (or ``Grassmann1Blocks(points)``) holding the SAME
    values (every row as it is; same device, dtype, strides, requires_grad), replacing the
    parameter under all its names.
    Biases and BatchNorm running statistics are not touched, so the outputs equal the old
    ones bit for bit, in train and eval mode, whatever BatchNorm's ``eps``; SGD-G and Adam-G
    then step each row keeping its norm. Build the optimizer AFTER converting.

    Everything is checked first, then converted: when a ValueError / TypeError is raised
    nothing has changed. ValueError names the weight and the row for a zero row, a NaN/Inf
    row, and a row whose norm lies outside the range the optimizers can step (float32:
    3.3e-10 to 4.6e18, float64: 1.2e-77 to 3.4e153; norms computed without overflow).

    Returns the names (as in ``named_parameters()``) of ALL Grassmann1 parameters of the
    model after the call. Idempotent: weights already on Grassmann1 are recognised, left
    untouched, and listed again, so a second call changes nothing and returns the same list.
    When the list is empty a warning says why and the model is untouched.

    >>> import torch
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> old = net[1].weight.detach().clone()
    >>> to_grassmann(net), to_grassmann(net)
    (['1.weight'], ['1.weight'])
    >>> torch.equal(net[1].weight, old)  # the rows are kept as they are
    True
    >>> lin = nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     _ = lin.weight[2].fill_(1e-30)  # float32: too small for a step
    >>> to_grassmann(nn.Sequential(nn.Flatten(), lin, nn.BatchNorm1d(4)))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: to_grassmann: '1.weight': row 2 has norm 2.83e-30, below the smallest ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_grassmann: expected an nn.Module, got {type(model).__name__}")
    for flag, value in (("all_shapes", all_shapes), ("detect", detect)):
        if not isinstance(value, bool):
            raise TypeError(f"to_grassmann: {flag} must be a bool, got {value!r}")
    include = _canonical(model, _names(include, "include"), "include")
    exclude = _canonical(model, _names(exclude, "exclude"), "exclude")
    both = sorted(set(include) & set(exclude))
    if both:
        raise ValueError(f"to_grassmann: {both} are both included and excluded")
    try:
        findings, plans = analyse(
            model, example_inputs=example_inputs, leaf_modules=_names(leaf_modules, "leaf_modules")
        )
    except UntraceableModelError:
        if detect:
            raise
        findings, plans = {}, {}
    for name in include:
        _check_weight(name, model.get_parameter(name), _points(findings, name))
    chosen = _selection(findings, include, exclude, all_shapes) if detect else include
    todo = []
    for name in chosen:
        param = model.get_parameter(name)
        if is_grassmann1(param):
            continue
        points = _points(findings, name)
        _check_weight(name, param, points)
        todo.append((name, plans.get(name) or _fallback_plan(model, name), points))
    for name, _, _ in todo:
        if name not in include:
            continue
        finding = findings.get(name)
        if finding is None:
            warnings.warn(
                f"to_grassmann: '{name}' converted without dataflow analysis (model not traced): "
                "its scale invariance was not checked. The outputs are kept, but the "
                "optimizers keep each row's norm, so if the model depends on that norm, "
                "training can no longer change it",
                stacklevel=2,
            )
        elif not finding.points:
            warnings.warn(
                f"to_grassmann: '{name}' is not scale invariant ({finding.reason}); converted "
                "because it is in include. The outputs are kept, but the optimizers keep each "
                "row's norm, so training can no longer change what that norm does",
                stacklevel=2,
            )
    # every new parameter is made before any is put in place
    new = [(plan, _new_parameter(plan.param, points)) for _, plan, points in todo]
    for plan, param in new:
        for module, attr in plan.places:
            setattr(module, attr, param)
    result = [n for n, p in model.named_parameters() if is_grassmann1(p)]
    if not result:
        skipped = [f.name for f in findings.values() if f.points and not f.selected(all_shapes)]
        why = (
            f"; {skipped} are scale invariant but skipped (more points than entries per "
            "point, e.g. fan-out >= fan-in, or tied: all_shapes=True / include=[...])"
            if skipped
            else ""
        )
        warnings.warn(
            f"to_grassmann: no weight of {type(model).__name__} feeds a BatchNorm (or another "
            f"normaliser) in a scale invariant way{why}; the model is unchanged",
            stacklevel=2,
        )
    return result
