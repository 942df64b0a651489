"""Interleaved wall-clock timing of several callables (study C).

Each round calls every callable once, in the given order on even rounds and reversed on odd
ones, so that a change of machine load (the box is shared) hits all of them alike and none
always runs right after the same neighbour. The first ``warmup`` rounds are not recorded;
the result is, per label, the ``perf_counter`` seconds of each recorded call (the device is
synchronized before and after each call on CUDA).

Example::

    times = interleaved({"a": f, "b": g}, warmup=1, rounds=5)
    statistics.median(times["a"]) / statistics.median(times["b"])
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["interleaved", "sync"]


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU (or for None)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    rounds: int,
    device: torch.device | None = None,
    tick: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """``{label: [seconds of each recorded call]}``; ``tick()`` is called after every call
    (a progress bar's update)."""
    labels = tuple(fns)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(warmup + rounds):
        order = labels if r % 2 == 0 else tuple(reversed(labels))
        for label in order:
            sync(device)
            start = time.perf_counter()
            fns[label]()
            sync(device)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[label].append(elapsed)
            if tick is not None:
                tick()
    return times
