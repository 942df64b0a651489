"""The long budget: the paper's claims checked over a full schedule, each method at its chosen LR.

Every method trains the same network from the same initial weights on the same batches
(``seed`` fixes both), for ``epochs`` epochs of the whole training set, with the paper's
schedule scaled to the budget: every learning rate x0.2 at 30, 60 and 80 % of training
(:func:`comparisons.train.lr_drops` with ``FRACTIONS``). Each method runs at the learning
rates that the sensitivity study chose for it on a validation split (:data:`CHOSEN_LRS`,
from ``docs/results/lr_sensitivity.md``; that study used a wider VGG on 3,500 images, so
the choice is transferred, not re-tuned). The paper's claims (Cho & Lee 2017, section 5),
one measure each (:func:`summarize_method`):

* **final test error**: median and min-max over seeds after the last epoch;
* **final training loss**: cross entropy of the final model on the whole training set, in
  eval mode (and the last epoch's running mean);
* **the plateau after each LR drop**: the relative decrease of the training loss from the
  ``window`` steps before the drop to the ``window`` steps ending ``plateau_steps`` steps
  after it, ``100 (before - after) / before`` (how much the drop itself gives); the
  relative decrease of the epoch-mean training loss over the rest of the phase, from the
  first epoch at the new rate to the last one before the next drop (or the end): a plateau
  scores near 0, a method that keeps learning scores high; and the test error one epoch
  after the drop minus the test error just before it (points; negative is better);
* **epochs to reach SGD's final error**: the first epoch at which the method's median
  test-error curve is at or below SGD's final median error.

Runs are independent, so ``jobs`` worker processes (spawned, ``threads`` torch threads each)
share them; a finished run is reported at once (``on_run``), so an interrupted study leaves
every finished run readable. Seeds run in order: a partial result has every method at the
first seed before any at the second.

Example::

    result = run_long_study(BUDGETS["smoke"], data, [METHODS["sgd"]], [0])
    result["methods"]["SGD"]["summary"]["test_error_median"]
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm import tqdm

from .data import Split, subsample
from .methods import METHODS, Method, hyperparameters, implementation
from .train import lr_drops, train_run

__all__ = [
    "BUDGETS",
    "CHOSEN_LRS",
    "DEFAULT_METHODS",
    "FRACTIONS",
    "budget_for",
    "check_budget",
    "merge_long",
    "drop_measures",
    "phase_decrease",
    "resummarize",
    "run_long_study",
    "summarize_method",
]

#: the paper's schedule (x0.2 at 30/60/80 % of the epochs), scaled to the budget
FRACTIONS = (0.3, 0.6, 0.8)
_SQRT10 = math.sqrt(10.0)

#: The learning rates the sensitivity study chose on its validation split
#: (``python -m comparisons --study lr --full``, docs/results/lr_sensitivity.md): the
#: published value x sqrt(10)^k at the chosen grid point k. Manifold methods: ``lr`` of the
#: plain parameters fixed first, then ``lr_g`` swept.
CHOSEN_LRS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1 * _SQRT10},
    "sgdp": {"lr": 0.1},
    "adam": {"lr": 1e-3 * 10.0},
    "adamw": {"lr": 1e-3 * 10.0},
    "adamp": {"lr": 1e-3 * _SQRT10},
    "sgdg": {"lr": 0.1, "lr_g": 0.2 / _SQRT10},
    "adamg": {"lr": 0.1, "lr_g": 0.05},
    "rsgd-sphere": {"lr": 0.1, "lr_g": 0.2 * _SQRT10},
    "rsgd-sphereexact": {"lr": 0.01, "lr_g": 0.2 * _SQRT10},
    "radam-sphere": {"lr": 0.1, "lr_g": 0.05 * _SQRT10},
    "radam-sphereexact": {"lr": 0.1, "lr_g": 0.05 * _SQRT10},
}

#: what ``--study long`` runs without ``--methods``: ours and the peers a user would pick
DEFAULT_METHODS = ("sgd", "sgdp", "adamw", "adamp", "sgdg", "adamg")

_TINY = {"name": "vgg", "widths": (4, 8, 8, 8)}
#: ``full``: the whole training set (60,000 images) and test set, 15 epochs, 3 seeds by
#: default; VGG with half study A's widths (16k parameters), so that the 6 default methods x
#: 3 seeds (18 runs of 900,000 training images) fit in about an hour as two 1-thread
#: processes on 2 idle cores. Measured (``python -m comparisons --long``, 2026-12-02, torch
#: 2.13 CPU): 116 min of CPU time in all, 6.1-6.8 min a run; 91.6 min of wall time on the
#: project's 2-core machine shared with other work. ``smoke`` and ``quick`` are the CI sizes.
BUDGETS = {
    "smoke": {
        "model": _TINY,
        "train": 256,
        "test": 128,
        "epochs": 3,
        "batch_size": 64,
        "max_batches": 2,
        "jobs": 1,
        "plateau_steps": 1,
        "window": 1,
        "seeds": [0],
    },
    "quick": {
        "model": _TINY,
        "train": 512,
        "test": 256,
        "epochs": 4,
        "batch_size": 64,
        "jobs": 1,
        "plateau_steps": 4,
        "window": 2,
        "seeds": [0],
    },
    "full": {
        "model": {"name": "vgg", "widths": (8, 16, 32, 32)},
        "train": None,
        "test": None,
        "epochs": 15,
        "batch_size": 128,
        "jobs": 2,
        "plateau_steps": 200,
        "window": 50,
        "seeds": [0, 1, 2],
    },
}


#: ``--long --device cuda``: the same protocol (data, epochs, schedule, seeds, rates) with
#: study A's VGG at 4x its widths (about 1M parameters), one process: the GPU run beside the
#: CPU table. Prepared, not yet run (no GPU has been available to this project).
BUDGETS["gpu"] = {
    **BUDGETS["full"],
    "model": {"name": "vgg", "widths": (64, 128, 256, 256)},
    "jobs": 1,
}


def budget_for(mode: str, device: str | torch.device) -> dict:
    """The budget of ``mode`` on ``device``: ``"gpu"`` for ``--full`` on CUDA.

    >>> budget_for("full", "cuda")["model"]["widths"], budget_for("full", "cpu")["jobs"]
    ((64, 128, 256, 256), 2)
    """
    return BUDGETS["gpu" if mode == "full" and torch.device(device).type == "cuda" else mode]


def check_budget(budget: dict, n_train: int) -> None:
    """Raise ValueError when ``budget`` cannot run on ``n_train`` training images."""
    n = n_train if budget.get("train") is None else min(budget["train"], n_train)
    if n < budget["batch_size"]:
        raise ValueError(
            f"the long study needs at least one batch ({budget['batch_size']} images) of "
            f"training data, got {n}"
        )
    if not lr_drops(budget["epochs"], FRACTIONS):
        raise ValueError(f"the long study needs epochs with LR drops, got {budget['epochs']}")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def drop_measures(
    step_loss: list[float],
    test_error: list[float],
    drops: list[int],
    steps_per_epoch: int,
    plateau_steps: int,
    window: int,
) -> list[dict]:
    """Per LR drop (0-based epoch ``d``, the first at the lower rate), how training goes on.

    ``loss_decrease_pct``: ``100 (before - after) / before`` with ``before`` the mean loss
    of the ``window`` steps before the drop and ``after`` the mean of the ``window`` steps
    ending ``plateau_steps`` steps after it (None when the run is too short for either);
    ``error_change``: test error after epoch ``d`` minus after epoch ``d - 1`` (points).

    >>> loss = [2.0] * 4 + [1.0] * 4  # a drop at step 4 halves the loss at once
    >>> drop_measures(loss, [30.0, 20.0], [1], 4, 2, 2)
    [{'epoch': 1, 'loss_decrease_pct': 50.0, 'error_change': -10.0}]
    """
    out = []
    for d in drops:
        s = d * steps_per_epoch
        decrease = None
        if window <= plateau_steps and s - window >= 0 and s + plateau_steps <= len(step_loss):
            before = _mean(step_loss[s - window : s])
            after = _mean(step_loss[s + plateau_steps - window : s + plateau_steps])
            decrease = 100.0 * (before - after) / before
        change = None
        if 1 <= d < len(test_error):
            change = test_error[d] - test_error[d - 1]
        out.append({"epoch": d, "loss_decrease_pct": decrease, "error_change": change})
    return out


def phase_decrease(epoch_loss: list[float], drops: list[int]) -> list[float | None]:
    """Per drop, ``100 (L[d] - L[last]) / L[d]``: the relative decrease of the epoch-mean
    training loss ``L`` from the first epoch at the new rate ``d`` to the last epoch before
    the next drop (or the last epoch); None when the phase has a single epoch.

    >>> phase_decrease([4.0, 3.0, 2.0, 1.0, 0.5, 0.5], [2, 4])
    [50.0, 0.0]
    """
    ends = [*drops[1:], len(epoch_loss)]
    out: list[float | None] = []
    for d, end in zip(drops, ends, strict=True):
        last = min(end, len(epoch_loss)) - 1
        out.append(100.0 * (epoch_loss[d] - epoch_loss[last]) / epoch_loss[d] if last > d else None)
    return out


def _median_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


_DROP_KEYS = ("loss_decrease_pct", "phase_decrease_pct", "error_change")


def _run_drops(run: dict, drops: list[int], config: dict) -> list[dict]:
    """:func:`drop_measures` and :func:`phase_decrease` of one finished run."""
    measures = drop_measures(
        run["step_loss"],
        run["test_error"],
        drops,
        run["steps_per_epoch"],
        config["plateau_steps"],
        config["window"],
    )
    phases = phase_decrease(run["train_loss"], drops)
    return [{**m, "phase_decrease_pct": p} for m, p in zip(measures, phases, strict=True)]


def summarize_method(
    runs: list[dict], baseline_error: float | None, drops: list[int], config: dict
) -> dict:
    """The table row of one method from its finished runs (diverged runs counted apart);
    every measure is computed here from the runs' logs (``step_loss``, ``train_loss``,
    ``test_error``), with ``config``'s ``window`` and ``plateau_steps``."""
    done = [r for r in runs if not r.get("diverged")]
    summary: dict = {"runs": len(runs), "diverged": len(runs) - len(done)}
    if not done:
        return summary
    finals = [r["test_error"][-1] for r in done]
    epochs = min(len(r["test_error"]) for r in done)
    curve = [statistics.median(r["test_error"][i] for r in done) for i in range(epochs)]
    reach = None
    if baseline_error is not None:
        reach = next((i + 1 for i, e in enumerate(curve) if e <= baseline_error), None)
    per_run = [_run_drops(r, drops, config) for r in done]
    summary.update(
        {
            "test_error_median": statistics.median(finals),
            "test_error_min": min(finals),
            "test_error_max": max(finals),
            "test_error_curve_median": curve,
            "final_train_loss_median": statistics.median(r["final_train_loss"] for r in done),
            "final_train_loss_min": min(r["final_train_loss"] for r in done),
            "final_train_loss_max": max(r["final_train_loss"] for r in done),
            "last_epoch_loss_median": statistics.median(r["train_loss"][-1] for r in done),
            "epochs_to_baseline": reach,
            "drops": [
                {
                    "epoch": d,
                    **{key: _median_or_none([m[k][key] for m in per_run]) for key in _DROP_KEYS},
                }
                for k, d in enumerate(drops)
            ],
            "seconds_per_run": statistics.median(r["seconds"] for r in done),
            "cpu_seconds_per_run": statistics.median(r["cpu_seconds"] for r in done),
        }
    )
    return summary


