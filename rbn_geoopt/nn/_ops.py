"""How each traced operation moves a weight's output rows towards a BatchNorm.

The dataflow analysis (:mod:`rbn_geoopt.nn.dataflow`) follows a weight's output through the
torch.fx graph carrying a *channel-id tensor*: an integer tensor laid out like the activation,
holding at each position the weight row that produced it (``-1``: another source). Every graph
node is classified here into one of:

* :class:`Unary` -- one tensor in, one out, commuting with positive per-channel scaling
  ``f(a z) = a f(z)`` (ReLU, LeakyReLU, PReLU, dropout, pooling, ``mean`` over given dims,
  flatten/reshape/permute, multiplication by a Python number). ``transform`` maps the id
  tensor through the op; ``affine_ok`` says whether a per-channel constant (the layer's
  bias) also commutes (max pooling: yes, ReLU: no);
* :class:`Cat` -- concatenation (DenseNet);
* :class:`BatchNormOp` -- a BatchNorm: the end of a path when it normalises with batch
  statistics (any ``_BatchNorm`` module in training mode or without running statistics, a
  functional ``batch_norm`` with ``training=True``); a frozen one (running statistics) is a
  per-channel affine map and blocks;
* :class:`._norms.NormOp` -- GroupNorm, LayerNorm, RMSNorm, InstanceNorm (modules and
  ``F.group_norm`` / ``F.layer_norm`` / ``F.rms_norm``): the end of a path, normalising
  groups of positions jointly (:mod:`._norms`);
* :class:`ShapeQuery` -- reads only metadata (``x.size(0)``, ``x.shape``): not a data path;
* :class:`Other` -- anything else (sums, products of tensors, sigmoid, GELU, slicing, the
  model output ...): blocks.

In *collapsed* mode (no example inputs) the id tensor has size 1 on every dimension but the
channel one; shape-dependent ops that cannot be checked that way are refused with a reason
that suggests ``example_inputs``.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Node

from ._norms import NormOp, norm_function, norm_module

__all__ = [
    "CONV_FUNCTIONS",
    "CONV_MODULES",
    "Blocked",
    "BatchNormOp",
    "NormOp",
    "Cat",
    "Other",
    "ShapeQuery",
    "Unary",
    "classify",
    "describe",
]

#: convolutions and their number of spatial dims k (a batched output has k + 2 dims)
CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

Shape = tuple[int, ...] | None
Transform = Callable[[torch.Tensor, Shape], torch.Tensor]


class Blocked(Exception):
    """Raised while propagating: the weight's rows are not carried to a BatchNorm here."""


@dataclass(frozen=True)
class Unary:
    label: str
    transform: Transform
    affine_ok: bool
    data_index: int = 0
    #: True when dim 1 (the channel dim of a batched activation) is left where it is
    keeps_channels: bool = True


@dataclass(frozen=True)
class Cat:
    label: str
    tensors: tuple[Any, ...]
    dim: Any


@dataclass(frozen=True)
class BatchNormOp:
    """A batch norm call: a ``_BatchNorm`` module (any subclass) or a functional one."""

    label: str
    #: the name reported in ``Finding.batchnorms`` (module name, or owner of its statistics)
    name: str
    #: the number of channels, when known from the module or its parameters
    channels: int | None
    #: the input ranks it accepts (None: any rank >= 2)
    ranks: tuple[int, ...] | None
    #: normalises with batch statistics (else frozen: an affine map)
    normalising: bool
    #: an object with ``running_mean`` / ``running_var`` (the module), or None
    stats: Any
    #: identifies the statistics for the "called more than once" check (None: no check)
    key: int | None


@dataclass(frozen=True)
class ShapeQuery:
    label: str


@dataclass(frozen=True)
class Other:
    label: str


_BATCHNORM_FUNCTIONS = {F.batch_norm, torch.batch_norm}

# ------------------------------------------------------------------ transforms


