"""One training run of study A: same model init, data order and LR schedule for every method.

The learning rate of every param group is multiplied by ``gamma`` (the paper's 0.2) at each
epoch in ``drops``. After every epoch the run records the mean training loss over that
epoch's batches, the error (%) on each evaluation split, the training seconds of the epoch,
and per G-weight the mean row norm; after every step, per G-weight, the mean angle (radians)
between each row before and after the step -- how far the step moved the weight -- as
``rbn_geoopt.AngleMonitor`` measures it (the lines of G(1,n) for the Grassmann methods, the
rows as vectors otherwise; the same angle for every step below 90 degrees).

Example::

    run = train_run(METHODS["sgd"], {"name": "vgg"}, train, {"test": test},
                        epochs=2, drops=[1], seed=0)
    run["test_error"][-1]  # final test error, %
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rbn_geoopt import AngleMonitor
from rbn_geoopt.diagnostics import point_angles

from .data import Split
from .methods import Method, Prepared, current_weight, on_manifold, prepare, stored_parameter
from .models import build_model

__all__ = ["angle_monitor", "lr_drops", "row_angles", "evaluate", "train_run"]

GAMMA = 0.2


def lr_drops(epochs: int, fractions: tuple[float, ...] = (0.5, 0.75)) -> list[int]:
    """Epochs (0-based, the first epoch run at the lower rate) of the LR drops.

    >>> lr_drops(8), lr_drops(4), lr_drops(1)
    ([4, 6], [2, 3], [])
    """
    return sorted({round(epochs * f) for f in fractions} & set(range(1, epochs)))


def lr_factor(epoch: int, drops: list[int], gamma: float = GAMMA) -> float:
    """``gamma ** (number of drops at or before epoch)``."""
    return gamma ** sum(epoch >= d for d in drops)


def row_angles(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Angle (radians, in [0, pi]) between corresponding rows, exact for small angles
    (``rbn_geoopt.diagnostics.point_angles`` on the rows)."""
    rows = before.shape[0]
    return point_angles(before.reshape(rows, -1), after.reshape(rows, -1))


def angle_monitor(prepared: Prepared) -> AngleMonitor:
    """The library's ``AngleMonitor`` on the G-weights of a prepared method, by layer name
    (``features.3.weight``), whichever tensor its optimizer steps for them."""
    named = [(n, stored_parameter(prepared.model, n)) for n in prepared.g_names]
    return AngleMonitor(prepared.optimizer, named)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch: int = 256) -> dict:
    """``{"error": %, "loss": mean cross entropy}`` of ``model`` in eval mode on ``split``."""
    model.eval()
    wrong, loss = 0, 0.0
    for i in range(0, len(split), batch):
        x = split.images[i : i + batch].to(device)
        y = split.labels[i : i + batch].to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        wrong += int((logits.argmax(1) != y).sum())
    model.train()
    n = max(len(split), 1)
    return {"error": 100.0 * wrong / n, "loss": loss / n}


def _mean_row_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).mean())


def train_run(
    method: Method,
    model_spec: dict,
    train: Split,
    evals: dict[str, Split],
    *,
    epochs: int,
    drops: list[int],
    seed: int,
    batch_size: int = 128,
    lrs: dict[str, float] | None = None,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    track_angles: bool = True,
    final_evals: dict[str, Split] | None = None,
    step_losses: bool = False,
) -> dict:
    """Train ``model_spec`` with ``method`` and return the per-epoch (and per-step) log.

    ``seed`` fixes the initial weights and the batch order, identically for every method.
    ``max_batches`` caps the batches per epoch (the smoke mode). ``evals`` are evaluated
    after every epoch (``log["<name>_error"]`` lists), ``final_evals`` only after the last
    (``log["final_<name>_error"]``). ``step_losses`` keeps every step's training loss
    (``log["step_loss"]``, one float per step, in order). ``log["on_manifold"]`` says how
    many weights and points the method put on a manifold
    (:func:`comparisons.methods.on_manifold`). A model with ``needs_example_inputs`` is
    analysed with two training images as ``example_inputs``. Raises ``FloatingPointError``
    when the training loss becomes non-finite.
    """
    device = torch.device(device)
    model = build_model(model_spec, seed).to(device)
    example = None
    if getattr(model, "needs_example_inputs", False):  # its analysis needs real shapes
        example = train.images[:2].to(device)
    prepared = prepare(method, model, lrs, example)
    model, opt = prepared.model, prepared.optimizer
    order = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(train) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    log: dict = {"train_loss": [], "epoch_seconds": [], "lr_factor": []}
    log["on_manifold"] = on_manifold(model, prepared.g_names)  # 0 for a plain weight
    log.update({f"{name}_error": [] for name in evals})
    log.update({f"{name}_loss": [] for name in evals})
    log["row_norm"] = {name: [] for name in prepared.g_names}
    log["angle_per_step"] = {name: [] for name in prepared.g_names}
    if step_losses:
        log["step_loss"] = []
    monitor = angle_monitor(prepared)
    bar = tqdm(
        total=epochs * n_batches,
        desc=f"{method.label} seed {seed}",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    model.train()
    for epoch in range(epochs):
        factor = lr_factor(epoch, drops)
        prepared.set_lr_factor(factor)
        perm = torch.randperm(len(train), generator=order)
        start, total, count = time.perf_counter(), 0.0, 0
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if prepared.before_step is not None:
                prepared.before_step()
            with monitor.track(enabled=track_angles) as angles:
                opt.step()
            for name, stats in angles.get("params", {}).items():
                log["angle_per_step"][name].append(stats["mean"])
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(
                    f"{method.label}: training loss became {value} at epoch {epoch + 1}"
                )
            total, count = total + value * len(idx), count + len(idx)
            if step_losses:
                log["step_loss"].append(value)
            bar.update(1)
        log["epoch_seconds"].append(time.perf_counter() - start)
        log["train_loss"].append(total / max(count, 1))
        log["lr_factor"].append(factor)
        for name, split in evals.items():
            result = evaluate(model, split, device)
            log[f"{name}_error"].append(result["error"])
            log[f"{name}_loss"].append(result["loss"])
        with torch.no_grad():
            for name in prepared.g_names:
                log["row_norm"][name].append(_mean_row_norm(current_weight(model, name)))
        bar.set_postfix(loss=f"{log['train_loss'][-1]:.3f}")
    bar.close()
    for name, split in (final_evals or {}).items():
        result = evaluate(model, split, device)
        log[f"final_{name}_error"] = result["error"]
        log[f"final_{name}_loss"] = result["loss"]
    return log
