"""Move a model's scale-invariant weights onto G(1, n), in place, keeping its outputs.

Each chosen weight ``W`` (``p`` rows of length ``n``) becomes
``geoopt.ManifoldParameter(W / r, manifold=Grassmann1(ndim=W.dim() - 1))`` with
``r_i = |row i|``. So that the model computes the same function in train AND eval mode, the
layer's bias is divided by ``r`` too (the whole output channel ``i`` is then ``1 / r_i`` times
the old one, exactly), and every BatchNorm channel fed by row ``i`` gets
``running_mean / r_i`` and ``running_var / r_i**2``; outputs then agree up to BatchNorm's
``eps`` (``sqrt(v / r^2 + eps)`` versus ``sqrt(v + eps) / r``).

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> to_grassmann(net)
['0.weight']
>>> type(net[0].weight).__name__, type(net[0].weight.manifold).__name__, net[0].weight.manifold.ndim
('ManifoldParameter', 'Grassmann1', 3)
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable
from typing import Any

import geoopt
import torch
import torch.nn as nn

from ..manifold import Grassmann1
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
    """Plan for a named weight without a traced graph: rows and the layer's bias only."""
    param = model.get_parameter(name)
    places, biases = [], []
    for alias, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            prefix, _, attr = alias.rpartition(".")
            module = model.get_submodule(prefix)
            places.append((module, attr))
            if attr == "weight" and type(module) in _ROW_LAYERS and module.bias is not None:
                biases.append(module.bias)
    return Plan(param, places, biases, None)


def _check_weight(name: str, param: torch.Tensor) -> None:
    """Everything that could make the conversion fail, raised before anything changes."""
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
    rows = param.detach().reshape(param.shape[0], -1)
    if rows.shape[1] < 2:
        raise ValueError(f"{where} has rows of length {rows.shape[1]}: G(1,1) is a single point")
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{where}: row {row} is not finite (NaN or Inf)")
    zero = (rows == 0).all(dim=1)
    if bool(zero.any()):
        row = int(zero.nonzero()[0, 0])
        raise ValueError(
            f"{where}: row {row} is zero; a zero weight vector is no point of G(1,n) "
            f"(re-initialise it, or exclude=['{name}'])"
        )


@torch.no_grad()
def _convert(plan: Plan) -> None:
    w = plan.param
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows = w.detach().reshape(w.shape[0], -1).to(work)
    r = torch.linalg.vector_norm(rows, dim=1)
    unit = (rows / r[:, None]).reshape(w.shape).to(w.dtype)
    new = geoopt.ManifoldParameter(
        unit, manifold=Grassmann1(ndim=w.dim() - 1), requires_grad=w.requires_grad
    )
    for bias in plan.biases:
        bias.div_(r.to(device=bias.device, dtype=bias.dtype))
    for bn, rows_of in plan.batchnorms or ():
        if bn.running_mean is None:
            continue
        fed = rows_of >= 0
        scale = torch.ones(rows_of.shape, dtype=work)
        scale[fed] = r.cpu()[rows_of[fed]]
        bn.running_mean.div_(scale.to(bn.running_mean))
        bn.running_var.div_(scale.square().to(bn.running_var))
    for module, attr in plan.places:
        setattr(module, attr, new)


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
    BatchNorm channel only through operations that commute with positive scaling, it is not
    tied, and -- as in the paper -- its fan-out is smaller than its fan-in (``p < n``;
    ``all_shapes=True`` drops that last condition). ``exclude`` removes names from that
    choice; ``include`` adds names whatever the analysis says (tied weights, transposed
    convolutions, the paper's by-name choices; a warning says when such a weight is not scale
    invariant, and then the outputs change). ``detect=False`` converts only ``include``
    and, when the model cannot be traced, skips the analysis (BatchNorm running statistics
    are then not rescaled: a warning says so). ``example_inputs`` and ``leaf_modules``: as in
    :func:`find_scale_invariant`.

    Each chosen weight becomes a ``geoopt.ManifoldParameter`` on
    ``Grassmann1(ndim=w.dim() - 1)`` with unit rows (same device, dtype, requires_grad),
    replacing the parameter under all its names; the bias and the BatchNorm running
    statistics are rescaled so that the outputs agree with the old ones in train and eval
    mode up to BatchNorm's ``eps``. Build the optimizer AFTER converting.

    Everything is checked first, then converted: when a ValueError / TypeError is raised
    nothing has changed. A zero row raises ValueError naming the weight and the row.

    Returns the names (as in ``named_parameters()``) of ALL Grassmann1 parameters of the
    model after the call. Idempotent: weights already on Grassmann1 are recognised, left
    untouched, and listed again, so a second call changes nothing and returns the same list.
    When the list is empty a warning says why and the model is untouched.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> to_grassmann(net), to_grassmann(net)
    (['1.weight'], ['1.weight'])
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
        _check_weight(name, model.get_parameter(name))
    chosen = _selection(findings, include, exclude, all_shapes) if detect else include
    todo = []
    for name in chosen:
        param = model.get_parameter(name)
        if is_grassmann1(param):
            continue
        _check_weight(name, param)
        todo.append((name, plans.get(name) or _fallback_plan(model, name)))
    for name, plan in todo:
        if name not in include:
            continue
        finding = findings.get(name)
        if finding is None:
            warnings.warn(
                f"to_grassmann: '{name}' converted without dataflow analysis (model not traced): "
                "the BatchNorm running statistics it feeds were not rescaled, so eval-mode "
                "outputs change until they are re-estimated",
                stacklevel=2,
            )
        elif not finding.invariant:
            effect = "its outputs are kept" if plan.batchnorms else "the model's outputs change"
            warnings.warn(
                f"to_grassmann: '{name}' is not scale invariant ({finding.reason}); converted "
                f"because it is in include ({effect})",
                stacklevel=2,
            )
    for _, plan in todo:
        _convert(plan)
    result = [n for n, p in model.named_parameters() if is_grassmann1(p)]
    if not result:
        skipped = [f.name for f in findings.values() if f.invariant and not f.selected(all_shapes)]
        why = (
            f"; {skipped} are BatchNorm-fed but skipped (fan-out >= fan-in or tied: "
            "all_shapes=True / include=[...])"
            if skipped
            else ""
        )
        warnings.warn(
            f"to_grassmann: no weight of {type(model).__name__} feeds a BatchNorm in a scale "
            f"invariant way{why}; the model is unchanged",
            stacklevel=2,
        )
    return result
