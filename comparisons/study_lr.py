"""Learning-rate sensitivity: test error against the learning rate, and the good basin.

It extends the sweep of study A (:func:`comparisons.study_a.run_sweep`: the same model,
validation split carved from the training set, schedule and data order) from a small grid
to a log grid per method. Each method sweeps one learning rate, ``x`` below:

* the Euclidean methods (SGD, Adam, SGDP, AdamP, AdamW) their ``lr``;
* the manifold methods (SGD-G, Adam-G, geoopt's sphere optimizers) their ``lr_g``, with the
  Euclidean ``lr`` of the other parameters fixed at its best value: the best of the sweep's
  ``lr`` grid (``Method.grid["lr"]``, 0.01 and 0.1) at the published ``lr_g``, chosen on
  the validation split like everything else.

The grid is ``x_k = x0 * step**k`` around the published value ``x0`` (``points`` values,
``step`` sqrt(10): 7 points span 3 decades). While the best point is on an edge of the grid
one more point is added beyond that edge, at most ``widen`` times per method; a best point
still on the edge is flagged in the table. Every grid point is trained with every seed; a
run whose loss stops being finite counts as chance, 90 % error. The chosen point is the
lowest mean validation error over the seeds; the table reports the test error there
(median, min-max over seeds), and the **good basin**: the range of ``x`` around the chosen
point over which the mean validation error, linearly interpolated in ``log10 x`` between
grid points, stays within ``+tolerance`` (1 point) of the best (:func:`basin`), in decades.

Example::

    result = run_lr_study(BUDGETS["smoke"], data, [METHODS["sgd"]], [0])
    result["methods"]["SGD"]["basin_decades"]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from tqdm import tqdm

from .data import Split
from .methods import Method, hyperparameters, implementation
from .study_a import sweep_common, sweep_splits
from .train import train_run

__all__ = ["BUDGETS", "CHANCE", "basin", "check_budget", "log_grid_search", "run_lr_study"]

#: the error (%) a diverged run counts as: chance on 10 classes
CHANCE = 90.0
_VGG = {"name": "vgg", "widths": (16, 32, 64, 64)}
_TINY = {"name": "vgg", "widths": (4, 8, 8, 8)}

#: ``--smoke`` and ``--quick`` are the CI variants (a few hundred images, 3 points a decade
#: apart, one seed by default); ``--full`` is the real study: study A's quick data budget
#: (3,500 training images, VGG, 3 epochs) with 1,000 validation images carved from the
#: training set and 2,000 test images, 7 points over 3 decades, widened up to 2 points.
#: Measured with --full on the shared 2-core project machine, 1 thread per process, 2-3
#: processes at once: 14-18 runs a method with 2 seeds, 5-8 min a method (all 11 methods:
#: 65 process-minutes, 36 min of wall time as four processes).
BUDGETS = {
    "smoke": {
        "model": _TINY,
        "fit": 256,
        "val": 128,
        "test": 128,
        "epochs": 1,
        "batch_size": 64,
        "max_batches": 2,
        "points": 3,
        "step": 10.0,
        "widen": 1,
        "tolerance": 1.0,
    },
    "quick": {
        "model": _TINY,
        "fit": 200,
        "val": 100,
        "test": 100,
        "epochs": 2,
        "batch_size": 50,
        "points": 3,
        "step": 10.0,
        "widen": 1,
        "tolerance": 1.0,
    },
    "full": {
        "model": _VGG,
        "fit": 3500,
        "val": 1000,
        "test": 2000,
        "epochs": 3,
        "points": 7,
        "step": math.sqrt(10.0),
        "widen": 2,
        "tolerance": 1.0,
    },
}


def check_budget(budget: dict, n_train: int) -> None:
    """Raise ValueError when ``budget`` cannot be carved from ``n_train`` training images."""
    val = budget["val"]
    if not 0 < val < n_train:
        raise ValueError(
            f"the lr study's validation split ({val} images) must be smaller than the "
            f"training set ({n_train} images)"
        )
    if budget["points"] < 2 or budget["step"] <= 1.0 or budget["widen"] < 0:
        raise ValueError("the lr study needs points >= 2, step > 1 and widen >= 0")


def basin(xs: list[float], errors: list[float], tolerance: float = 1.0) -> dict:
    """The good basin: the range of ``x`` around the best error where the error, linearly
    interpolated in ``log10 x`` between grid points, is at most ``min(errors) + tolerance``.

    ``xs`` ascending. Returns ``lo``, ``hi``, ``decades = log10(hi / lo)`` and whether the
    range reaches the lowest / highest grid point (``open_lo`` / ``open_hi``: then it may
    extend further and ``decades`` is a lower bound). A V of slope 2 points per decade with
    tolerance 1 is half a decade wide on each side:

    >>> b = basin([0.01, 0.1, 1.0, 10.0], [6.0, 4.0, 2.0, 4.0])
    >>> round(b["lo"], 6), round(b["hi"], 6), round(b["decades"], 6), b["open_lo"], b["open_hi"]
    (0.316228, 3.162278, 1.0, False, False)
    """
    if len(xs) != len(errors) or not xs:
        raise ValueError(f"basin: {len(xs)} learning rates but {len(errors)} errors")
    if any(b <= a for a, b in zip(xs[:-1], xs[1:], strict=True)) or xs[0] <= 0:
        raise ValueError("basin: the learning rates must be positive and ascending")
    logs = [math.log10(x) for x in xs]
    best = min(range(len(xs)), key=lambda i: errors[i])
    limit = errors[best] + tolerance

    def edge(direction: int) -> tuple[float, bool]:
        i = best
        while 0 <= i + direction < len(xs) and errors[i + direction] <= limit:
            i += direction
        j = i + direction
        if not 0 <= j < len(xs):
            return logs[i], True
        frac = (limit - errors[i]) / (errors[j] - errors[i])  # errors[j] > limit >= errors[i]
        return logs[i] + frac * (logs[j] - logs[i]), False

    lo, open_lo = edge(-1)
    hi, open_hi = edge(+1)
    return {
        "lo": 10.0**lo,
        "hi": 10.0**hi,
        "decades": hi - lo,
        "open_lo": open_lo,
        "open_hi": open_hi,
    }


def log_grid_search(
    evaluate: Callable[[float], float],
    center: float,
    points: int,
    step: float,
    widen: int,
) -> tuple[list[int], dict[int, float]]:
    """Evaluate ``center * step**k`` for ``points`` consecutive ``k`` around 0, then, while
    the lowest value is at an edge and fewer than ``widen`` points were added, one more
    ``k`` beyond that edge. Returns the sorted ``k`` and ``{k: evaluate(x_k)}``.

    >>> ks, values = log_grid_search(lambda x: (math.log10(x) - 1.0) ** 2, 1.0, 3, 10.0, 3)
    >>> ks, values[1]
    ([-1, 0, 1, 2], 0.0)
    """
    values: dict[int, float] = {}
    for k in range(-(points // 2), points - points // 2):
        values[k] = evaluate(center * step**k)
    added = 0
    while added < widen:
        ks = sorted(values)
        best = min(ks, key=lambda k: values[k])
        if best == ks[0]:
            k = ks[0] - 1
        elif best == ks[-1]:
            k = ks[-1] + 1
        else:
            break
        values[k] = evaluate(center * step**k)
        added += 1
    return sorted(values), values


def _point(method: Method, lrs: dict, seeds: list[int], splits: tuple, spec: dict, common: dict):
    """Every seed at one learning-rate point: final val/test errors and training losses."""
    fit, val, test = splits
    runs = []
    for seed in seeds:
        try:
            log = train_run(
                method,
                spec["model"],
                fit,
                {},
                seed=seed,
                lrs=lrs,
                final_evals={"val": val, "test": test},
                **common,
            )
            runs.append(
                {
                    "val": log["final_val_error"],
                    "test": log["final_test_error"],
                    "loss": log["train_loss"][-1],
                }
            )
        except FloatingPointError:  # a diverged run counts as chance
            runs.append({"val": CHANCE, "test": CHANCE, "loss": None})
    return {
        "lrs": dict(lrs),
        "val_errors": [r["val"] for r in runs],
        "test_errors": [r["test"] for r in runs],
        "train_losses": [r["loss"] for r in runs],
        "val_mean": statistics.fmean(r["val"] for r in runs),
        "test_median": statistics.median(r["test"] for r in runs),
        "diverged": sum(r["loss"] is None for r in runs),
    }


def _sweep_method(method, seeds, splits, spec, common, bar) -> dict:
    axis = "lr" if method.geometry == "euclidean" else "lr_g"
    fixed: dict[str, float] = {}
    stage1 = []
    if axis == "lr_g":  # the Euclidean lr first, at the published lr_g
        for lr in method.grid.get("lr", (method.lrs["lr"],)):
            stage1.append(_point(method, {**method.lrs, "lr": lr}, seeds, splits, spec, common))
            bar.update(len(seeds))
        fixed = {"lr": min(stage1, key=lambda p: p["val_mean"])["lrs"]["lr"]}
    trials: dict[float, dict] = {}

    def evaluate(x: float) -> float:
        trials[x] = _point(method, {**fixed, axis: x}, seeds, splits, spec, common)
        bar.update(len(seeds))
        return trials[x]["val_mean"]

    ks, _ = log_grid_search(evaluate, method.lrs[axis], spec["points"], spec["step"], spec["widen"])
    xs = sorted(trials)
    grid = [{"x": x, **trials[x]} for x in xs]
    best = min(grid, key=lambda p: p["val_mean"])
    good = basin(xs, [p["val_mean"] for p in grid], spec["tolerance"])
    return {
        "key": method.key,
        "rule": method.rule,
        "hyper": hyperparameters(method),
        "implementation": implementation(method),
        "axis": axis,
        "fixed": fixed,
        "fixed_grid": [{"lrs": p["lrs"], "val_mean": p["val_mean"]} for p in stage1],
        "grid": grid,
        "chosen": best["lrs"],
        "chosen_x": best["x"],
        "edge": best["x"] in (xs[0], xs[-1]),
        "val_error": best["val_mean"],
        "test_error_median": best["test_median"],
        "test_error_min": min(best["test_errors"]),
        "test_error_max": max(best["test_errors"]),
        "basin_decades": good["decades"],
        "basin": good,
    }


def run_lr_study(
    budget: dict,
    data: tuple[Split, Split],
    methods: list[Method],
    seeds: list[int],
    device: str = "cpu",
    progress: bool = True,
    on_method: Callable[[dict], None] | None = None,
) -> dict:
    """The sensitivity study of ``methods``; ``on_method(result so far)`` after each method
    (the CLI writes the summary then, so an interrupted run leaves its finished methods)."""
    check_budget(budget, len(data[0]))
    splits = sweep_splits(budget, data)
    common = sweep_common(budget, device, progress)
    fit, val, test = splits
    out: dict = {
        "config": {
            **{k: v for k, v in budget.items()},
            "fit": len(fit),
            "val": len(val),
            "test": len(test),
        },
        "drops": common["drops"],
        "seeds": list(seeds),
        "methods": {},
    }
    estimate = len(seeds) * sum(
        budget["points"] + (0 if m.geometry == "euclidean" else len(m.grid.get("lr", (0,))))
        for m in methods
    )
    bar = tqdm(total=estimate, desc="lr study", disable=not progress)
    for method in methods:
        out["methods"][method.label] = _sweep_method(method, seeds, splits, budget, common, bar)
        if on_method is not None:
            on_method(out)
    bar.close()
    return out
