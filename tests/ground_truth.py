"""Numerical ground truth for scale invariance, independent of the dataflow analysis.

Row ``i`` of a weight is scale invariant when multiplying it by any ``a_i > 0`` leaves the
model's output unchanged. :func:`row_scaling_change` measures it directly: a float64 copy of
the model, every module's float ``eps`` (BatchNorm's, GroupNorm's, LayerNorm's ..., or one a
test module passes to ``F.batch_norm``) set to 1e-200 (so that ``BN(a z) == BN(z)`` to float64
rounding, not up to ``eps``; torch refuses 0 in training), each row of the weight times its
own random factor in ``[e^-2, e^2]``, and the relative change of the output, with the
modules' training flags as given (a BatchNorm left in eval mode stays frozen, as the training
run will use it). :func:`block_scaling_change` does the same for blocks of consecutive rows.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

INVARIANT = 1e-9  # relative change of a truly invariant weight (float64 rounding)
CHANGED = 1e-4  # a weight that is not invariant moves the output far more than this


def _forward(model: nn.Module, x):
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        return model(*(t.double() for t in inputs))


def row_scaling_change(model: nn.Module, name: str, x, seed: int = 0) -> float:
    """max |out(scaled rows) - out| / max |out| for the weight ``name`` (float64)."""
    return block_scaling_change(model, name, x, None, seed)


def block_scaling_change(model: nn.Module, name: str, x, points: int | None, seed: int = 0):
    """The same, each block ``W.reshape(points, -1)[k]`` of consecutive rows times its own
    factor (``points=None``: one block per row)."""
    base = copy.deepcopy(model).double()
    for module in base.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-200
    scaled = copy.deepcopy(base)
    weight = scaled.get_parameter(name)
    gen = torch.Generator().manual_seed(seed)
    points = weight.shape[0] if points is None else points
    factor = torch.empty((points, 1), dtype=weight.dtype)
    factor = torch.exp(factor.uniform_(-2.0, 2.0, generator=gen))
    with torch.no_grad():
        weight.view(points, -1).mul_(factor)
    out, out_scaled = _forward(base, x), _forward(scaled, x)
    return float((out_scaled - out).abs().max() / out.abs().max())


def truly_invariant(model: nn.Module, name: str, x, seed: int = 0) -> bool:
    """True / False from the output change; fails loudly when it is in between."""
    change = row_scaling_change(model, name, x, seed)
    assert change < INVARIANT or change > CHANGED, f"{name}: ambiguous change {change:.3g}"
    return change < INVARIANT


def truly_block_invariant(model: nn.Module, name: str, x, points: int, seed: int = 0) -> bool:
    """:func:`truly_invariant` for blocks of consecutive rows."""
    change = block_scaling_change(model, name, x, points, seed)
    assert change < INVARIANT or change > CHANGED, f"{name}: ambiguous change {change:.3g}"
    return change < INVARIANT


def assert_no_false_positive(model: nn.Module, findings: dict, x) -> None:
    """Every weight the analysis calls scale invariant is, numerically (each row, or each
    block of ``points`` for a weight invariant in blocks)."""
    for name, finding in findings.items():
        if finding.invariant:
            assert truly_invariant(model, name, x), f"{name} called invariant: {finding.reason}"
        if finding.points:
            assert truly_block_invariant(model, name, x, finding.points), finding.reason
