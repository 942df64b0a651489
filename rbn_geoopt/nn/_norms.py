"""Normalisers other than BatchNorm, and which positions each one normalises jointly.

A normaliser computes its statistics over *groups* of positions of its input and divides
every position by its group's statistic, so scaling a set of weight rows by one factor
``a > 0`` leaves the output unchanged when every group the rows feed holds those rows only.
Each :class:`NormOp` maps the channel-id tensor (:mod:`._ops`) at its input to a tensor of the
same shape holding, at each position, the index of the group it is normalised in:

* ``GroupNorm(G, C)`` on ``(N, C, *)``: group ``n * G + c // (C / G)``;
* ``LayerNorm`` / ``RMSNorm`` with ``normalized_shape`` of ``k`` dims: one group per index of
  the leading ``rank - k`` dims (over the channel dim only for a channels-last ``(N, L, C)``
  with ``LayerNorm(C)``; all channels jointly for ``LayerNorm((C, H, W))``; one group per
  head for ``(N, L, heads, d)`` with ``LayerNorm(d)``, QK-norm);
* ``InstanceNorm{1,2,3}d``: one group per index of the dims before the spatial ones, batched
  ``(N, C, *)`` or not ``(C, *)``, as torch decides from the rank.

``centres``: the normaliser subtracts its group mean (a constant shared by a whole group
cancels), False for RMSNorm. In collapsed mode (no ``example_inputs``) the ids have size 1
on non-channel dims; the groups are then exact because they are products over dims.

>>> ids = torch.arange(4).reshape(1, 4, 1, 1)  # a conv's 4 rows, collapsed
>>> _group_norm(2, 4)(ids, True).flatten().tolist()
[0, 0, 1, 1]
>>> _layer_norm((4,))(torch.arange(4).reshape(1, 1, 4), True).flatten().tolist()
[0, 0, 0, 0]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

__all__ = ["NormOp", "norm_function", "norm_module"]

Groups = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class NormOp:
    """A GroupNorm / LayerNorm / RMSNorm / InstanceNorm call (module or functional)."""

    label: str
    #: the name reported in ``Finding.normalisers`` (module name, or owner of its weight)
    name: str
    #: ``groups(ids, collapsed)``: the group index at each position; ValueError when the
    #: layout does not fit the normaliser
    groups: Groups
    #: subtracts the group mean (a per-group constant, such as a bias, cancels)
    centres: bool
    #: normalises with statistics of its input (else frozen: an affine map)
    normalising: bool = True
    #: identifies running statistics for the "called more than once" check (None: none)
    key: int | None = None


def _leading(ids: torch.Tensor, k: int) -> torch.Tensor:
    """One group per index of the leading ``ids.dim() - k`` dims."""
    lead = tuple(ids.shape[: ids.dim() - k])
    index = torch.arange(math.prod(lead), dtype=torch.long).reshape(lead + (1,) * k)
    return index.expand(ids.shape)


def _layer_norm(shape: tuple[int, ...]) -> Groups:
    """LayerNorm / RMSNorm over the last ``len(shape)`` dims."""
    k = len(shape)

    def groups(ids: torch.Tensor, collapsed: bool) -> torch.Tensor:
        if ids.dim() < k:
            raise ValueError(f"it normalises the last {k} dims of a {ids.dim()}-D layout")
        last = tuple(ids.shape[ids.dim() - k :])
        if any(s != n and not (collapsed and s == 1) for s, n in zip(last, shape, strict=True)):
            raise ValueError(f"it normalises shape {shape} where the layout ends in {last}")
        return _leading(ids, k)

    return groups


def _group_norm(num_groups: int, channels: int | None) -> Groups:
    """GroupNorm: ``num_groups`` blocks of consecutive channels (dim 1), per sample."""

    def groups(ids: torch.Tensor, collapsed: bool) -> torch.Tensor:
        if ids.dim() < 2:
            raise ValueError(f"it takes (N, C, *) inputs, not a {ids.dim()}-D layout")
        c = int(ids.shape[1])
        if collapsed and c == 1:
            # dim 1 is not the rows' dim: the ids are the same along it, so every group of a
            # sample holds the same rows, whatever the real size
            return _leading(ids, ids.dim() - 1)
        if (channels is not None and c != channels) or c % num_groups:
            want = channels if channels is not None else f"a multiple of {num_groups}"
            raise ValueError(f"it has {want} channels where the layout has {c}")
        n, per = int(ids.shape[0]), c // num_groups
        index = torch.arange(n * num_groups, dtype=torch.long).reshape(n, num_groups, 1)
        index = index.expand(n, num_groups, per).reshape((n, c) + (1,) * (ids.dim() - 2))
        return index.expand(ids.shape)

    return groups


def _instance_norm(unbatched_rank: int) -> Groups:
    """InstanceNorm: one group per (sample, channel), or per channel when unbatched."""
    spatial = unbatched_rank - 1

    def groups(ids: torch.Tensor, collapsed: bool) -> torch.Tensor:
        if ids.dim() not in (unbatched_rank, unbatched_rank + 1):
            raise ValueError(
                f"it takes {unbatched_rank}-D or {unbatched_rank + 1}-D inputs, "
                f"not a {ids.dim()}-D layout"
            )
        return _leading(ids, spatial)

    return groups


_INSTANCE_NORM = nn.modules.instancenorm._InstanceNorm
_OWN_FORWARD = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, _INSTANCE_NORM)


def norm_module(node: Node, module: nn.Module, label: str) -> NormOp | None:
    """The normaliser ``module`` is (a subclass only with torch's own forward: one with its
    own forward kept as a leaf, like timm's LayerNorm2d, may normalise other dims), or None.
    """
    base = next((c for c in _OWN_FORWARD if isinstance(module, c)), None)
    if base is None or type(module).forward is not base.forward:
        return None
    name = str(node.target)
    if isinstance(module, nn.GroupNorm):
        return NormOp(label, name, _group_norm(module.num_groups, module.num_channels), True)
    if isinstance(module, nn.LayerNorm):
        return NormOp(label, name, _layer_norm(tuple(module.normalized_shape)), True)
    if isinstance(module, nn.RMSNorm):
        return NormOp(label, name, _layer_norm(tuple(module.normalized_shape)), False)
    if isinstance(module, _INSTANCE_NORM):
        tracked = bool(module.track_running_stats)
        return NormOp(
            label,
            name,
            _instance_norm(module._get_no_batch_dim()),
            True,
            normalising=module.training or not tracked,
            key=id(module) if tracked else None,
        )
    return None


def _arg(node: Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    values = tuple(value) if isinstance(value, (list, tuple, torch.Size)) else (value,)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return values
    return None


def norm_function(node: Node, label: str) -> NormOp | str | None:
    """``F.group_norm`` / ``F.layer_norm`` / ``F.rms_norm``: the NormOp, a reason it cannot
    be followed (a size computed in forward), or None for another function."""
    target = node.target
    if target not in (F.group_norm, F.layer_norm, F.rms_norm):
        return None
    weight = _arg(node, 2, "weight")
    owner = str(weight.target).rpartition(".")[0] if isinstance(weight, Node) else ""
    name = owner if isinstance(weight, Node) and weight.op == "get_attr" and owner else node.name
    if target is F.group_norm:
        num = _arg(node, 1, "num_groups")
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            return f"{label} (its num_groups is computed in forward)"
        return NormOp(label, name, _group_norm(num, None), True)
    shape = _int_tuple(_arg(node, 1, "normalized_shape"))
    if shape is None:
        return f"{label} (its normalized_shape is computed in forward)"
    return NormOp(label, name, _layer_norm(shape), target is F.layer_norm)
