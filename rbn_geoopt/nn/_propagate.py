"""Follow one weight's output rows through a traced graph to the normalisers they reach.

The state carried along is a *channel-id tensor* laid out like the activation: at each
position, the weight row that produced it (``-1``: another source). :mod:`._ops` says how each
node maps it; a BatchNorm ends a path after checking that each of its channels is fed by one
row only, and records that row per channel; another normaliser (:mod:`._norms`) ends it after
checking that each of its groups is fed by the weight's rows only, and records the rows of
each group (a :class:`Hit`). Any blocking node stops the walk with a reason
(:class:`._ops.Blocked`).

Without recorded shapes (no ``example_inputs``) the ids are *collapsed*: size 1 on every
dimension but the channel one, a k-d convolution's output is taken as batched
``(1, C, 1, ..., 1)`` and a linear output as ``(1, ..., 1, C)`` with the rank of its input,
from :mod:`._rank` (the caller refuses a linear whose rank the graph does not fix); a frozen
BatchNorm (running statistics) is an affine map and blocks; channel counts of other tensors
entering a concatenation come from layer attributes (:meth:`Propagation.static_channels`).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ._ops import (
    CONV_FUNCTIONS,
    CONV_MODULES,
    BatchNormOp,
    Blocked,
    Cat,
    NormOp,
    Other,
    ShapeQuery,
    Unary,
    classify,
    describe,
)
from ._rank import Ranks
from ._trace import node_shape

__all__ = ["CONV_FUNCTIONS", "CONV_MODULES", "Hit", "Outcome", "Propagation", "arg", "fetch"]

_SUM_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}


@dataclass
class _State:
    ids: torch.Tensor  # which row feeds each position (-1: another source)
    affine: bool  # a bias is still riding on the values


@dataclass(frozen=True)
class Hit:
    """One normaliser a weight's rows reach, and which rows it normalises jointly."""

    name: str
    label: str
    batchnorm: bool
    #: ``(group, row)`` pairs, int64 ``(m, 2)``: the rows normalised in each group (rows
    #: that share a group are scale invariant only jointly)
    pairs: torch.Tensor


@dataclass
class Outcome:
    complete: bool
    reason: str
    bias_issue: str | None = None
    hits: list[Hit] = field(default_factory=list)


