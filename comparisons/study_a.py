"""Study A: a BN-CNN on Fashion-MNIST, every method of ``methods.METHODS``.

Recipe as published (:func:`run_study_a`): every method trains the same network from the same
initial weights (one per seed), on the same batches in the same order, for the same epochs,
with the learning rates of every group multiplied by 0.2 at 50% and 75% of the epochs. Per
method it reports the final test error (median, min, max over seeds), the final training
loss (median), the first epoch at which the median test-error curve reaches the SGD
baseline's final median test error, the training seconds per epoch (median), and the mean
angular update per step of the scale-invariant weights (first and last epoch).

Sweep (:func:`run_sweep`): each method gets its learning-rate grid (``Method.grid``; for the
G(1,n) methods ``lr_g`` x the Euclidean ``lr``), is trained with the first seed on the
training set minus a validation split carved from it, and the grid point with the lowest
final validation error is chosen -- the test set plays no part in the choice. The chosen
point is then trained with every seed and compared on the test set.

Example::

    result = run_study_a(BUDGETS["smoke"], data, list(METHODS.values()), [0])
    result["models"]["vgg"]["methods"]["SGD-G"]["summary"]["test_error_median"]  # in %
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from .data import Split, carve_validation, subsample
from .methods import Method, hyperparameters, implementation
from .train import lr_drops, train_run

__all__ = [
    "BUDGETS",
    "run_study_a",
    "run_sweep",
    "summarize_method",
    "sweep_common",
    "sweep_splits",
]

_VGG = {"name": "vgg", "widths": (16, 32, 64, 64)}
_RESNET = {"name": "preact_resnet", "widths": (16, 32, 64), "blocks": 1}

#: Sizes per mode. Measured on 2 idle cores of the project machine (torch 2.13, CPU), with
#: the 8 methods of before SGDP/AdamP/AdamW: the quick study A (120k training and 48k test
#: images through the VGG net) took 115 s, about 0.85 ms per training image (a test image a
#: third of that); the pre-activation ResNet costs about the same. A training step of the
#: three peers costs what the others' does (0.7-1.1x SGD's, 1 thread, this machine), so 11
#: methods cost 11/8 of 8: the quick study trains on 3,500 images instead of 5,000 to stay
#: at about 115 s (137k image-equivalents, was 136k). Estimated from that: full study A
#: about 75 min (54 min with 8 methods), sweep with --quick about 16 min, with --full about
#: 43 min (measured with 8 methods: 28 min with --quick, 1 thread, and 55 min with --full,
#: 2 cores, both on a machine shared with other work).
#: A machine shared with other jobs can take twice as long.
BUDGETS = {
    "smoke": {
        "models": [
            {
                "key": "vgg",
                "model": {"name": "vgg", "widths": (4, 8, 8, 8)},
                "train": 512,
                "test": 256,
                "epochs": 2,
                "batch_size": 64,
                "max_batches": 2,
            },
            {
                "key": "preact_resnet",
                "model": {"name": "preact_resnet", "widths": (4, 8), "blocks": 1},
                "train": 256,
                "test": 256,
                "epochs": 1,
                "batch_size": 64,
                "max_batches": 2,
            },
        ],
        "sweep": {
            "model": {"name": "vgg", "widths": (4, 8, 8, 8)},
            "fit": 256,
            "val": 128,
            "test": 128,
            "epochs": 1,
            "batch_size": 64,
            "max_batches": 2,
            "max_grid": 2,
        },
    },
    "quick": {
        "models": [
            {"key": "vgg", "model": _VGG, "train": 3500, "test": 2000, "epochs": 3},
        ],
        "sweep": {"model": _VGG, "fit": 6000, "val": 2000, "test": 2000, "epochs": 3},
    },
    "full": {
        "models": [
            {"key": "vgg", "model": _VGG, "train": None, "test": None, "epochs": 3},
            {"key": "preact_resnet", "model": _RESNET, "train": 10000, "test": 5000, "epochs": 4},
        ],
        "sweep": {"model": _VGG, "fit": 10000, "val": 5000, "test": None, "epochs": 4},
    },
}
BATCH_SIZE = 128
BASELINE = "SGD"


def _median_curve(curves: list[list[float]]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(curves, dtype=float), axis=0)]


def _layer_mean_per_epoch(angles: list[float], steps_per_epoch: int) -> list[float]:
    """Mean per-step angle (degrees) over each epoch's steps."""
    out = []
    for e in range(0, len(angles), steps_per_epoch):
        chunk = angles[e : e + steps_per_epoch]
        out.append(math.degrees(statistics.fmean(chunk)))
    return out


