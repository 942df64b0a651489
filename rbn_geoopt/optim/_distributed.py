r"""DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism): step the local shard.

``torch.distributed.fsdp.fully_shard`` replaces every parameter by a plain ``nn.Parameter``
wrapping a ``DTensor`` sharded along dim 0 (torch.chunk sizes, so shards may be uneven or
empty); the geoopt ``ManifoldParameter`` class is lost, hence the param-group key
``"manifold"``. When every shard holds whole points -- no placement shards a point
dimension, i.e. ``Shard(d)`` only for ``d < p.dim() - manifold.ndim`` -- the per-point
updates of SGD-G and Adam-G are local: each rank steps the rows it owns, in place on
``p.to_local()`` (a view of FSDP2's storage), with state kept as DTensors of the same
layout (so ``torch.distributed.checkpoint`` saves every rank's shard).

The orthogonality term ``omega/2 ||Yh Yh^T - I||_F^2`` couples all rows of a weight; its
gradient is computed on the gathered full matrix (``DTensor.full_tensor``, one all-gather of
the weight per step) and each rank keeps its own rows.

>>> t = torch.ones(2, 3)
>>> local(t) is t
True
"""

from __future__ import annotations

from typing import Any

import torch

try:  # torch builds without distributed support have no DTensor
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None
    Replicate = None

__all__ = [
    "is_dtensor",
    "local",
    "block_sharding_error",
    "point_sharding_error",
    "replicated_rows",
    "gathered",
    "reduce_max",
    "shard_like",
]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (also inside an ``nn.Parameter``)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local data of ``t``: ``t.to_local()`` for a DTensor (a view), else ``t``.

    Must be called under ``torch.no_grad()`` for in-place updates to reach the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t


def point_sharding_error(param: torch.Tensor, ndim: int) -> str | None:
    """Why ``param``'s DTensor layout cannot be stepped point by point, or None if it can.

    Refused: a ``Shard`` placement on one of the trailing ``ndim`` (point) dimensions, and
    ``Partial`` placements (pending reductions: not a parameter layout).
    """
    if not is_dtensor(param):
        return None
    first_point_dim = param.dim() - ndim
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_partial():
            return f"has a Partial placement on mesh dim {mesh_dim} (a pending reduction)"
        if placement.is_shard() and placement.dim >= first_point_dim:
            return (
                f"is sharded along dim {placement.dim} (mesh dim {mesh_dim}), which lies inside "
                f"one point (its trailing {ndim} dim(s)), so no rank holds whole points; "
                "shard a batch dim instead (fully_shard(..., shard_placement_fn=...) or "
                "ignored_params) or keep it replicated"
            )
    return None


def block_sharding_error(param: torch.Tensor) -> str | None:
    """Why a ``Grassmann1Blocks`` parameter's DTensor layout cannot be stepped, or None.

    Its points are blocks of rows of dim 0, the dim FSDP2 shards; whether every shard holds
    whole blocks is not checked, so any ``Shard`` (and ``Partial``) placement is refused:
    replicated layouts only.
    """
    if not is_dtensor(param):
        return None
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_partial():
            return f"has a Partial placement on mesh dim {mesh_dim} (a pending reduction)"
        if placement.is_shard():
            return (
                f"is sharded along dim {placement.dim} (mesh dim {mesh_dim}), but it is on "
                "Grassmann1Blocks, whose points are blocks of rows of dim 0: sharded block "
                "parameters are not supported (a shard may cut a block); keep it replicated "
                "(fully_shard(..., ignored_params=...) or a replicated placement)"
            )
    return None


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def shard_like(
    param: torch.Tensor, local_tensor: torch.Tensor, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``local_tensor`` as a DTensor laid out like ``param`` (global ``shape``, default the
    parameter's); ``local_tensor`` itself when ``param`` is not a DTensor.

    Used for optimizer state (momentum, ``exp_avg``, the per-point ``exp_avg_sq``), which
    must be sharded exactly like the rows it belongs to.
    """
    if not is_dtensor(param):
        return local_tensor
    shape = tuple(param.shape if shape is None else shape)
    return DTensor.from_local(
        local_tensor,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def replicated_rows(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a tensor of ``param``'s global shape, equal on all
    ranks), cut exactly as ``param`` is sharded; ``full`` itself for a plain tensor."""
    if not is_dtensor(param):
        return full
    mesh = param.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements).to_local()


def gathered(param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor parameter (an all-gather), ``param`` itself otherwise."""
    return param.full_tensor() if is_dtensor(param) else param


def reduce_max(value: int, params: list[torch.Tensor]) -> int:
    """The maximum of ``value`` over every rank of the device meshes of the DTensors in
    ``params`` (``value`` itself, without communication, when there are none).

    So that a check on rank-local shards makes all ranks raise together: no rank is left
    waiting in a collective for one that raised.
    """
    meshes = {}
    for p in params:
        if is_dtensor(p):
            meshes.setdefault(id(p.device_mesh), p)
    if not meshes:
        return value
    import torch.distributed as dist

    for p in meshes.values():
        mesh = p.device_mesh
        flag = torch.tensor([value], dtype=torch.int64, device=local(p).device)
        for mesh_dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        value = int(flag.item())
    return value
