"""Rank evidence: how many dimensions a node's output has, from the traced graph alone.

A Linear puts its output channel on the LAST dimension, so whether its rows reach a
BatchNorm1d channel by channel depends on the rank of its input (2-D: yes; 3-D ``(N, C, L)``:
BatchNorm1d normalises dim 1, not the Linear's outputs). Without ``example_inputs`` the
dataflow analysis asks :class:`Ranks` for that rank, and refuses the weight when it is
unknown. The rules are exact for every op they name, with one documented assumption: a k-d
convolution's output is batched, ``k + 2`` dims (the analysis assumes batched inputs,
BatchNorm needs a batch). A model input (placeholder) has an unknown rank. Examples of
evidence: ``x.flatten(1)`` / ``nn.Flatten()`` / ``torch.flatten(x, 1)`` give 2 dims whatever
``x`` is; ``x.view(n, -1)`` and ``x.reshape(a, b, c)`` have as many dims as sizes given;
``BatchNorm2d`` only takes 4-D inputs; ReLU, pooling, dropout and casts keep the rank.

>>> import torch.fx, torch.nn as nn
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU()))
>>> ranks = Ranks(dict(gm.named_modules()))
>>> [ranks.of(n) for n in gm.graph.nodes if n.op == "call_module"]
[2, 2, 2]
>>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(12, 4), nn.ReLU()))
>>> [Ranks(dict(gm.named_modules())).of(n) for n in gm.graph.nodes if n.op == "call_module"]
[None, None]
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ._ops import CONV_FUNCTIONS, CONV_MODULES, BatchNormOp, Cat, NormOp, Unary, classify

__all__ = ["Ranks"]

_SAME_RANK_FUNCTIONS = {
    torch.transpose,
    torch.permute,
    torch.movedim,
    torch.swapaxes,
    torch.swapdims,
    torch.t,
}
_SAME_RANK_METHODS = {"permute", "transpose", "transpose_", "movedim", "swapaxes", "swapdims"}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class Ranks:
    """``of(node)``: the rank of ``node``'s output when the graph proves it, else None."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._memo: dict[Node, int | None] = {}

    def of(self, node: Any) -> int | None:
        if not isinstance(node, Node):
            return None
        if node not in self._memo:
            self._memo[node] = None  # guards against cycles
            self._memo[node] = self._rank(node)
        return self._memo[node]

    # ----------------------------------------------------------------- rules
    def _flatten(self, node: Node, start: Any, end: Any) -> int | None:
        """``flatten(start, end)``: ``start + 1`` dims when ``end`` is the last one (it runs
        only on inputs of more than ``start`` dims), else from the input's rank."""
        if not (_int(start) and _int(end)):
            return None
        if start >= 0 and end == -1:
            return start + 1
        rank = self.of(node.args[0])
        if rank is None:
            return None
        if rank == 0:
            return 1
        s, e = start % rank, end % rank
        return rank - (e - s) if s <= e else None

    def _view(self, sizes: tuple[Any, ...]) -> int | None:
        """``view(*sizes)`` / ``reshape(sizes)``: one dim per size given."""
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        if len(sizes) == 1 and not _int(sizes[0]):
            return None  # a torch.Size or a dtype from the graph
        return len(sizes)

    def _mean(self, node: Node, dim: Any, keepdim: Any) -> int | None:
        rank = self.of(node.args[0])
        if rank is None or dim is None or not isinstance(keepdim, bool):
            return None
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        if not all(_int(d) for d in dims):
            return None
        return rank if keepdim else rank - len({d % rank for d in dims})

    def _sum(self, node: Node) -> int | None:
        a, b = node.args[0], _arg(node, 1, "other")
        ranks = [self.of(t) if isinstance(t, Node) else 0 for t in (a, b)]
        if not isinstance(a, Node) and not isinstance(b, Node):
            return None
        if any(isinstance(t, Node) for t in (a, b)) and None in ranks:
            return None
        return max(ranks)

    def _rank(self, node: Node) -> int | None:
        if node.op == "call_module":
            module = self.modules[node.target]
            kind = type(module)
            if kind in CONV_MODULES:
                return CONV_MODULES[kind] + 2  # batched (documented assumption)
            if kind is nn.Linear:
                return self.of(node.args[0])
            if kind is nn.Flatten:
                return self._flatten(node, module.start_dim, module.end_dim)
        elif node.op == "call_function":
            target = node.target
            if target in CONV_FUNCTIONS:
                return CONV_FUNCTIONS[target] + 2
            if target is F.linear:
                return self.of(_arg(node, 0, "input"))
            if target is torch.flatten:
                return self._flatten(
                    node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
                )
            if target is torch.reshape:
                return self._view((_arg(node, 1, "shape"),))
            if target in _SAME_RANK_FUNCTIONS:
                return self.of(node.args[0])
            if target is torch.unsqueeze:
                rank = self.of(node.args[0])
                return None if rank is None else rank + 1
            if target is torch.mean:
                return self._mean(node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
            if target in _SUMS:
                return self._sum(node)
        elif node.op == "call_method":
            name = node.target
            if name == "flatten":
                return self._flatten(
                    node, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
                )
            if name in ("view", "reshape"):
                return self._view(tuple(node.args[1:]))
            if name in _SAME_RANK_METHODS:
                return self.of(node.args[0])
            if name in ("unsqueeze", "unsqueeze_"):
                rank = self.of(node.args[0])
                return None if rank is None else rank + 1
            if name == "mean":
                return self._mean(node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        else:
            return None
        op = classify(node, self.modules)
        if isinstance(op, BatchNormOp):
            if op.ranks is not None and len(op.ranks) == 1:
                return op.ranks[0]  # BatchNorm2d takes 4-D inputs only
            return self.of(_arg(node, 0, "input"))
        if isinstance(op, NormOp):  # GroupNorm, LayerNorm ... keep their input's shape
            return self.of(_arg(node, 0, "input"))
        if isinstance(op, Unary) and op.keeps_channels:  # ReLU, pooling, dropout, casts ...
            return self.of(_arg(node, op.data_index, "input"))
        if isinstance(op, Cat):
            ranks = {self.of(t) for t in op.tensors}
            known = ranks - {None}
            return known.pop() if len(known) == 1 else None
        return None