def _compact(log: dict, keep_steps: bool) -> dict:
    """The run log with per-epoch mean angles; the per-step series only when asked."""
    steps = len(next(iter(log["angle_per_step"].values()), []))
    epochs = len(log["train_loss"])
    per_epoch = {}
    if steps and epochs:
        per_step = max(steps // epochs, 1)
        per_epoch = {
            name: _layer_mean_per_epoch(series, per_step)
            for name, series in log["angle_per_step"].items()
        }
    out = {k: v for k, v in log.items() if k != "angle_per_step"}
    out["angle_deg_per_epoch"] = per_epoch
    if keep_steps:
        out["angle_per_step"] = log["angle_per_step"]
    return out


def summarize_method(runs: list[dict], baseline_error: float | None) -> dict:
    """The table row of one method from its runs (one per seed)."""
    final = [r["test_error"][-1] for r in runs]
    curve = _median_curve([r["test_error"] for r in runs])
    reach = None
    if baseline_error is not None:
        reach = next((i + 1 for i, e in enumerate(curve) if e <= baseline_error), None)
    angle_first, angle_last = None, None
    per_layer = [r["angle_deg_per_epoch"] for r in runs if r["angle_deg_per_epoch"]]
    if per_layer:
        angle_first = statistics.median(
            statistics.fmean(v[0] for v in p.values()) for p in per_layer
        )
        angle_last = statistics.median(
            statistics.fmean(v[-1] for v in p.values()) for p in per_layer
        )
    return {
        "test_error_median": statistics.median(final),
        "test_error_min": min(final),
        "test_error_max": max(final),
        "test_error_curve_median": curve,
        "train_loss_median": statistics.median(r["train_loss"][-1] for r in runs),
        "epochs_to_baseline": reach,
        "seconds_per_epoch": statistics.median(s for r in runs for s in r["epoch_seconds"]),
        "angle_deg_first_epoch": angle_first,
        "angle_deg_last_epoch": angle_last,
    }


def _prepare_data(spec: dict, train: Split, test: Split) -> tuple[Split, Split]:
    return subsample(train, spec.get("train")), subsample(test, spec.get("test"), seed=1)


def _model_entry(spec: dict, train: Split, test: Split, drops: list[int], methods_out: dict):
    """The result of one model from the entries of its methods so far (summaries against
    the baseline's median final error, or the first method's when the baseline is absent)."""
    base = methods_out.get(BASELINE) or next(iter(methods_out.values()))
    base_error = statistics.median(r["test_error"][-1] for r in base["runs"])
    for entry in methods_out.values():
        entry["summary"] = summarize_method(entry["runs"], base_error)
    return {
        "config": {
            **{k: v for k, v in spec.items() if k != "key"},
            "train": len(train),
            "test": len(test),
        },
        "drops": drops,
        "baseline_error": base_error,
        "baseline_method": next(k for k, v in methods_out.items() if v is base),
        "methods": methods_out,
    }


def run_study_a(
    budget: dict,
    data: tuple[Split, Split],
    methods: list[Method],
    seeds: list[int],
    device: str = "cpu",
    progress: bool = True,
    desc: str = "study A",
    on_method: Callable[[dict], None] | None = None,
) -> dict:
    """Recipe-as-published comparison for every model of ``budget``.

    Per method it also records ``on_manifold``: how many weights and points the method put
    on a manifold (the same for every seed; 0 for the Euclidean methods).
    ``on_method(result so far)`` is called after each method of each model (the CLI writes
    the summary then, so an interrupted run leaves its finished methods readable).
    """
    out: dict = {"baseline": BASELINE, "seeds": list(seeds), "models": {}}
    total = len(budget["models"]) * len(methods) * len(seeds)
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for spec in budget["models"]:
        train, test = _prepare_data(spec, *data)
        drops = lr_drops(spec["epochs"])
        methods_out: dict = {}
        for method in methods:
            runs = []
            for i, seed in enumerate(seeds):
                log = train_run(
                    method,
                    spec["model"],
                    train,
                    {"test": test},
                    epochs=spec["epochs"],
                    drops=drops,
                    seed=seed,
                    batch_size=spec.get("batch_size", BATCH_SIZE),
                    max_batches=spec.get("max_batches"),
                    device=device,
                    progress=progress,
                )
                runs.append(_compact(log, keep_steps=i == 0))
                bar.update(1)
            methods_out[method.label] = {
                "key": method.key,
                "lrs": method.lrs,
                "hyper": hyperparameters(method),
                "implementation": implementation(method),
                "on_manifold": runs[0]["on_manifold"],
                "runs": runs,
            }
            if on_method is not None:
                partial = _model_entry(spec, train, test, drops, dict(methods_out))
                on_method({**out, "models": {**out["models"], spec["key"]: partial}})
        out["models"][spec["key"]] = _model_entry(spec, train, test, drops, methods_out)
    bar.close()
    return out


def _grid_points(method: Method, max_grid: int | None) -> list[dict]:
    keys = list(method.grid)
    points = [dict(zip(keys, v, strict=True)) for v in itertools.product(*method.grid.values())]
    if not points:
        points = [dict(method.lrs)]
    return points[:max_grid] if max_grid else points


def sweep_splits(spec: dict, data: tuple[Split, Split]) -> tuple[Split, Split, Split]:
    """``(fit, val, test)`` of a sweep budget: ``spec["val"]`` validation images carved from
    the training set (the test set plays no part in a choice), then ``spec["fit"]`` of the
    rest and ``spec["test"]`` test images (fixed random subsets; None keeps all)."""
    train, test = data
    fit, val = carve_validation(train, spec["val"])
    return subsample(fit, spec.get("fit")), val, subsample(test, spec.get("test"), seed=1)


def sweep_common(spec: dict, device: str = "cpu", progress: bool = True) -> dict:
    """The keywords of ``train_run`` that every run of a sweep budget shares."""
    return {
        "epochs": spec["epochs"],
        "drops": lr_drops(spec["epochs"]),
        "batch_size": spec.get("batch_size", BATCH_SIZE),
        "max_batches": spec.get("max_batches"),
        "device": device,
        "progress": progress,
        "track_angles": False,
    }


def run_sweep(
    budget: dict,
    data: tuple[Split, Split],
    methods: list[Method],
    seeds: list[int],
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Learning rates chosen on a validation split, then compared on the test set."""
    spec = budget["sweep"]
    fit, val, test = sweep_splits(spec, data)
    common = sweep_common(spec, device, progress)
    drops = common["drops"]
    grids = {m.key: _grid_points(m, spec.get("max_grid")) for m in methods}
    total = sum(len(g) + len(seeds) - 1 for g in grids.values())
    bar = tqdm(total=total, desc="sweep", disable=not progress)
    out: dict = {
        "config": {**spec, "fit": len(fit), "val": len(val), "test": len(test)},
        "drops": drops,
        "methods": {},
    }
    for method in methods:
        trials = []
        for lrs in grids[method.key]:
            try:
                log = train_run(
                    method,
                    spec["model"],
                    fit,
                    {},
                    seed=seeds[0],
                    lrs=lrs,
                    final_evals={"val": val, "test": test},
                    **common,
                )
                trials.append({"lrs": lrs, "val_error": log["final_val_error"], "log": log})
            except FloatingPointError:  # a diverging grid point is simply not chosen
                trials.append({"lrs": lrs, "val_error": None, "log": None})
            bar.update(1)
        finite = [t for t in trials if t["val_error"] is not None]
        if not finite:
            raise FloatingPointError(f"sweep: every grid point of {method.label} diverged")
        best = min(finite, key=lambda t: t["val_error"])
        runs = [best["log"]]
        for seed in seeds[1:]:
            runs.append(
                train_run(
                    method,
                    spec["model"],
                    fit,
                    {},
                    seed=seed,
                    lrs=best["lrs"],
                    final_evals={"test": test},
                    **common,
                )
            )
            bar.update(1)
        finals = [r["final_test_error"] for r in runs]
        out["methods"][method.label] = {
            "key": method.key,
            "hyper": hyperparameters(method),
            "implementation": implementation(method),
            # the test error of the non-chosen grid points is not kept: it played no part
            "grid": [{"lrs": t["lrs"], "val_error": t["val_error"]} for t in trials],
            "chosen": best["lrs"],
            "val_error": best["val_error"],
            "test_error_median": statistics.median(finals),
            "test_error_min": min(finals),
            "test_error_max": max(finals),
            "train_loss_median": statistics.median(r["train_loss"][-1] for r in runs),
            "test_errors": finals,
            "seconds_per_epoch": statistics.median(s for r in runs for s in r["epoch_seconds"]),
        }
    bar.close()
    return out
