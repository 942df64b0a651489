"""Param-group bookkeeping shared by SGDG and AdamG: validation, manifolds, names.

A parameter's manifold is ``p.manifold`` for a geoopt ``ManifoldParameter`` /
``ManifoldTensor``, else the group's ``"manifold"`` key when given (FSDP2 strips the
ManifoldParameter class), else ``geoopt.Euclidean()`` (a plain parameter).

Validation refuses, naming the hyper-parameter or the parameter: out-of-range or non-finite
hyper-parameters (``grad_clip=inf`` is allowed: no clipping), a parameter whose shape does
not hold points of its manifold, a DTensor parameter sharded inside its points, weight decay
on G(1,n) and ``omega`` off G(1,n).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import geoopt
import torch
from geoopt.manifolds.base import Manifold

from .distributed import point_sharding_error
from .kernels import is_grassmann1

__all__ = ["EUCLIDEAN_RULES", "manifold_of", "param_label", "validate_group"]

#: values of the param-group key ``euclidean``: the rule that steps plain parameters
EUCLIDEAN_RULES = ("sgd", "adam")

_EUCLIDEAN = geoopt.Euclidean()


def manifold_of(param: torch.Tensor, group: dict[str, Any]) -> Manifold:
    """The manifold ``param`` is stepped on (see the module docstring)."""
    if isinstance(param, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)):
        return param.manifold
    manifold = group.get("manifold")
    return _EUCLIDEAN if manifold is None else manifold


def param_label(group: dict[str, Any], group_index: int, param_index: int) -> str:
    """How errors name a parameter: its name when the optimizer got named parameters."""
    names = group.get("param_names")
    if names is not None:
        return f"parameter '{names[param_index]}'"
    shape = tuple(group["params"][param_index].shape)
    return f"param_groups[{group_index}]['params'][{param_index}] (shape {shape})"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(
    where: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None,
    high_open: bool,
    allow_inf: bool = False,
) -> None:
    """Refuse ``value`` unless it is a real number in ``[low, high)`` / ``[low, high]``
    (finite unless ``allow_inf``)."""
    bracket = ")" if high_open else "]"
    rule = f"in [{low}, {high}{bracket}" if high is not None else f">= {low}"
    if not _is_real(value):
        raise TypeError(f"{where}: {name} must be a real number {rule}, got {value!r}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if not value >= low or too_high:  # `not >=` also refuses NaN
        raise ValueError(f"{where}: invalid {name} {value!r}: must be {rule}")
    if not allow_inf and not math.isfinite(value):
        raise ValueError(f"{where}: invalid {name} {value!r}: must be finite")


def _validate_hyper(group: dict[str, Any], where: str) -> None:
    _check_real(where, "lr", group["lr"], low=0.0, high=None, high_open=False)
    _check_real(where, "momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    _check_real(where, "dampening", group["dampening"], low=0.0, high=1.0, high_open=False)
    _check_real(where, "weight_decay", group["weight_decay"], low=0.0, high=None, high_open=False)
    _check_real(where, "eps", group["eps"], low=0.0, high=None, high_open=False)
    _check_real(where, "omega", group["omega"], low=0.0, high=None, high_open=False)
    if group["grad_clip"] is not None:
        _check_real(
            where,
            "grad_clip",
            group["grad_clip"],
            low=0.0,
            high=None,
            high_open=False,
            allow_inf=True,
        )
    betas = group["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for k, beta in enumerate(betas):
        _check_real(where, f"betas[{k}]", beta, low=0.0, high=1.0, high_open=True)
    group["betas"] = (betas[0], betas[1])
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"{where}: nesterov must be a bool, got {group['nesterov']!r}")
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
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"{where}: foreach must be None or a bool, got {group['foreach']!r}")
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


def _validate_params(group: dict[str, Any], group_index: int, where: str) -> None:
    for j, param in enumerate(group["params"]):
        manifold = manifold_of(param, group)
        grassmann = is_grassmann1(manifold)
        if grassmann and group["weight_decay"] != 0:
            raise ValueError(
                f"{where}: weight_decay={group['weight_decay']} on the Grassmann1 "
                f"{param_label(group, group_index, j)}: weight decay is projected away on "
                "G(1,n) (meaningless); use weight_decay=0 for this group"
            )
        if not grassmann and group["omega"] != 0:
            raise ValueError(
                f"{where}: omega={group['omega']} needs Grassmann1 parameters, but "
                f"{param_label(group, group_index, j)} is on {manifold.name}; put it in a "
                "param group with omega=0"
            )
        if isinstance(manifold, geoopt.Euclidean):
            continue
        if torch.is_complex(param):
            raise TypeError(
                f"{where}: complex manifold {param_label(group, group_index, j)} is not supported"
            )
        ok, reason = manifold.check_point(param, explain=True)
        if not ok:
            label = param_label(group, group_index, j)
            shape = "" if "(shape " in label else f" of shape {tuple(param.shape)}"
            raise ValueError(
                f"{where}: {label}{shape} does not hold points of {manifold!r}: {reason}"
            )
        reason = point_sharding_error(param, manifold.ndim or 0)
        if reason is not None:
            raise ValueError(f"{where}: the DTensor {param_label(group, group_index, j)} {reason}")


def validate_group(group: dict[str, Any], group_index: int, optimizer: str) -> None:
    """Raise ValueError / TypeError naming the bad hyper-parameter or parameter.

    Also normalizes ``betas`` to a tuple.
    """
    where = f"{optimizer} param_groups[{group_index}]"
    _validate_hyper(group, where)
    _validate_params(group, group_index, where)
