"""Find the weights whose rows are scale invariant, from the model's traced dataflow.

Row ``i`` of a conv/linear weight ``W`` is scale invariant when every path from output
channel ``i`` reaches a BatchNorm channel through operations ``f`` with ``f(a z) = a f(z)``
(``a > 0``, channel by channel) and nothing is added to or multiplied into it on the way
(docs/design.md, "Which weights are scale invariant"). Then
``BN(layer_{a W}(x)) == BN(layer_W(x))`` for every per-row scale
``a > 0``, and the rows are points of G(1, n). A bias that feeds the BatchNorm directly is
removed by the BN mean; a bias followed by ReLU is not.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> {name: f.invariant for name, f in find_scale_invariant(net).items()}
{'0.weight': True, '3.weight': False}
>>> find_scale_invariant(net)["3.weight"].reason
'its output reaches the model output without a BatchNorm'
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import geoopt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..manifold import Grassmann1, is_grassmann1
from ._blocks import partition_verdict
from ._ops import Blocked, describe
from ._propagate import CONV_FUNCTIONS, CONV_MODULES, Propagation, arg, fetch
from ._trace import propagate_shapes, trace
from ._weightpath import NOT_A_DIRECTION, dim_hit, direction_dim, follow_weight

__all__ = ["Finding", "Plan", "analyse", "find_scale_invariant", "is_grassmann1"]

_TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TRANSPOSED_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@dataclass(frozen=True)
class Finding:
    """What the dataflow analysis found about one weight (``find_scale_invariant``).

    ``invariant``: EACH output row is scale invariant on its own -- every row reaches
    normaliser groups that hold that row only (BatchNorm channels, InstanceNorm, ...)
    through operations that commute with positive scaling (over all the weight's uses);
    then ``W`` is ``rows`` points of G(1, ``row_length``). ``reason`` says why or why not.
    ``points``: the number of blocks of the finest partition of the rows into blocks of
    consecutive rows that are each scale invariant (``W.reshape(points, -1)[k]`` times any
    ``a_k > 0`` leaves the output unchanged): ``rows`` when ``invariant``; fewer behind a
    normaliser of several channels jointly (``G`` behind ``GroupNorm(G, C)``, 1 behind a
    LayerNorm over all channels, one per head behind a QK-norm); 0 when no such partition
    exists. A weight with ``0 < points < rows`` is NOT ``invariant`` (``invariant`` keeps
    its meaning, each row a point); it is converted onto
    :class:`~rbn_geoopt.manifold.Grassmann1Blocks` ``(points)``, each block one point
    (docs/design.md, "Which weights are scale invariant").
    ``rows`` / ``row_length``: fan-out ``p`` and fan-in ``n``. ``tied``: the same Parameter
    is used more than once (several modules or calls). ``converted``: already a
    ``ManifoldParameter`` on :class:`Grassmann1`. ``batchnorms``: the BatchNorm modules its
    rows reach; ``normalisers``: every normaliser they reach (BatchNorms included), or
    that normalises the weight itself (weight standardisation, ``weight_norm``).
    ``manifold``: the name of another manifold the weight is already on (then it is left
    alone).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 4), nn.BatchNorm1d(4))
    >>> f = find_scale_invariant(net)["1.weight"]
    >>> f.invariant, f.points, f.wide, f.selected(), f.selected(all_shapes=True)
    (True, 4, False, False, True)
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(2, 8))
    >>> f = find_scale_invariant(net)["0.weight"]
    >>> f.invariant, f.points, f.point_length, f.wide, f.selected()
    (False, 2, 108, True, True)
    >>> print(f.reason.split("; ")[0])
    its rows are scale invariant jointly in 2 blocks of 4 (GroupNorm '1')
    """

    name: str
    invariant: bool
    reason: str
    rows: int
    row_length: int
    tied: bool = False
    converted: bool = False
    batchnorms: tuple[str, ...] = ()
    manifold: str | None = None
    #: blocks of consecutive rows that are each scale invariant (None: ``rows`` when
    #: ``invariant``, else 0)
    points: int | None = None
    normalisers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.points is None:
            object.__setattr__(self, "points", self.rows if self.invariant else 0)
        points = self.points
        if not 0 <= points <= self.rows or (points and self.rows % points):
            raise ValueError(f"Finding '{self.name}': points={points} does not divide rows")
        if self.invariant != (points == self.rows and points > 0):
            raise ValueError(
                f"Finding '{self.name}': invariant={self.invariant} needs points == rows"
            )

    @property
    def point_length(self) -> int:
        """``n`` of one point: ``row_length`` for row points, ``rows / points * row_length``
        for blocks (``row_length`` when ``points == 0``)."""
        if self.points in (0, self.rows):
            return self.row_length
        return self.rows // self.points * self.row_length

    @property
    def wide(self) -> bool:
        """Fewer points than entries per point (``p < n``), the paper's condition for
        G(1, n) (its orthogonality target exists): fan-out below fan-in for row points."""
        return (self.points or self.rows) < self.point_length

    def selected(self, all_shapes: bool = False) -> bool:
        """Whether ``to_grassmann(all_shapes=...)`` puts this weight on G(1, n) by itself:
        scale invariant row by row (``points == rows``) or in blocks of rows
        (``0 < points < rows``), not tied, not on another manifold, and ``wide`` unless
        ``all_shapes``."""
        if self.converted:
            return True
        return (
            self.points > 0
            and not self.tied
            and self.manifold is None
            and self.point_length >= 2
            and (all_shapes or self.wide)
        )

    def __str__(self) -> str:
        tags = [f"{self.rows}x{self.row_length}"]
        tags += ["tied"] * self.tied + ["converted"] * self.converted
        if self.invariant:
            verdict = "scale invariant"
        elif self.points:
            count = self.points
            verdict = f"scale invariant in {count} block" + ("s" if count != 1 else "")
        else:
            verdict = "not scale invariant"
        return f"{self.name} [{', '.join(tags)}]: {verdict}: {self.reason}"


@dataclass
class _Use:
    """One use of a parameter in the graph: as the rows of a conv/linear, its bias, other."""

    node: Node
    role: str  # "rows", "bias" or "other"
    why: str = ""
    conv_dims: int = 0  # k of a k-d convolution; 0 for linear
    bias: nn.Parameter | None = None
    source: Node | None = None  # the get_attr node a functional use reads it from
    norm_dim: Any = None  # role "direction": the dim of its weight_norm


@dataclass
class Plan:
    """Where one weight lives (every module attribute it is stored under, so that the
    conversion replaces it everywhere) and the biases its rows use (internal)."""

    param: nn.Parameter
    places: list[tuple[nn.Module, str]]
    biases: list[nn.Parameter] = field(default_factory=list)


def _places(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every (name, owning module, attribute) under which each parameter object lives."""
    places: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        prefix, _, attr = name.rpartition(".")
        places[id(param)].append((name, model.get_submodule(prefix), attr))
    return places


