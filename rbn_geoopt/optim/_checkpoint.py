r"""Check an optimizer ``state_dict`` against the optimizer BEFORE loading anything.

``torch.optim.Optimizer.load_state_dict`` only compares the number of groups and of
parameters per group; a state saved for differently shaped parameters loads silently and
fails -- or, worse, broadcasts -- at a later step. Before SGDG/AdamG load a state they check,
and raise ``ValueError`` naming the parameter (its name when the optimizer got named
parameters, else ``param_groups[i]['params'][j] (shape ...)``):

* ``state_dict`` has ``"state"`` and ``"param_groups"``; as many groups, and as many
  parameters per group, as the optimizer;
* the saved hyper-parameters pass the same validation as the constructor's;
* per parameter, the state holds exactly the keys that the optimizer declares for it
  (:meth:`~rbn_geoopt.optim.base.RiemannianOptimizer.expected_state`: the optimizer's
  ``state_spec`` on a manifold, torch's keys on a plain parameter), all together, with the
  declared shapes and finite values. A ``step`` saved as a Python number (older torch) is
  accepted and loaded as a tensor, as ``torch.optim.Adam`` does.

A parameter without saved state starts fresh, as in torch (e.g. it had no gradient before
the checkpoint).

>>> import torch
>>> from rbn_geoopt.optim import SGDG
>>> w = torch.nn.Parameter(torch.zeros(3))
>>> opt = SGDG([("bias", w)], lr=0.1, momentum=0.9)
>>> saved = {"state": {0: {"momentum_buffer": torch.zeros(4)}},
...          "param_groups": [dict(opt.state_dict()["param_groups"][0])]}
>>> opt.load_state_dict(saved)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: SGDG.load_state_dict: state 'momentum_buffer' of parameter 'bias' has shape (4,)...
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ._validate import manifold_of, param_label, validate_group

__all__ = ["validate_state_dict"]


def _candidate_group(
    ours: dict[str, Any], saved: Mapping[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """Our group as it will be after loading ``saved`` (for validation only)."""
    group = {k: v for k, v in saved.items() if k not in ("params", "manifold")}
    for key, value in defaults.items():
        group.setdefault(key, value)
    group["params"] = ours["params"]
    for key in ("manifold", "param_names"):
        if key in ours:
            group[key] = ours[key]
    return group


def _check_entry(where: str, label: str, entry: Any, expected: dict[str, tuple[int, ...]]) -> None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: the state of {label} must be a dict, got {type(entry)!r}")
    unknown = sorted(set(entry) - set(expected), key=str)
    if unknown:
        raise ValueError(
            f"{where}: state of {label} has unexpected key(s) {unknown}; this optimizer keeps "
            f"{sorted(expected)} (was it saved by another optimizer or configuration?)"
        )
    present = [k for k in expected if entry.get(k) is not None]
    if present and len(present) != len(expected):
        missing = sorted(set(expected) - set(present))
        raise ValueError(f"{where}: state of {label} lacks key(s) {missing} (has {present})")
    for key in present:
        value = entry[key]
        if key == "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not value >= 0:
                raise ValueError(f"{where}: state 'step' of {label} must be >= 0, got {value!r}")
            continue
        if not torch.is_tensor(value):
            raise ValueError(
                f"{where}: state '{key}' of {label} must be a tensor, got {type(value).__name__}"
            )
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"{where}: state '{key}' of {label} has shape {tuple(value.shape)}, expected "
                f"{expected[key]}: the checkpoint was saved for a differently shaped parameter"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: state '{key}' of {label} holds NaN/Inf values")


def validate_state_dict(optimizer: Any, state_dict: Any) -> None:
    """Raise ValueError / TypeError (see the module docstring) unless ``state_dict`` fits
    ``optimizer`` (an SGDG/AdamG, or any subclass: the declared state is read)."""
    where = f"{type(optimizer).__name__}.load_state_dict"
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError(f"{where}: expected a dict with keys 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{where}: loaded state dict has a different number of parameter groups "
            f"({len(saved_groups)}, this optimizer has {len(optimizer.param_groups)})"
        )
    candidates = []
    for i, (ours, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(ours["params"]):
            raise ValueError(
                f"{where}: loaded state dict contains a parameter group that doesn't match the "
                f"size of optimizer's group: group {i} holds {len(saved['params'])} "
                f"parameter(s) in the state dict and {len(ours['params'])} here"
            )
        group = _candidate_group(ours, saved, optimizer.defaults)
        validate_group(group, i, where)
        candidates.append(group)
    state = state_dict["state"]
    for i, (group, saved) in enumerate(zip(candidates, saved_groups, strict=True)):
        for j, (param, saved_id) in enumerate(zip(group["params"], saved["params"], strict=True)):
            if saved_id not in state:
                continue
            expected = optimizer.expected_state(param, manifold_of(param, group), group)
            _check_entry(where, param_label(group, i, j), state[saved_id], expected)
