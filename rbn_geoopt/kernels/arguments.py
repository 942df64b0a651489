"""Argument checks of the fused steps (:mod:`.dispatch`): shapes, scalars, aliasing.

Everything here raises ``TypeError`` / ``ValueError`` with a message naming the argument;
nothing is stepped before all of a call's arguments have passed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "byte_range",
    "check_no_overlap",
    "check_scalar",
    "check_tensors",
    "clip_threshold",
    "list_item_name",
    "per_tensor_ndims",
    "point_size",
    "same_length",
]


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes that ``t`` can touch (for the aliasing check)."""
    start, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():
        return start, start + t.numel() * size
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (span + 1) * size


def check_no_overlap(
    written: dict[str, Sequence[torch.Tensor | None]], read: dict[str, Sequence[torch.Tensor]]
) -> None:
    """ValueError when a written tensor shares memory with any other tensor of the call.

    ``written`` / ``read`` map a list name (``"y"``, ``"g"``, ...) to its tensors. One sweep
    over the byte ranges sorted by device and start (O(k log k) for k tensors): a range
    overlaps an earlier one iff it starts before the largest end seen so far on its device;
    read-only tensors (gradients) may alias each other.
    """
    lists = [(name, ts, True) for name, ts in written.items()]
    lists += [(name, ts, False) for name, ts in read.items()]
    ranges = sorted(
        (t.get_device(), *byte_range(t), k, i, is_written)
        for k, (_, ts, is_written) in enumerate(lists)
        for i, t in enumerate(ts)
        if t is not None and t.numel()
    )
    device, end_any, end_written = None, (0, None), (0, None)
    for where, lo, hi, k, i, is_written in ranges:
        if where != device:  # address spaces of different devices never overlap
            device, end_any, end_written = where, (0, None), (0, None)
        other = end_any[1] if is_written and lo < end_any[0] else None
        other = end_written[1] if lo < end_written[0] else other
        if other is not None:
            a, b = (list_item_name(lists[x][0], y, len(lists[x][1])) for x, y in (other, (k, i)))
            raise ValueError(f"{a} and {b} share memory: the step needs separate tensors")
        end_any = max(end_any, (hi, (k, i)))
        if is_written:
            end_written = max(end_written, (hi, (k, i)))


def list_item_name(name: str, index: int, count: int) -> str:
    """``"y"`` for a list of one tensor, else ``"ys[3]"``."""
    return name if count == 1 else f"{name}s[{index}]"


def point_size(y: torch.Tensor, ndim: int) -> int:
    """``n``, the number of entries of one point: the product of the last ``ndim`` sizes."""
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an int >= 1, got {ndim!r}")
    if y.dim() < ndim:
        raise ValueError(f"y has shape {tuple(y.shape)}: fewer than ndim={ndim} dimensions")
    return math.prod(y.shape[y.dim() - ndim :])


def check_tensors(y: torch.Tensor, ndim: int, **others: torch.Tensor | None) -> int:
    """Validate shapes, devices and dtypes; return the point size ``n``."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
    n = point_size(y, ndim)
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.device != y.device:
            raise ValueError(f"{name} is on {t.device}, y on {y.device}")
    return n


def check_scalar(name: str, value: float, lo: float | None = None, hi: float | None = None):
    """ValueError unless ``value`` is a finite real number in ``[lo, hi)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value >= hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}), got {value!r}")


def clip_threshold(grad_clip: float | None) -> float:
    """The clipping threshold: ``None`` and ``inf`` both mean no clipping."""
    if grad_clip is None or grad_clip == math.inf:
        return math.inf
    check_scalar("grad_clip", grad_clip)
    if grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    return float(grad_clip)


def per_tensor_ndims(ndims: int | Sequence[int], count: int) -> list[int]:
    """One ``ndim`` per tensor: ``ndims`` repeated when it is one int, else checked."""
    if isinstance(ndims, int) and not isinstance(ndims, bool):
        return [ndims] * count
    ndims = list(ndims)
    if len(ndims) != count:
        raise ValueError(f"ndims has {len(ndims)} entries for {count} tensors")
    return ndims


def same_length(**lists: Sequence) -> int:
    """The common length of the tensor lists (ValueError when they differ)."""
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the tensor lists must have one length, got {lengths}")
    return next(iter(lengths.values()))
