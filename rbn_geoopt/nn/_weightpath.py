"""Weights that are normalised themselves before use: weight standardisation, weight_norm.

A weight ``W`` that is normalised before any use -- timm's ``StdConv2d`` /
``ScaledStdConv2d`` (``F.batch_norm(W.reshape(1, C, -1), None, None, training=True)``),
``F.layer_norm`` / ``F.normalize`` of the weight, ``torch._weight_norm``, or the direction
``original1`` of ``torch.nn.utils.parametrizations.weight_norm`` -- gives the model the same
values for every positive scale of the groups it is normalised over, whatever follows. The
path from the parameter to its normalisers is followed here with *exact* ids (the
parameter's own shape, known without ``example_inputs``): layout ops with constant sizes are
applied to the ids as they are to the weight; a normaliser ends the path with the rows of
each group (a :class:`._propagate.Hit`); anything else blocks. The rows that share a group
are invariant only jointly (:mod:`._blocks`).

>>> import torch.fx
>>> class Std(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
...     def forward(self, x):
...         w = F.batch_norm(self.weight.reshape(1, 4, -1), None, None, training=True)
...         return F.conv2d(x, w.reshape_as(self.weight))
>>> gm = torch.fx.symbolic_trace(Std())
>>> source = next(n for n in gm.graph.nodes if n.op == "get_attr")
>>> hits = follow_weight(gm, dict(gm.named_modules()), [source], (4, 3, 3, 3))
>>> hits[0].label, hits[0].pairs[:, 1].tolist()
("batch_norm (node 'batch_norm')", [0, 1, 2, 3])
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node
from torch.nn.utils import parametrize

from ._norms import NormOp, norm_function, norm_module
from ._ops import Blocked, ShapeQuery, classify, describe
from ._propagate import Hit

__all__ = ["NOT_A_DIRECTION", "dim_hit", "direction_dim", "follow_weight"]

NOT_A_DIRECTION = object()
_WeightNorm = getattr(torch.nn.utils.parametrizations, "_WeightNorm", None)

_LAYOUT_METHODS = {
    "reshape",
    "view",
    "flatten",
    "permute",
    "transpose",
    "unsqueeze",
    "squeeze",
    "t",
    "movedim",
    "swapaxes",
    "swapdims",
    "reshape_as",
    "view_as",
}
_SAME_METHODS = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type"}
_LAYOUT_FUNCTIONS = {
    torch.reshape,
    torch.flatten,
    torch.permute,
    torch.transpose,
    torch.unsqueeze,
    torch.squeeze,
    torch.t,
    torch.movedim,
    torch.swapaxes,
    torch.swapdims,
}
_SHAPE_ONLY = {"reshape_as": 1, "view_as": 1, "expand_as": 1}  # arg that only gives a shape
_NUMBER_SCALES = {operator.mul, operator.truediv, torch.mul, torch.div}


def direction_dim(module: nn.Module, pname: str) -> Any:
    """The ``dim`` of the weight_norm whose direction ``original1`` is ``module``'s
    parameter ``pname`` (its only parametrization), else :data:`NOT_A_DIRECTION`."""
    prefix, _, attr = pname.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if (
        _WeightNorm is None
        or attr != "original1"
        or not isinstance(owner, parametrize.ParametrizationList)
        or len(owner) != 1
        or not isinstance(owner[0], _WeightNorm)
    ):
        return NOT_A_DIRECTION
    return owner[0].dim


def _pairs(ids: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    span = int(ids.max()) + 1 if ids.numel() else 1
    keys = torch.unique(group.reshape(-1) * span + ids.reshape(-1))
    return torch.stack([keys // span, keys % span], 1)


def _along(ids: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """One group per index of ``dims`` (the others are normalised over)."""
    shape = [ids.shape[d] if d in dims else 1 for d in range(ids.dim())]
    index = torch.arange(max(1, int(torch.Size(shape).numel())), dtype=torch.long)
    return index.reshape(shape).expand(ids.shape)


def dim_hit(ids: torch.Tensor, dim: Any, label: str) -> Hit:
    """``torch._weight_norm(v, g, dim)``: normalised over every dim but ``dim`` (``-1`` or
    None: over the whole tensor)."""
    if dim is None or dim == -1:
        group = torch.zeros_like(ids, dtype=torch.long)
    else:
        group = _along(ids, (dim % ids.dim(),))
    return Hit(label, label, False, _pairs(ids, group))


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _fetch(gm: torch.fx.GraphModule, node: Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


class _Walk:
    def __init__(self, gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> None:
        self.gm, self.modules = gm, modules

    def value(self, a: Any, states: dict[Node, torch.Tensor]) -> Any:
        """An argument of a layout op: the ids, a constant, or a parameter's own tensor."""
        if not isinstance(a, Node):
            return a
        if a in states:
            return states[a]
        if a.op == "get_attr":
            return _fetch(self.gm, a)
        raise Blocked(f"{describe(a, self.modules)} is computed in forward")

    def normaliser(self, node: Node, ids: torch.Tensor, label: str) -> Hit | None:
        target = node.target
        if node.op == "call_function" and target in (F.batch_norm, torch.batch_norm):
            training = _arg(node, 5, "training", False)
            if training is not True:
                raise Blocked(f"{label} does not use batch statistics (training=True)")
            if ids.dim() < 2:
                raise Blocked(f"{label} normalises a {ids.dim()}-D layout")
            return Hit(label, label, False, _pairs(ids, _along(ids, (1,))))
        if node.op == "call_function" and target is torch._weight_norm:
            dim = _arg(node, 2, "dim", 0)
            if not isinstance(dim, int):
                raise Blocked(f"the dim of {label} is computed in forward")
            return dim_hit(ids, dim, label)
        if node.op == "call_function" and target is F.normalize:
            dim, p = _arg(node, 2, "dim", 1), _arg(node, 1, "p", 2.0)
            if not isinstance(dim, int) or not isinstance(p, (int, float)) or p <= 0:
                raise Blocked(f"the dim or p of {label} is computed in forward")
            d = dim % ids.dim()
            return Hit(
                label, label, False, _pairs(ids, _along(ids, tuple(set(range(ids.dim())) - {d})))
            )
        op: Any = None
        if node.op == "call_function":
            op = norm_function(node, label)
        elif node.op == "call_module":
            op = norm_module(node, self.modules[node.target], label)
        if isinstance(op, str):
            raise Blocked(op)
        if isinstance(op, NormOp):
            if not op.normalising:
                raise Blocked(f"{label} is frozen (running statistics): an affine map")
            try:
                group = op.groups(ids, False)
            except ValueError as exc:
                raise Blocked(f"at {label}: {exc}") from None
            return Hit(op.name, label, False, _pairs(ids, group))
        return None

    def step(self, node: Node, states: dict[Node, torch.Tensor], hits: list[Hit]) -> None:
        label = describe(node, self.modules)
        if node.op == "output":
            raise Blocked("it reaches the model output before being normalised")
        if isinstance(classify(node, self.modules), ShapeQuery):
            return
        found: list[Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        shape_only = _SHAPE_ONLY.get(node.target) if node.op == "call_method" else None
        if (
            shape_only is not None
            and len(node.args) > shape_only
            and node.args[shape_only] in found
        ):
            found.remove(node.args[shape_only])  # x.reshape_as(weight): a shape only
        tracked = [n for n in found if n in states]
        if not tracked:
            return
        first = node.args[0] if node.args else None
        if first not in states or len(tracked) > 1:
            raise Blocked(f"it is combined with another tensor at {label}")
        ids = states[first]
        hit = self.normaliser(node, ids, label)
        if hit is not None:
            hits.append(hit)
            return
        if node.op == "call_method" and node.target in _SAME_METHODS:
            states[node] = ids
        elif (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
            node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS
        ):
            if any(isinstance(a, torch.dtype) for a in node.args[1:]):
                raise Blocked(f"{label} reinterprets its bytes")
            args = [self.value(a, states) for a in node.args]
            kwargs = {k: self.value(v, states) for k, v in node.kwargs.items()}
            fn = getattr(ids, node.target) if node.op == "call_method" else node.target
            try:
                states[node] = (
                    fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
                )
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise Blocked(f"at {label}: cannot follow the layout: {exc}") from None
        elif node.op == "call_function" and node.target in _NUMBER_SCALES:
            other = _arg(node, 1, "other")
            if not isinstance(other, (int, float)) or isinstance(other, bool) or other == 0:
                raise Blocked(f"it is combined with another tensor at {label}")
            states[node] = ids
        else:
            raise Blocked(f"it reaches {label} before being normalised")


def follow_weight(
    gm: torch.fx.GraphModule,
    modules: dict[str, nn.Module],
    sources: list[Node],
    shape: tuple[int, ...],
) -> list[Hit]:
    """The normalisers the parameter fetched by ``sources`` (get_attr nodes) reaches before
    any other use; :class:`Blocked` when a path goes anywhere else."""
    rows = shape[0]
    ids = torch.arange(rows, dtype=torch.long).reshape((rows,) + (1,) * (len(shape) - 1))
    states: dict[Node, torch.Tensor] = {s: ids.expand(shape) for s in sources}
    hits: list[Hit] = []
    walk = _Walk(gm, modules)
    for node in gm.graph.nodes:
        if node not in states and any(a in states for a in node.all_input_nodes):
            walk.step(node, states, hits)
    if not hits:
        raise Blocked("it is not normalised")
    return hits