def _identity(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
    return ids


def _pool(k: int) -> Transform:
    """Pooling over the last ``k`` dims: each output channel is still fed by one row."""

    def transform(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
        if ids.dim() < k + 1:
            raise Blocked(f"pools over all {ids.dim()} dimension(s), the channel one included")
        flat = ids.flatten(ids.dim() - k)
        if not bool((flat == flat[..., :1]).all()):
            raise Blocked("pools across channels")
        out = flat[..., :1].reshape(ids.shape[: ids.dim() - k] + (1,) * k)
        return out if shape is None else out.expand(shape)

    return transform


def _mean(dims: tuple[int, ...], keepdim: bool) -> Transform:
    """``x.mean(dims)``: an average over non-channel dims, like pooling."""

    def transform(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
        rank = ids.dim()
        axes = sorted({d % rank for d in dims if -rank <= d < rank})
        if len(axes) != len(dims):
            raise Blocked("averages over a dimension it does not have")
        out = ids
        for d in axes:
            if not bool((out == out.narrow(d, 0, 1)).all()):
                raise Blocked("averages across channels")
            out = out.narrow(d, 0, 1)
        if not keepdim:
            out = out.squeeze(tuple(axes))
        return out if shape is None else out.expand(shape)

    return transform


def _mean_op(node: Node, label: str, dim: Any, keepdim: Any) -> Unary | Other:
    dims = _ints(dim) if dim is not None else None
    if dims is None or not isinstance(keepdim, bool):
        return Other(label)
    return Unary(label, _mean(dims, keepdim), affine_ok=True, keeps_channels=False)


def _reshape_to_meta(what: str) -> Transform:
    def transform(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
        if shape is None:
            raise Blocked(f"{what} needs the real shapes: pass example_inputs=...")
        return ids.reshape(shape)

    return transform


def _flatten(start: int, end: int) -> Transform:
    def transform(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
        if shape is not None:
            return ids.reshape(shape)
        return ids.flatten(start, end)

    return transform


def _apply(fn: Callable[..., torch.Tensor], *args: Any) -> Transform:
    """A pure layout function (permute, transpose, unsqueeze ...) applied to the ids."""

    def transform(ids: torch.Tensor, shape: Shape) -> torch.Tensor:
        out = fn(ids, *args)
        if shape is not None and tuple(out.shape) != tuple(shape):
            raise Blocked("layout change whose result does not match the traced shape")
        return out

    return transform


# ---------------------------------------------------------------- op tables

_HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_MAX_POOL_MODULES = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_AVG_POOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}

_HOMOGENEOUS_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
    F.leaky_relu_,
    F.prelu,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
}
_AFFINE_FUNCTIONS = {torch.clone, operator.neg, torch.neg}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_DIVIDE_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_MAX_POOL_FUNCTIONS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
    torch.max_pool1d: 1,
    torch.max_pool2d: 2,
    torch.max_pool3d: 3,
}
_ADAPTIVE_AVG_FUNCTIONS = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_LAYOUT_FUNCTIONS = {
    torch.transpose: torch.transpose,
    torch.permute: torch.permute,
    torch.movedim: torch.movedim,
    torch.swapaxes: torch.swapaxes,
    torch.swapdims: torch.swapdims,
    torch.unsqueeze: torch.unsqueeze,
    torch.t: torch.t,
}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}

_HOMOGENEOUS_METHODS = {"relu", "relu_"}
_AFFINE_METHODS = {"contiguous", "clone", "neg", "neg_", "float", "double", "half", "bfloat16"}
_CAST_METHODS = {"to", "type"}
_SCALE_METHODS = {"mul", "mul_"}
_DIVIDE_METHODS = {"div", "div_", "true_divide", "true_divide_"}
_LAYOUT_METHODS = {
    "permute": torch.permute,
    "transpose": torch.transpose,
    "transpose_": torch.transpose,
    "movedim": torch.movedim,
    "swapaxes": torch.swapaxes,
    "swapdims": torch.swapdims,
    "unsqueeze": torch.unsqueeze,
    "unsqueeze_": torch.unsqueeze,
    "t": torch.t,
}
_SHAPE_METHODS = {
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "get_device",
    "is_contiguous",
    "element_size",
}


def describe(node: Node, modules: dict[str, nn.Module]) -> str:
    """A short human-readable name for ``node``, used in reasons."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name} (node '{node.name}')"
    if node.op == "call_method":
        return f"Tensor.{node.target} (node '{node.name}')"
    if node.op == "output":
        return "the model output"
    return f"node '{node.name}'"


def _arg(node: Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ints(values: Any) -> tuple[int, ...] | None:
    """``values`` as a tuple of ints, or None when any is a graph value (not a constant)."""
    if isinstance(values, (list, tuple)):
        flat = tuple(values)
    else:
        flat = (values,)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return flat
    return None


def _method_dims(node: Node) -> tuple[Any, ...]:
    """The dims given to ``x.permute(0, 2, 1)`` or ``x.permute((0, 2, 1))``."""
    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return tuple(args[0])
    return tuple(args)


def _is_batch_size(value: Any) -> bool:
    """``x.size(0)`` or ``x.shape[0]``: the batch size in ``x.view(x.size(0), -1)``."""
    if not isinstance(value, Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return len(value.args) > 1 and value.args[1] == 0
    if value.op == "call_function" and value.target is operator.getitem:
        src = value.args[0]
        return (
            value.args[1] == 0
            and isinstance(src, Node)
            and src.op == "call_function"
            and src.target is builtins.getattr
            and src.args[1] == "shape"
        )
    return False


def _reshape(node: Node, label: str, shape_args: tuple[Any, ...]) -> Unary:
    """view/reshape: exact from the traced shapes; without them only ``view(batch, -1)``."""
    if len(shape_args) == 1 and isinstance(shape_args[0], (list, tuple)):
        shape_args = tuple(shape_args[0])
    if len(shape_args) == 2 and shape_args[1] == -1 and _is_batch_size(shape_args[0]):
        return Unary(label, _flatten(1, -1), affine_ok=True, keeps_channels=False)
    return Unary(label, _reshape_to_meta(label), affine_ok=True, keeps_channels=False)


def _avg_pool_affine_ok(padding: Any, count_include_pad: Any, divisor_override: Any) -> bool:
    """An average keeps a per-channel constant unless zero padding enters the mean."""
    if divisor_override is not None:
        return False
    pads = _ints(padding)
    no_padding = pads is not None and all(p == 0 for p in pads)
    return no_padding or count_include_pad is False


def _scale(node: Node, label: str, divide: bool) -> Unary | Other:
    """Multiplication / division by a Python number is linear: passes, bias included."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if divide and node.kwargs.get("rounding_mode") is not None:
        return Other(label)
    if isinstance(a, Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if divide and b == 0:
            return Other(label)
        return Unary(label, _identity, affine_ok=True, data_index=0)
    if not divide and isinstance(b, Node) and isinstance(a, (int, float)):
        return Unary(label, _identity, affine_ok=True, data_index=1)
    return Other(label)


_RANKS: dict[type, tuple[int, ...]] = {}


def _accepted_ranks(module: nn.modules.batchnorm._BatchNorm) -> tuple[int, ...]:
    """The input ranks ``module._check_input_dim`` accepts (BatchNorm1d: (2, 3), 2d: (4,))."""
    kind = type(module)
    if kind not in _RANKS:
        ranks = []
        for rank in range(1, 7):
            try:
                module._check_input_dim(torch.empty((0,) * rank))
            except Exception:  # a subclass may raise anything for a rank it refuses
                continue
            ranks.append(rank)
        _RANKS[kind] = tuple(ranks)
    return _RANKS[kind]


def _batchnorm_module(node: Node, module: nn.modules.batchnorm._BatchNorm, label: str):
    """Any ``_BatchNorm`` module; it normalises with batch statistics as torch's forward
    decides: in training mode, or without running statistics."""
    normalising = module.training or (module.running_mean is None and module.running_var is None)
    return BatchNormOp(
        label=label,
        name=str(node.target),
        channels=int(module.num_features),
        ranks=_accepted_ranks(module),
        normalising=normalising,
        stats=module,
        key=id(module),
    )


class _Stats:
    """The running statistics a functional batch norm reads."""

    def __init__(self, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
        self.running_mean = running_mean
        self.running_var = running_var


def _batchnorm_function(node: Node, label: str, modules: dict[str, nn.Module]) -> Any:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)`` or
    ``torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...)``:
    normalising when ``training`` is the constant True, or with no running statistics."""
    if node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    else:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training")
    args = {n: _arg(node, i, n, False if n == "training" else None) for i, n in enumerate(names)}
    training = args["training"]
    if not isinstance(training, bool):
        return Other(f"{label} (whether it uses batch statistics is decided in forward)")
    tensors: dict[str, torch.Tensor | None] = {}
    owner = None
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = args[key]
        if isinstance(value, Node):
            if value.op != "get_attr":
                return Other(f"{label} (its {key} is computed in forward)")
            prefix, _, attr = str(value.target).rpartition(".")
            tensors[key] = getattr(modules[prefix], attr)
            owner = prefix if owner is None else owner
        else:
            tensors[key] = value
    mean, var = tensors["running_mean"], tensors["running_var"]
    sizes = {int(t.shape[0]) for t in tensors.values() if isinstance(t, torch.Tensor)}
    stats = _Stats(mean, var) if mean is not None and var is not None else None
    return BatchNormOp(
        label=label,
        name=owner if owner else str(node.name),
        channels=sizes.pop() if len(sizes) == 1 else None,
        ranks=None,
        normalising=training or (mean is None and var is None),
        stats=stats,
        key=id(mean) if mean is not None else None,
    )


def _classify_module(node: Node, module: nn.Module, label: str) -> Any:
    kind = type(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _batchnorm_module(node, module, label)
    norm = norm_module(node, module, label)
    if norm is not None:
        return norm
    if kind in _HOMOGENEOUS_MODULES:
        return Unary(label, _identity, affine_ok=False)
    if kind is nn.Identity:
        return Unary(label, _identity, affine_ok=True)
    if kind in _MAX_POOL_MODULES:
        if getattr(module, "return_indices", False):
            return Other(label)
        return Unary(label, _pool(_MAX_POOL_MODULES[kind]), affine_ok=True)
    if kind in _ADAPTIVE_AVG_MODULES:
        return Unary(label, _pool(_ADAPTIVE_AVG_MODULES[kind]), affine_ok=True)
    if kind in _AVG_POOL_MODULES:
        ok = _avg_pool_affine_ok(
            module.padding, module.count_include_pad, getattr(module, "divisor_override", None)
        )
        return Unary(label, _pool(_AVG_POOL_MODULES[kind]), affine_ok=ok)
    if kind is nn.Flatten:
        flat = _flatten(module.start_dim, module.end_dim)
        return Unary(label, flat, affine_ok=True, keeps_channels=False)
    if kind is nn.Unflatten:
        return Unary(label, _reshape_to_meta(label), affine_ok=True, keeps_channels=False)
    return Other(label)


def _classify_function(node: Node, label: str, modules: dict[str, nn.Module]) -> Any:
    target = node.target
    if target in _BATCHNORM_FUNCTIONS:
        return _batchnorm_function(node, label, modules)
    norm = norm_function(node, label)
    if norm is not None:
        return Other(norm) if isinstance(norm, str) else norm
    if target in _HOMOGENEOUS_FUNCTIONS:
        return Unary(label, _identity, affine_ok=False)
    if target in _AFFINE_FUNCTIONS:
        return Unary(label, _identity, affine_ok=True)
    if target in _SCALE_FUNCTIONS or target in _DIVIDE_FUNCTIONS:
        return _scale(node, label, divide=target in _DIVIDE_FUNCTIONS)
    if target in _MAX_POOL_FUNCTIONS:
        if node.kwargs.get("return_indices", False) is not False:
            return Other(label)
        return Unary(label, _pool(_MAX_POOL_FUNCTIONS[target]), affine_ok=True)
    if target in _ADAPTIVE_AVG_FUNCTIONS:
        return Unary(label, _pool(_ADAPTIVE_AVG_FUNCTIONS[target]), affine_ok=True)
    if target in _AVG_POOL_FUNCTIONS:
        ok = _avg_pool_affine_ok(
            _arg(node, 3, "padding", 0),
            _arg(node, 5, "count_include_pad", True),
            _arg(node, 6, "divisor_override", None),
        )
        return Unary(label, _pool(_AVG_POOL_FUNCTIONS[target]), affine_ok=ok)
    if target in _CAT_FUNCTIONS:
        tensors = _arg(node, 0, "tensors", ())
        return Cat(label, tuple(tensors), _arg(node, 1, "dim", 0))
    if target is torch.flatten:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if _ints((start, end)) is None:
            return Other(label)
        return Unary(label, _flatten(start, end), affine_ok=True, keeps_channels=False)
    if target is torch.reshape:
        return _reshape(node, label, (_arg(node, 1, "shape", None),))
    if target in _LAYOUT_FUNCTIONS:
        args = node.args[1:]
        if _ints(args) is None and not all(_ints(a) is not None for a in args):
            return Other(label)
        fn = _apply(_LAYOUT_FUNCTIONS[target], *args)
        return Unary(label, fn, affine_ok=True, keeps_channels=False)
    if target is torch.mean:
        return _mean_op(node, label, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
    if target is torch.squeeze:
        return Unary(label, _reshape_to_meta(label), affine_ok=True, keeps_channels=False)
    if target is builtins.getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS:
        return ShapeQuery(label)
    if target in (builtins.len, torch.numel):
        return ShapeQuery(label)
    return Other(label)


def _classify_method(node: Node, label: str) -> Any:
    name = node.target
    if name in _HOMOGENEOUS_METHODS:
        return Unary(label, _identity, affine_ok=False)
    if name in _AFFINE_METHODS:
        return Unary(label, _identity, affine_ok=True)
    if name in _CAST_METHODS:
        if any(isinstance(a, Node) for a in node.all_input_nodes[1:]):
            return Other(label)
        return Unary(label, _identity, affine_ok=True)
    if name in _SCALE_METHODS or name in _DIVIDE_METHODS:
        return _scale(node, label, divide=name in _DIVIDE_METHODS)
    if name == "flatten":
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if _ints((start, end)) is None:
            return Other(label)
        return Unary(label, _flatten(start, end), affine_ok=True, keeps_channels=False)
    if name in ("view", "reshape"):
        if any(isinstance(a, torch.dtype) for a in node.args[1:]):
            return Other(label)
        return _reshape(node, label, tuple(node.args[1:]))
    if name in ("view_as", "reshape_as", "squeeze", "squeeze_", "unflatten"):
        return Unary(label, _reshape_to_meta(label), affine_ok=True, keeps_channels=False)
    if name in _LAYOUT_METHODS:
        dims = _method_dims(node)
        if _ints(dims) is None:
            return Other(label)
        fn = _LAYOUT_METHODS[name]
        transform = _apply(fn, dims) if name == "permute" else _apply(fn, *dims)
        return Unary(label, transform, affine_ok=True, keeps_channels=False)
    if name == "mean":
        return _mean_op(node, label, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False))
    if name in _SHAPE_METHODS:
        return ShapeQuery(label)
    return Other(label)


def classify(node: Node, modules: dict[str, nn.Module]) -> Any:
    """The kind of ``node``: Unary, Cat, BatchNormOp, NormOp, ShapeQuery or Other (blocks)."""
    label = describe(node, modules)
    if node.op == "call_module":
        return _classify_module(node, modules[node.target], label)
    if node.op == "call_function":
        return _classify_function(node, label, modules)
    if node.op == "call_method":
        return _classify_method(node, label)
    return Other(label)
