"""torch.fx tracing for the dataflow analysis, and optional shape propagation.

:func:`trace` turns a model into a ``GraphModule`` whose submodules and parameters are the
model's own objects (nothing is copied). :func:`propagate_shapes` runs example inputs
through it once, in eval mode and without gradients, so that every node records its real
output shape; the model's training flags and buffers (BatchNorm running statistics) are
restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["UntraceableModelError", "node_shape", "propagate_shapes", "trace"]

_HOW_TO_NAME = (
    "name the weights to convert yourself: to_grassmann(model, include=['layer.weight', ...], "
    "detect=False) (their scale invariance is then not checked), or keep the "
    "untraceable submodules opaque with leaf_modules=['name', ...]"
)


class UntraceableModelError(TypeError):
    """The model's forward cannot be traced by torch.fx (data-dependent control flow ...)."""


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with extra submodules (by qualified name) kept as opaque leaves."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or super().is_leaf_module(
            m, module_qualified_name
        )


@contextlib.contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back as it was (values; the objects are kept)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def trace(model: nn.Module, leaf_modules: Iterable[str] = ()) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; raise :class:`UntraceableModelError` saying what to do.

    >>> gm = trace(nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2)))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    leaves = frozenset(leaf_modules)
    known = {name for name, _ in model.named_modules()}
    unknown = sorted(leaves - known)
    if unknown:
        raise ValueError(f"leaf_modules: no submodule named {unknown} in {type(model).__name__}")
    try:
        # tracing runs forward's Python code on the real buffers: a BatchNorm subclass with
        # its own forward (timm's BatchNormAct2d) bumps num_batches_tracked in train mode
        with _buffers_kept(model):
            graph = _Tracer(leaves).trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError ...)
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            f"{_HOW_TO_NAME}"
        ) from exc
    return torch.fx.GraphModule(model, graph)


def propagate_shapes(
    gm: torch.fx.GraphModule, model: nn.Module, example_inputs: tuple[Any, ...]
) -> None:
    """Record each node's real output shape (``node.meta['tensor_meta']``)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        # a graph traced in train mode updates BatchNorm statistics whatever the flags say
        # (a traced-into BatchNorm subclass calls F.batch_norm(training=True))
        with torch.no_grad(), _buffers_kept(model):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise ValueError(
            f"example_inputs do not run through {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for module, training in flags:
            module.training = training


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` (None without shape propagation)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None