def fetch(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def arg(node: Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


class Propagation:
    """Follows the rows of one weight through the graph (all its uses at once)."""

    def __init__(self, gm: torch.fx.GraphModule, shapes: bool) -> None:
        self.gm = gm
        self.shapes = shapes
        self.modules = dict(gm.named_modules())
        calls = Counter()
        for node in gm.graph.nodes:
            if node.op in ("call_module", "call_function"):
                op = classify(node, self.modules)
                if isinstance(op, (BatchNormOp, NormOp)) and op.key is not None:
                    calls[op.key] += 1
        self.calls = calls
        self._channels: dict[Node, int | None] = {}
        self.ranks = Ranks(self.modules)

    # ----------------------------------------------------------------- seeds
    def seed(self, node: Node, rows: int, conv_dims: int, rank: int | None = None) -> torch.Tensor:
        """Row ids at the layer output: channel dim -(k+1) for a k-d conv, -1 for linear.

        Without shapes a k-d conv output is batched, ``(1, C, 1, ..., 1)``, and a linear
        output has ``rank`` dims, ``(1, ..., 1, C)`` (the caller gives the rank of its input,
        from :meth:`static_rank` or an assumption it checks).
        """
        trailing = (1,) * conv_dims
        ids = torch.arange(rows, dtype=torch.int32).reshape((rows,) + trailing)
        shape = node_shape(node) if self.shapes else None
        if shape is None:
            if self.shapes:
                raise Blocked(f"no shape was recorded for {describe(node, self.modules)}")
            if conv_dims:
                return ids.unsqueeze(0)
            if rank is None or rank < 1:
                raise Blocked(f"the rank of the input of {describe(node, self.modules)} is unknown")
            return ids.reshape((1,) * (rank - 1) + (rows,))
        if len(shape) < conv_dims + 1 or shape[-(conv_dims + 1)] != rows:
            raise Blocked(f"{describe(node, self.modules)} has an unexpected output shape")
        return ids.expand(shape)

    # ------------------------------------------------------------- channels
    def static_channels(self, node: Any) -> int | None:
        """Dim-1 size of ``node``'s output from layer attributes (no shapes), or None."""
        if not isinstance(node, Node):
            return None
        if node not in self._channels:
            self._channels[node] = None  # guards against cycles
            self._channels[node] = self._static_channels(node)
        return self._channels[node]

    def _static_channels(self, node: Node) -> int | None:
        if node.op == "call_module":
            module = self.modules[node.target]
            kind = type(module)
            if kind in CONV_MODULES:
                return module.out_channels
            if kind is nn.Linear:
                return module.out_features if self.ranks.of(node) == 2 else None
        if node.op == "call_function":
            linear = node.target is F.linear
            if node.target in CONV_FUNCTIONS or linear:
                weight = arg(node, 1, "weight")
                if linear and self.ranks.of(node) != 2:
                    return None
                if isinstance(weight, Node) and weight.op == "get_attr":
                    return int(fetch(self.gm, weight.target).shape[0])
                return None
            if node.target in _SUM_FUNCTIONS:
                first = self.static_channels(node.args[0])
                return first if first is not None else self.static_channels(node.args[1])
        op = classify(node, self.modules)
        if isinstance(op, BatchNormOp):
            return op.channels
        if isinstance(op, NormOp):
            return self.static_channels(arg(node, 0, "input"))
        if isinstance(op, Unary) and op.keeps_channels:
            return self.static_channels(arg(node, op.data_index, "input"))
        if isinstance(op, Cat) and op.dim in (1,):
            sizes = [self.static_channels(t) for t in op.tensors]
            return None if None in sizes else sum(sizes)
        return None

    # ------------------------------------------------------------------- run
    def run(self, seeds: dict[Node, torch.Tensor], affine: dict[Node, bool]) -> Outcome:
        states = {node: _State(ids, affine[node]) for node, ids in seeds.items()}
        outcome = Outcome(complete=True, reason="")
        try:
            for node in self.gm.graph.nodes:
                if any(a in states for a in node.all_input_nodes):
                    self._step(node, seeds, states, outcome)
        except Blocked as exc:
            outcome.complete = False
            outcome.reason = str(exc)
        return outcome

    def _step(self, node: Node, seeds, states: dict[Node, _State], outcome: Outcome) -> None:
        if node in seeds:
            raise Blocked(f"its output feeds {describe(node, self.modules)}, another use of it")
        if node.op == "output":
            raise Blocked("its output reaches the model output without a BatchNorm")
        op = classify(node, self.modules)
        if isinstance(op, ShapeQuery):
            return
        if isinstance(op, Other):
            raise Blocked(f"its output reaches {op.label} before any BatchNorm")
        if isinstance(op, Cat):
            states[node] = self._cat(node, op, states)
            return
        data = arg(node, op.data_index if isinstance(op, Unary) else 0, "input")
        tracked = [a for a in _flat_nodes(node) if a in states]
        if data not in states or len(tracked) > 1:
            raise Blocked(f"its output is combined with another tensor at {op.label}")
        state = states[data]
        if isinstance(op, BatchNormOp):
            if not op.normalising:
                raise Blocked(
                    f"its output reaches frozen BatchNorm {op.label} (eval mode: running "
                    "statistics, no batch statistics), which is an affine map, not a normaliser"
                )
            outcome.hits.append(self._batchnorm(node, op, state))
            return
        if isinstance(op, NormOp):
            outcome.hits.append(self._norm(op, state, outcome))
            return
        try:
            ids = op.transform(state.ids, self._shape(node))
        except Blocked as exc:
            raise Blocked(f"at {op.label}: {exc}") from None
        except (IndexError, RuntimeError, TypeError, ValueError) as exc:
            hint = "" if self.shapes else " (layout assumed: pass example_inputs=... to check)"
            raise Blocked(f"at {op.label}: cannot follow the layout: {exc}{hint}") from None
        affine = state.affine
        if affine and not op.affine_ok:
            if outcome.bias_issue is None:
                outcome.bias_issue = (
                    f"its bias passes through {op.label} before the BatchNorm (a bias only "
                    "passes when it feeds the BatchNorm directly)"
                )
            affine = False
        states[node] = _State(ids, affine)

    def _shape(self, node: Node) -> tuple[int, ...] | None:
        if not self.shapes:
            return None
        shape = node_shape(node)
        if shape is None:
            raise Blocked(f"no shape was recorded for {describe(node, self.modules)}")
        return shape

    def _cat(self, node: Node, op: Cat, states: dict[Node, _State]) -> _State:
        tracked = [t for t in op.tensors if isinstance(t, Node) and t in states]
        if not tracked or any(a in states for a in _flat_nodes(node) if a not in op.tensors):
            raise Blocked(f"its output is combined with another tensor at {op.label}")
        ref = states[tracked[0]].ids
        rank = ref.dim()
        if not isinstance(op.dim, int) or not -rank <= op.dim < rank:
            raise Blocked(f"{op.label} concatenates along an unknown dimension")
        dim = op.dim % rank
        pieces = []
        for t in op.tensors:
            if isinstance(t, Node) and t in states:
                pieces.append(states[t].ids)
                continue
            if self.shapes:
                shape = node_shape(t) if isinstance(t, Node) else None
                if shape is None:
                    raise Blocked(f"no shape was recorded for an input of {op.label}")
            else:
                size = self.static_channels(t) if dim == 1 else 1
                if size is None:
                    raise Blocked(
                        f"cannot tell how many channels {describe(t, self.modules)} adds at "
                        f"{op.label}: pass example_inputs=..."
                    )
                shape = ref.shape[:dim] + (size,) + ref.shape[dim + 1 :]
            pieces.append(torch.full(tuple(shape), -1, dtype=ref.dtype))
        try:
            ids = torch.cat(pieces, dim)
        except RuntimeError as exc:
            raise Blocked(f"the inputs of {op.label} do not line up: {exc}") from None
        affine = any(states[t].affine for t in tracked)
        return _State(ids, affine)

    def _batchnorm(self, node: Node, op: BatchNormOp, state: _State):
        """Check that each channel of a normalising BatchNorm is fed by one row; return its
        name, its running statistics (or None) and the row feeding each channel."""
        if op.key is not None and self.calls[op.key] > 1:
            raise Blocked(f"{op.label} is called more than once (its statistics mix inputs)")
        ids = state.ids
        if ids.dim() < 2 or (op.ranks is not None and ids.dim() not in op.ranks):
            raise Blocked(f"{op.label} would normalise a {ids.dim()}-D layout of it")
        channels = op.channels
        if channels is None:
            if not self.shapes:
                raise Blocked(
                    f"cannot tell how many channels {op.label} has: pass example_inputs=..."
                )
            channels = int(ids.shape[1])
        if ids.shape[1] != channels:
            raise Blocked(
                f"{op.label} has {channels} channels where the traced layout has {ids.shape[1]} "
                "(a flatten/reshape changes them: pass example_inputs=... to check it)"
            )
        flat = ids.movedim(1, 0).reshape(channels, -1)
        rows = flat[:, 0]
        if not bool((flat == rows[:, None]).all()):
            raise Blocked(f"a channel of {op.label} is fed by more than one row")
        fed = rows >= 0
        channels_fed = torch.arange(channels, dtype=torch.long)[fed]
        return Hit(op.name, op.label, True, torch.stack([channels_fed, rows[fed].long()], 1))

    def _norm(self, op: NormOp, state: _State, outcome: Outcome) -> Hit:
        """Check that each group of a normaliser holds the weight's rows only (or none of
        them); return the rows of each group. A bias riding on the values survives unless
        the normaliser subtracts a mean over groups that each hold a single row."""
        if not op.normalising:
            raise Blocked(
                f"its output reaches frozen {op.label} (eval mode: running statistics), "
                "which is an affine map, not a normaliser"
            )
        if op.key is not None and self.calls[op.key] > 1:
            raise Blocked(f"{op.label} is called more than once (its statistics mix inputs)")
        try:
            group = op.groups(state.ids, not self.shapes)
        except ValueError as exc:
            hint = "" if self.shapes else " (layout assumed: pass example_inputs=... to check)"
            raise Blocked(f"at {op.label}: {exc}{hint}") from None
        ids = state.ids.reshape(-1).long()
        span = int(ids.max()) + 2 if ids.numel() else 1  # ids run from -1
        keys = torch.unique(group.reshape(-1) * span + ids + 1)  # one 1-D sort, not dim=0
        pairs = torch.stack([keys // span, keys % span - 1], 1)
        fed = pairs[:, 1] >= 0
        mixed = set(pairs[fed, 0].tolist()) & set(pairs[~fed, 0].tolist())
        if mixed:
            raise Blocked(
                f"{op.label} normalises some of its rows jointly with another source (a "
                "group holds both)"
            )
        pairs = pairs[fed]
        if state.affine and outcome.bias_issue is None:
            sizes = torch.bincount(pairs[:, 0]) if len(pairs) else torch.zeros(0)
            if not op.centres:
                outcome.bias_issue = (
                    f"its bias reaches {op.label}, which does not subtract a mean, so the bias "
                    "is not cancelled (a bias breaks the scale invariance of the weight alone)"
                )
            elif bool((sizes > 1).any()):
                outcome.bias_issue = (
                    f"its bias reaches {op.label}, which normalises several of its rows "
                    "jointly: the group mean does not cancel a per-channel bias (a bias breaks "
                    "the scale invariance of the weight alone)"
                )
        return Hit(op.name, op.label, False, pairs)


def _flat_nodes(node: Node) -> list[Node]:
    """Every node occurrence in ``node``'s args and kwargs (repeats kept)."""
    found: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found
