"""The finest partition of a weight's rows into scale-invariant blocks, and its verdict.

Each normaliser a weight reaches (a :class:`._propagate.Hit`) lists the rows it normalises in
each group; rows that share a group are scale invariant only jointly. Union-find over the
rows (:func:`components`) gives the finest partition that every normaliser allows; it is
reported as ``points`` blocks only when it is consecutive rows in blocks of equal size,
``W.reshape(points, -1)[k]`` (:func:`blocks`); docs/design.md, "Beyond BatchNorm: blocks of
rows".

>>> hit = Hit("gn", "GroupNorm 'gn'", False, torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]]))
>>> partition_verdict(4, [hit], "it feeds GroupNorm 'gn'")["points"]
2
"""

from __future__ import annotations

import torch

from ._propagate import Hit

__all__ = ["blocks", "components", "partition_verdict"]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("s" if count != 1 else "")


def _joins(hit: Hit) -> bool:
    """Whether ``hit`` normalises two different rows in one group."""
    groups = hit.pairs[:, 0]
    return bool(len(groups)) and len(torch.unique(groups)) < len(groups)


def components(rows: int, hits: list[Hit]) -> torch.Tensor:
    """Union-find over rows: rows sharing a normaliser group are one component; the label of
    each row is the smallest row of its component.

    >>> pairs = torch.tensor([[0, 0], [0, 2], [1, 3], [1, 4], [2, 4], [2, 5]])
    >>> components(6, [Hit("n", "n", False, pairs)]).tolist()
    [0, 1, 0, 3, 3, 3]
    """
    label = torch.arange(rows, dtype=torch.long)
    parts, offset = [], 0
    for hit in hits:
        if len(hit.pairs):
            parts.append(hit.pairs + torch.tensor([offset, 0]))
            offset += int(hit.pairs[:, 0].max()) + 1
    if not parts:
        return label
    pairs = torch.cat(parts)
    group, row = pairs[:, 0], pairs[:, 1]
    while True:
        low = torch.full((offset,), rows, dtype=torch.long)
        low = low.scatter_reduce(0, group, label[row], "amin")
        new = label.scatter_reduce(0, row, low[group], "amin")
        new = new[new]
        if torch.equal(new, label):
            return label
        label = new


def blocks(component: torch.Tensor) -> tuple[int, int]:
    """``(points, block)`` when the components are consecutive blocks of one size, else
    ``(0, 0)``.

    >>> blocks(torch.tensor([0, 0, 2, 2])), blocks(torch.tensor([0, 1, 0, 1]))
    ((2, 2), (0, 0))
    """
    rows = len(component)
    block = int((component == 0).sum())
    if rows % block:
        return 0, 0
    expected = torch.arange(rows) // block * block
    return (rows // block, block) if torch.equal(component, expected) else (0, 0)


def partition_verdict(rows: int, hits: list[Hit], per_row: str) -> dict:
    """``invariant`` / ``reason`` / ``points`` for a weight whose rows reach ``hits`` only;
    ``per_row``: the reason when each row is a point."""
    component = components(rows, hits)
    points, block = blocks(component)
    if points == rows:
        return dict(invariant=True, reason=per_row, points=rows)
    via = ", ".join(dict.fromkeys(h.label for h in hits if _joins(h)))
    if points:
        reason = (
            f"its rows are scale invariant jointly in {_plural(points, 'block')} of {block} "
            f"({via}); each block is one point of G(1, n) (Grassmann1Blocks({points}))"
        )
        return dict(invariant=False, reason=reason, points=points)
    first = int((component != torch.arange(rows)).nonzero()[0, 0])
    members = (component == component[first]).nonzero().flatten().tolist()
    shown = members if len(members) <= 8 else members[:8] + ["..."]
    reason = (
        f"its rows are scale invariant only jointly, in sets that are not blocks of "
        f"consecutive rows of equal size (rows {shown} together, {via})"
    )
    return dict(invariant=False, reason=reason, points=0)
