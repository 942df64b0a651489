"""Param groups of SGDG and AdamG: whose manifold a parameter is on, how errors name it,
and the one validation every group passes (constructor, ``add_param_group``,
``load_state_dict``).

A parameter's manifold is ``p.manifold`` for a geoopt ``ManifoldParameter`` /
``ManifoldTensor``, else the group's ``"manifold"`` key when given (FSDP2 strips the
ManifoldParameter class), else ``geoopt.Euclidean()`` (a plain parameter).

Validation refuses, naming the hyper-parameter or the parameter: out-of-range or
non-finite hyper-parameters (``grad_clip`` must be > 0; ``inf`` or None: no clipping;
``eps`` must be > 0), a tensor that appears twice in a group, a parameter whose shape does
not hold points of its manifold, a DTensor sharded inside its points, weight decay on
G(1,n), ``omega`` off G(1,n), and ``fused=True`` for a parameter the fused kernels do not
step. 0-dim real tensors given as ``lr``, ``momentum``, ``betas``, ... are turned into
Python numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import geoopt
import torch
from geoopt.manifolds.base import Manifold

from ..manifold import Grassmann1, Grassmann1Blocks, grassmann1_of, is_grassmann1
from ._distributed import block_sharding_error, point_sharding_error

__all__ = ["EUCLIDEAN_RULES", "fused_kernel_steps", "manifold_of", "param_label", "validate_group"]

#: values of the param-group key ``euclidean``: the rule that steps plain parameters
EUCLIDEAN_RULES = ("sgd", "adam")

_EUCLIDEAN = geoopt.Euclidean()
#: the manifolds the fused kernels step (rows of ``manifold.point_view(param)``)
_FUSED = (Grassmann1, Grassmann1Blocks)


def manifold_of(param: torch.Tensor, group: dict[str, Any]) -> Manifold:
    """The manifold ``param`` is stepped on (see the module docstring)."""
    manifold = getattr(param, "manifold", None)
    if manifold is not None:
        return manifold
    return group.get("manifold") or _EUCLIDEAN


def fused_kernel_steps(param: torch.Tensor, manifold: Manifold) -> bool:
    """Whether the fused kernels can step ``param``: exactly ``Grassmann1`` or
    ``Grassmann1Blocks`` (``Scaled`` changes the metric) in float32 or float64."""
    return type(manifold) in _FUSED and param.dtype in (torch.float32, torch.float64)


def param_label(group: dict[str, Any], group_index: int, param_index: int) -> str:
    """How errors name a parameter: its name when the optimizer got named parameters."""
    names = group.get("param_names")
    if names is not None:
        return f"parameter '{names[param_index]}'"
    shape = tuple(group["params"][param_index].shape)
    return f"param_groups[{group_index}]['params'][{param_index}] (shape {shape})"


def _real(
    where: str,
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = True,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float, refused unless a real number in the interval from ``low`` to
    ``high`` (bounds open or closed as said; finite unless ``allow_inf``). The one check of
    every real hyper-parameter."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    left = "(" if open_low else "["
    right = ")" if open_high else "]"
    rule = (
        f"in {left}{low}, {high}{right}"
        if high is not None
        else f"{'>' if open_low else '>='} {low}"
    )
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a real number {rule}, got {value!r}")
    value = float(value)
    ok_low = value > low if open_low else value >= low  # False for NaN
    ok_high = high is None or (value < high if open_high else value <= high)
    if not (ok_low and ok_high):
        raise ValueError(f"{where}: invalid {name} {value!r}: must be {rule}")
    if not allow_inf and math.isinf(value):
        raise ValueError(f"{where}: invalid {name} {value!r}: must be finite")
    return value


def _validate_hyper(group: dict[str, Any], where: str) -> None:
    group["lr"] = _real(where, "lr", group["lr"], 0.0)
    group["momentum"] = _real(where, "momentum", group["momentum"], 0.0, 1.0)
    group["dampening"] = _real(where, "dampening", group["dampening"], 0.0, 1.0, open_high=False)
    group["weight_decay"] = _real(where, "weight_decay", group["weight_decay"], 0.0)
    group["eps"] = _real(where, "eps", group["eps"], 0.0, open_low=True)
    group["omega"] = _real(where, "omega", group["omega"], 0.0)
    if group["grad_clip"] is not None:
        group["grad_clip"] = _real(
            where, "grad_clip", group["grad_clip"], 0.0, open_low=True, allow_inf=True
        )
    betas = group["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    group["betas"] = tuple(_real(where, f"betas[{k}]", b, 0.0, 1.0) for k, b in enumerate(betas))
    for key in ("nesterov",):
        if not isinstance(group[key], bool):
            raise TypeError(f"{where}: {key} must be a bool, got {group[key]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"{where}: nesterov=True requires momentum > 0 and dampening = 0 "
            f"(got momentum={group['momentum']}, dampening={group['dampening']})"
        )
    if group["euclidean"] not in EUCLIDEAN_RULES:
        raise ValueError(
            f"{where}: unknown euclidean rule {group['euclidean']!r}; "
            f"choose one of {', '.join(map(repr, EUCLIDEAN_RULES))}"
        )
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"{where}: {key} must be None or a bool, got {group[key]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError(f"{where}: fused=True and foreach=True cannot be set together")
    stabilize = group["stabilize"]
    if stabilize is not None and (
        isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1
    ):
        raise ValueError(f"{where}: stabilize must be None or an int >= 1, got {stabilize!r}")
    manifold = group.get("manifold")
    if manifold is not None and not isinstance(manifold, Manifold):
        raise TypeError(
            f"{where}: the group key 'manifold' must be a geoopt Manifold, got "
            f"{type(manifold).__name__}"
        )


def _validate_param(group: dict[str, Any], group_index: int, j: int, where: str) -> None:
    param = group["params"][j]
    manifold = manifold_of(param, group)
    grassmann = is_grassmann1(manifold)
    label = param_label(group, group_index, j)
    if grassmann and group["weight_decay"] != 0:
        raise ValueError(
            f"{where}: weight_decay={group['weight_decay']} on the Grassmann1 {label}: weight "
            "decay is projected away on G(1,n) (meaningless); use weight_decay=0 for this group"
        )
    if not grassmann and group["omega"] != 0:
        raise ValueError(
            f"{where}: omega={group['omega']} needs Grassmann1 parameters, but {label} is on "
            f"{manifold.name}; put it in a param group with omega=0"
        )
    if isinstance(manifold, geoopt.Euclidean):
        return
    if group["fused"] and not fused_kernel_steps(param, manifold):
        raise ValueError(
            f"{where}: fused=True, but the fused kernels step float32/float64 Grassmann1 "
            f"parameters only, and {label} is a {param.dtype} point of {manifold.name}"
        )
    if torch.is_complex(param):
        raise TypeError(f"{where}: complex manifold {label} is not supported")
    if param.device.type != "meta":
        ok, reason = manifold.check_point(param, explain=True)
        if not ok:
            shape = "" if "(shape " in label else f" of shape {tuple(param.shape)}"
            raise ValueError(
                f"{where}: {label}{shape} does not hold points of {manifold!r}: {reason}"
            )
    base = grassmann1_of(manifold)
    if isinstance(base, Grassmann1Blocks):
        reason = block_sharding_error(param)
    else:
        reason = point_sharding_error(param, manifold.ndim or 0)
    if reason is not None:
        raise ValueError(f"{where}: the DTensor {label} {reason}")


def validate_group(group: dict[str, Any], group_index: int, optimizer: str) -> None:
    """Raise ValueError / TypeError naming the bad hyper-parameter or parameter (module
    docstring); normalizes real hyper-parameters to floats and ``betas`` to a tuple."""
    where = f"{optimizer} param_groups[{group_index}]"
    _validate_hyper(group, where)
    seen: dict[int, int] = {}
    for j, param in enumerate(group["params"]):
        if id(param) in seen:
            raise ValueError(
                f"{where}: {param_label(group, group_index, j)} is the same tensor as "
                f"params[{seen[id(param)]}]; a parameter may appear once"
            )
        seen[id(param)] = j
        _validate_param(group, group_index, j, where)