# ------------------------------------------------------------------ one run (any process)
_WORKER: dict = {}


def _init_worker(data: tuple[Split, Split], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"] = data


def _one_run(key: str, seed: int, lrs: dict, budget: dict, device: str) -> dict:
    """Train one method with one seed; the compact log the study keeps."""
    train, test = _WORKER["data"]
    epochs = budget["epochs"]
    drops = lr_drops(epochs, FRACTIONS)
    steps_per_epoch = math.ceil(len(train) / budget["batch_size"])
    if budget.get("max_batches") is not None:
        steps_per_epoch = min(steps_per_epoch, budget["max_batches"])
    t0, c0 = time.perf_counter(), time.process_time()
    base = {"key": key, "seed": seed, "lrs": lrs}
    try:
        log = train_run(
            METHODS[key],
            budget["model"],
            train,
            {"test": test},
            epochs=epochs,
            drops=drops,
            seed=seed,
            batch_size=budget["batch_size"],
            lrs=lrs,
            max_batches=budget.get("max_batches"),
            device=device,
            progress=False,
            track_angles=False,
            final_evals={"train": train},
            step_losses=True,
        )
    except FloatingPointError as err:
        return {**base, "diverged": str(err), "seconds": time.perf_counter() - t0}
    return {
        **base,
        "test_error": log["test_error"],
        "train_loss": log["train_loss"],
        "step_loss": log["step_loss"],
        "final_train_loss": log["final_train_loss"],
        "final_train_error": log["final_train_error"],
        "steps_per_epoch": steps_per_epoch,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def _one_run_task(args: tuple) -> dict:
    return _one_run(*args)


# ------------------------------------------------------------------------------ the study
def _result(
    budget: dict, train: Split, test: Split, methods: list[Method], seeds: list[int]
) -> dict:
    out: dict = {
        "config": {**budget, "train": len(train), "test": len(test)},
        "drops": lr_drops(budget["epochs"], FRACTIONS),
        "seeds": list(seeds),
        "baseline": None,
        "methods": {},
    }
    for m in methods:
        out["methods"][m.label] = {
            "key": m.key,
            "lrs": CHOSEN_LRS.get(m.key, dict(m.lrs)),
            "lrs_from": "lr study" if m.key in CHOSEN_LRS else "published",
            "hyper": hyperparameters(m),
            "implementation": implementation(m),
            "runs": [],
        }
    return out


def resummarize(out: dict) -> dict:
    """Recompute every summary of a long-study result from its runs' logs (after each run,
    after merging runs, or with a newer version of the measures); returns ``out``, changed
    in place."""
    by_key = {v["key"]: v for v in out["methods"].values()}
    base = by_key.get("sgd")
    base_error = None
    if base is not None:
        finals = [r["test_error"][-1] for r in base["runs"] if not r.get("diverged")]
        base_error = statistics.median(finals) if finals else None
    out["baseline"] = "SGD" if base is not None else None
    out["baseline_error"] = base_error
    for entry in out["methods"].values():
        entry["runs"].sort(key=lambda r: r["seed"])
        entry["summary"] = summarize_method(entry["runs"], base_error, out["drops"], out["config"])
    return out


def merge_long(a: dict, b: dict) -> dict:
    """The long study with the seeds of ``a`` and ``b`` when both ran the same budget and
    methods with disjoint seeds (runs concatenated), else ``b``; summaries recomputed."""
    same = (
        a.get("config") == b.get("config")
        and a.get("drops") == b.get("drops")
        and set(a["methods"]) == set(b["methods"])
        and not set(a["seeds"]) & set(b["seeds"])
    )
    if not same:
        return resummarize(b)
    out = {**a, "seeds": sorted([*a["seeds"], *b["seeds"]]), "methods": {}}
    for label, entry in a["methods"].items():
        out["methods"][label] = {**entry, "runs": entry["runs"] + b["methods"][label]["runs"]}
    out["seconds"] = a.get("seconds", 0.0) + b.get("seconds", 0.0)
    out["cpu_seconds"] = a.get("cpu_seconds", 0.0) + b.get("cpu_seconds", 0.0)
    return resummarize(out)


def run_long_study(
    budget: dict,
    data: tuple[Split, Split],
    methods: list[Method],
    seeds: list[int],
    device: str = "cpu",
    progress: bool = True,
    jobs: int | None = None,
    threads: int = 1,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Every method x seed of the long budget; ``on_run(result so far)`` after each run.

    ``jobs`` worker processes (default ``budget["jobs"]``) with ``threads`` torch threads
    each; ``jobs == 1`` runs in this process with its current threads.
    """
    check_budget(budget, len(data[0]))
    train = subsample(data[0], budget.get("train"))
    test = subsample(data[1], budget.get("test"), seed=1)
    out = _result(budget, train, test, methods, seeds)
    jobs = budget["jobs"] if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    out["jobs"], out["threads"] = jobs, threads if jobs > 1 else torch.get_num_threads()
    tasks = [
        (m.key, seed, out["methods"][m.label]["lrs"], budget, str(device))
        for seed in seeds
        for m in methods
    ]
    label = {m.key: m.label for m in methods}
    bar = tqdm(total=len(tasks), desc="long study", disable=not progress)
    start, cpu_start = time.perf_counter(), time.process_time()
    child_cpu = 0.0

    def finish(run: dict) -> None:
        nonlocal child_cpu
        out["methods"][label[run["key"]]]["runs"].append(run)
        child_cpu += run.get("cpu_seconds", 0.0) if jobs > 1 else 0.0
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = time.process_time() - cpu_start + child_cpu
        resummarize(out)  # every summary current after each run
        bar.update(1)
        if on_run is not None:
            on_run(out)

    if jobs == 1:
        _init_worker((train, test), torch.get_num_threads())
        for task in tasks:
            finish(_one_run(*task))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=((train, test), threads)
        ) as pool:
            futures = [pool.submit(_one_run_task, task) for task in tasks]
            for future in as_completed(futures):
                finish(future.result())
    bar.close()
    return out