def _functional_uses(node: Node, user: Node, modules: dict[str, nn.Module], gm) -> _Use:
    """How ``user`` uses the parameter fetched by the get_attr ``node``."""
    use = _functional_use(node, user, modules, gm)
    use.source = node
    return use


def _functional_use(node: Node, user: Node, modules: dict[str, nn.Module], gm) -> _Use:
    label = describe(user, modules)
    row_fn = user.op == "call_function" and (
        user.target in CONV_FUNCTIONS or user.target is F.linear
    )
    if row_fn and arg(user, 1, "weight") is node:
        bias = arg(user, 2, "bias")
        if isinstance(bias, Node) and bias.op != "get_attr":
            return _Use(user, "other", f"the bias given to {label} is computed in forward")
        param = fetch(gm, bias.target) if isinstance(bias, Node) else None
        return _Use(user, "rows", conv_dims=CONV_FUNCTIONS.get(user.target, 0), bias=param)
    if row_fn and arg(user, 2, "bias") is node:
        return _Use(user, "bias")
    if user.op == "call_function" and user.target in _TRANSPOSED_FUNCTIONS:
        return _Use(user, "other", f"{label} is a transposed convolution (rows are inputs)")
    return _Use(user, "other", f"it is used by {label}")


def _param_uses(gm: GraphModule, modules: dict[str, nn.Module]) -> dict[int, list]:
    uses: dict[int, list[_Use]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            label = describe(node, modules)
            kind = type(module)
            rows_layer = kind in CONV_MODULES or kind is nn.Linear
            for pname, param in module.named_parameters(remove_duplicate=False):
                dim = direction_dim(module, pname)
                if dim is not NOT_A_DIRECTION:
                    why = (
                        f"it is the direction of weight_norm in {label} and is also used elsewhere"
                    )
                    uses[id(param)].append(_Use(node, "direction", why, norm_dim=dim))
                elif rows_layer and pname == "weight":
                    dims = CONV_MODULES.get(kind, 0)
                    uses[id(param)].append(_Use(node, "rows", conv_dims=dims, bias=module.bias))
                elif rows_layer and pname == "bias":
                    uses[id(param)].append(_Use(node, "bias"))
                elif isinstance(module, _TRANSPOSED_MODULES):
                    why = f"{label} is a transposed convolution: its rows (dim 0) are inputs"
                    uses[id(param)].append(_Use(node, "other", why))
                else:
                    uses[id(param)].append(_Use(node, "other", f"it is used by {label}"))
        elif node.op == "get_attr":
            value = fetch(gm, node.target)
            if isinstance(value, nn.Parameter):
                for user in node.users:
                    uses[id(value)].append(_functional_uses(node, user, modules, gm))
    return uses


def _manifold_name(param: nn.Parameter) -> str | None:
    """The manifold of an already-manifold parameter other than Grassmann1 / Euclidean."""
    if isinstance(param, (geoopt.ManifoldParameter, geoopt.ManifoldTensor)):
        manifold = param.manifold
        if not isinstance(manifold, (Grassmann1, geoopt.Euclidean)):
            return type(manifold).__name__
    return None


def _unwrap_compiled(model: nn.Module) -> tuple[nn.Module, str]:
    """The module under ``torch.compile``'s wrappers, and the prefix they add to names."""
    from torch._dynamo.eval_frame import OptimizedModule

    prefix = ""
    while isinstance(model, OptimizedModule):
        model, prefix = model._orig_mod, prefix + "_orig_mod."
    return model, prefix


@contextlib.contextmanager
def _as_trained(model: nn.Module) -> Iterator[None]:
    """Analyse a model in eval mode as ``model.train()`` will run it (a UserWarning says so):
    every BatchNorm then uses batch statistics. The training flags are restored after."""
    if model.training:
        yield
        return
    warnings.warn(
        f"{type(model).__name__} is in eval mode: analysed as model.train() will run it, every "
        "BatchNorm normalising with batch statistics; to keep some BatchNorms frozen (affine "
        "maps), call model.train() and then .eval() on those BatchNorms before the analysis",
        UserWarning,
        stacklevel=5,  # _as_trained, contextlib, analyse, the public function, the caller
    )
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def analyse(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    leaf_modules: Iterable[str] = (),
) -> tuple[dict[str, Finding], dict[str, Plan]]:
    """Findings for every weight of >= 2 dims, and how to convert each (internal).

    A ``torch.compile``'d model is analysed through its original module; names keep the
    compiled module's ``_orig_mod.`` prefix, as in its ``named_parameters()``.
    """
    inner, prefix = _unwrap_compiled(model)
    leaves = [n[len(prefix) :] if n.startswith(prefix) else n for n in leaf_modules]
    with _as_trained(inner):
        findings, plans = _analyse(inner, example_inputs, leaves)
    if not prefix:
        return findings, plans
    findings = {prefix + n: dataclasses.replace(f, name=prefix + n) for n, f in findings.items()}
    return findings, {prefix + n: plan for n, plan in plans.items()}


def _analyse(
    model: nn.Module, example_inputs: Any, leaf_modules: Iterable[str]
) -> tuple[dict[str, Finding], dict[str, Plan]]:
    gm = trace(model, leaf_modules)
    shapes = example_inputs is not None
    if shapes:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        propagate_shapes(gm, model, inputs)
    prop = Propagation(gm, shapes)
    uses = _param_uses(gm, prop.modules)
    places = _places(model)
    findings: dict[str, Finding] = {}
    plans: dict[str, Plan] = {}
    for name, param in model.named_parameters():
        if isinstance(param, nn.parameter.UninitializedParameter) or param.dim() < 2:
            continue
        p_uses = uses.get(id(param), [])
        plan = Plan(param, [(m, a) for _, m, a in places[id(param)]])
        info = dict(
            name=name,
            rows=int(param.shape[0]),
            row_length=math.prod(param.shape[1:]),
            tied=len(p_uses) > 1 or len(places[id(param)]) > 1,
            converted=is_grassmann1(param),
            manifold=_manifold_name(param),
        )
        plan.biases = _unique(u.bias for u in p_uses if u.role == "rows" and u.bias is not None)
        verdict = _verdict(param, p_uses, plan, uses, prop)
        if "normalised_uses" in verdict:  # one normalisation read through several nodes
            info["tied"] = verdict.pop("normalised_uses") > 1 or len(places[id(param)]) > 1
        findings[name] = Finding(**info, **verdict)
        plans[name] = plan
    return findings, plans


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _verdict(param, p_uses: list[_Use], plan: Plan, uses, prop: Propagation) -> dict:
    if not p_uses:
        return dict(invariant=False, reason="it is not used by the traced forward")
    normalised = _normalised_weight(param, p_uses, prop)
    if normalised is not None:
        return normalised
    other = next((u for u in p_uses if u.role != "rows"), None)
    if other is not None:
        why = other.why or "it is also used as a bias"
        return dict(invariant=False, reason=why)
    nodes = {u.node for u in p_uses}
    for bias in plan.biases:
        if any(u.role != "bias" or u.node not in nodes for u in uses[id(bias)]):
            return dict(invariant=False, reason="its bias is also used elsewhere")
    unknown = _unknown_ranks(p_uses, prop)
    if not unknown:
        return _follow(param, p_uses, prop, {})
    # A Linear's input rank decides where its rows land; without evidence try 2-D and 3-D:
    # a reason that holds for both is reported, anything else is refused (issue 12, item 5).
    tries = [_follow(param, p_uses, prop, dict.fromkeys(unknown, rank)) for rank in (2, 3)]
    if not any(t["invariant"] or t.get("points") for t in tries) and (
        tries[0]["reason"] == tries[1]["reason"]
    ):
        return tries[0]
    label = describe(unknown[0], prop.modules)
    return dict(
        invariant=False,
        reason=(
            f"the rank of the input of {label} is unknown, and where its rows land at a "
            "BatchNorm depends on it (a 3-D input (N, C, L) puts them on dim -1, BatchNorm1d "
            "normalises dim 1): pass example_inputs=..., or flatten its input to 2-D first "
            "(nn.Flatten(), x.flatten(1), x.view(x.size(0), -1))"
        ),
    )


def _normalised_weight(param, p_uses: list[_Use], prop: Propagation) -> dict | None:
    """The verdict for a weight normalised itself before any use (weight_norm's direction,
    weight standardisation, ``F.normalize``), or None when it is not (docs/design.md)."""
    rows = int(param.shape[0])
    if all(u.role == "direction" for u in p_uses):
        ids = torch.arange(rows).reshape((rows,) + (1,) * (param.dim() - 1)).expand(param.shape)
        hits = [
            dim_hit(ids, u.norm_dim, f"weight_norm in {describe(u.node, prop.modules)}")
            for u in p_uses
        ]
        per_row = f"it is the direction of {hits[0].label}, normalised row by row"
    elif all(u.role == "other" and u.source is not None for u in p_uses):
        sources = list(dict.fromkeys(u.source for u in p_uses))
        try:
            hits = follow_weight(prop.gm, prop.modules, sources, tuple(param.shape))
        except Blocked:
            return None
        labels = ", ".join(dict.fromkeys(h.label for h in hits))
        per_row = f"it is normalised row by row before use ({labels})"
    else:
        return None
    found = dict(normalisers=tuple(dict.fromkeys(h.name for h in hits)), normalised_uses=len(hits))
    return partition_verdict(rows, hits, per_row) | found


def _unknown_ranks(p_uses: list[_Use], prop: Propagation) -> list[Node]:
    """The linear uses whose input rank neither shapes nor the graph fix."""
    if prop.shapes:
        return []
    return [u.node for u in p_uses if u.conv_dims == 0 and prop.ranks.of(_input(u.node)) is None]


def _input(node: Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _follow(param, p_uses: list[_Use], prop: Propagation, assumed: dict) -> dict:
    """The verdict from following every use; ``assumed``: input ranks taken for linears."""
    try:
        seeds = {}
        for u in p_uses:
            rank = assumed.get(u.node, prop.ranks.of(_input(u.node))) if not u.conv_dims else None
            seeds[u.node] = prop.seed(u.node, int(param.shape[0]), u.conv_dims, rank)
    except Blocked as exc:
        return dict(invariant=False, reason=str(exc))
    affine = {u.node: u.bias is not None for u in p_uses}
    outcome = prop.run(seeds, affine)
    if not outcome.complete:
        return dict(invariant=False, reason=outcome.reason)
    if not outcome.hits:
        return dict(invariant=False, reason="its output reaches no BatchNorm")
    names = tuple(dict.fromkeys(h.name for h in outcome.hits if h.batchnorm))
    found = dict(batchnorms=names, normalisers=tuple(dict.fromkeys(h.name for h in outcome.hits)))
    if outcome.bias_issue is not None:
        return dict(invariant=False, reason=outcome.bias_issue, **found)
    per_row = (
        "it feeds BatchNorm " + ", ".join(f"'{n}'" for n in names)
        if all(h.batchnorm for h in outcome.hits)
        else f"it feeds {', '.join(dict.fromkeys(h.label for h in outcome.hits))}"
    )
    return partition_verdict(int(param.shape[0]), outcome.hits, per_row) | found


def find_scale_invariant(
    model: nn.Module,
    *,
    example_inputs: torch.Tensor | tuple[Any, ...] | None = None,
    leaf_modules: Iterable[str] = (),
) -> dict[str, Finding]:
    """Analyse ``model`` without changing it: one :class:`Finding` per weight (>= 2 dims).

    Traces the model with torch.fx and follows every conv/linear weight's output rows
    through the graph. Keys are parameter names as in ``model.named_parameters()``.

    A BatchNorm counts when it normalises with batch statistics: any ``_BatchNorm``
    subclass in training mode or without running statistics, or ``F.batch_norm`` with
    ``training=True``; a frozen one (eval mode, running statistics) is an affine map and
    blocks. A model in eval mode is analysed as ``model.train()`` will run it, with a
    ``UserWarning``. A ``torch.compile``'d model is analysed through ``_orig_mod``.

    The analysis assumes batched inputs (a k-d conv output has ``k + 2`` dims, channel at
    dim 1). Without ``example_inputs`` it is structural: a Linear puts its rows on the LAST
    dim, so it counts only when the graph proves its input rank (``nn.Flatten()``,
    ``x.flatten(1)``, ``x.view(n, -1)`` ... before it; a 3-D ``(N, C, L)`` input to
    ``Linear -> BatchNorm1d`` is not invariant, BatchNorm1d normalising dim 1); otherwise
    the reason says to pass ``example_inputs``. A reshape/flatten is accepted only when the
    BatchNorm's channel count proves it keeps the channels. With ``example_inputs`` (a
    tensor or a tuple of forward arguments; run once in eval mode under ``no_grad``, flags
    and buffers restored) every layout is checked on the real shapes.
    Other normalisers make rows invariant in blocks (``Finding.points``): GroupNorm,
    LayerNorm / RMSNorm (over the channels, per head or over other dims), InstanceNorm, and
    a weight normalised itself before use (weight standardisation, ``F.normalize``,
    ``weight_norm``'s direction); see docs/design.md, "Beyond BatchNorm: blocks of rows".
    ``leaf_modules``: names of submodules to keep opaque (not traced into; their outputs
    block), for models with an untraceable part.

    Raises :class:`UntraceableModelError` when torch.fx cannot trace the model.

    >>> bare = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    >>> find_scale_invariant(bare)["0.weight"].invariant
    False
    >>> find_scale_invariant(bare, example_inputs=torch.randn(2, 8))["0.weight"].invariant
    True

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> print(find_scale_invariant(net)["1.weight"])
    1.weight [4x8]: scale invariant: it feeds BatchNorm '2'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_scale_invariant: expected an nn.Module, got {type(model).__name__}")
    return analyse(model, example_inputs=example_inputs, leaf_modules=leaf_modules)[0]
