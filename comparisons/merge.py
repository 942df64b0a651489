"""Merge the ``results.json`` of several runs into one summary.

The README's results come from more than one run (``--full`` for studies A-C, then
``--full --study sweep --sweep``, a third seed of study A, a rerun of study C after a speed
change, the lr study as two processes with different ``--methods``); this puts them into
one ``summary.md`` / ``results.json`` / plots, and the summary lists every run's command and
wall time. A later run replaces a study, except study A runs (and runs of the study beyond
BatchNorm, ``gn``, which has study A's structure) of the same models and budget
with other seeds: their seeds are added (runs concatenated, medians and the baseline's
error recomputed), lr-study runs of the same budget and seeds: their methods are added, and
long-study runs of the same budget and methods with other seeds: their seeds are added. The
long study's summaries are always recomputed from its runs' logs (the measures of the
current code).

Example::

    python -m comparisons.merge docs/results /tmp/full/results.json /tmp/sweep/results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from . import report
from .study_a import summarize_method
from .study_long import merge_long, resummarize

__all__ = ["merge_lr", "merge_results", "merge_study_a"]

STUDY_ORDER = ("A", "sweep", "lr", "gn", "long", "B", "C")


def merge_results(runs: list[dict]) -> dict:
    """One results dict: each study from the last run that has it, every run's meta kept.

    >>> a = {"meta": {"mode": "full", "command": "a", "seconds": 1.0}, "A": 1, "C": 2}
    >>> b = {"meta": {"mode": "full", "command": "b", "seconds": 2.0}, "C": 3}
    >>> m = merge_results([a, b])
    >>> m["A"], m["C"], m["meta"]["studies"], [r["command"] for r in m["meta"]["runs"]]
    (1, 3, ['A', 'C'], ['a', 'b'])
    """
    if not runs:
        raise ValueError("merge_results: no runs given")
    merged: dict = {}
    for run in runs:
        for study, value in run.items():
            if study in ("A", "gn") and study in merged:  # the same structure
                merged[study] = merge_study_a(merged[study], value)
            elif study == "lr" and "lr" in merged:
                merged["lr"] = merge_lr(merged["lr"], value)
            elif study == "long":  # summaries recomputed from the logs, by this code
                merged["long"] = (
                    merge_long(merged["long"], value) if "long" in merged else resummarize(value)
                )
            elif study != "meta":
                merged[study] = value
    meta = dict(runs[0].get("meta", {}))
    meta["studies"] = [s for s in STUDY_ORDER if s in merged]
    if isinstance(merged.get("A"), dict) and "seeds" in merged["A"]:
        meta["seeds"] = merged["A"]["seeds"]  # the seeds of the headline table
    elif isinstance(merged.get("long"), dict):
        meta["seeds"] = merged["long"]["seeds"]
    meta["runs"] = [
        {
            "command": run.get("meta", {}).get("command"),
            "studies": [s for s in STUDY_ORDER if s in run],
            "seconds": run.get("meta", {}).get("seconds"),
        }
        for run in runs
    ]
    meta["seconds"] = sum(r["seconds"] or 0.0 for r in meta["runs"])
    modes = {run.get("meta", {}).get("mode") for run in runs}
    meta["mode"] = modes.pop() if len(modes) == 1 else "mixed"
    merged["meta"] = meta
    return merged


def _same_budget(a: dict, b: dict) -> bool:
    """Same models with the same configurations and LR drops, and disjoint seeds."""
    if set(a["models"]) != set(b["models"]) or set(a["seeds"]) & set(b["seeds"]):
        return False
    return all(
        a["models"][k]["config"] == b["models"][k]["config"]
        and a["models"][k]["drops"] == b["models"][k]["drops"]
        and set(a["models"][k]["methods"]) == set(b["models"][k]["methods"])
        for k in a["models"]
    )


def merge_study_a(a: dict, b: dict) -> dict:
    """Study A with the seeds of ``a`` and ``b`` when they ran the same budget, else ``b``.

    Runs are concatenated in seed order (only the first keeps its per-step angles), and
    every summary is recomputed with :func:`comparisons.study_a.summarize_method`.
    """
    if not _same_budget(a, b):
        return b
    out = {**a, "seeds": list(a["seeds"]) + list(b["seeds"]), "models": {}}
    for key, model in a["models"].items():
        methods = {}
        for label, entry in model["methods"].items():
            extra = [
                {k: v for k, v in run.items() if k != "angle_per_step"}
                for run in b["models"][key]["methods"][label]["runs"]
            ]
            methods[label] = {**entry, "runs": entry["runs"] + extra}
        base_runs = methods[model["baseline_method"]]["runs"]
        base_error = statistics.median(r["test_error"][-1] for r in base_runs)
        for entry in methods.values():
            entry["summary"] = summarize_method(entry["runs"], base_error)
        out["models"][key] = {**model, "baseline_error": base_error, "methods": methods}
    return out


def merge_lr(a: dict, b: dict) -> dict:
    """The lr study with the methods of ``a`` then ``b`` when both ran the same budget,
    split and seeds (``b``'s row wins for a method in both), else ``b``.

    >>> a = {"config": {"fit": 1}, "drops": [], "seeds": [0], "methods": {"SGD": 1}}
    >>> merge_lr(a, {**a, "methods": {"Adam": 2}})["methods"]
    {'SGD': 1, 'Adam': 2}
    >>> merge_lr(a, {**a, "seeds": [1], "methods": {"Adam": 2}})["methods"]
    {'Adam': 2}
    """
    same = all(a.get(k) == b.get(k) for k in ("config", "drops", "seeds"))
    if not same:
        return b
    return {**a, "methods": {**a["methods"], **b["methods"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comparisons.merge", description=__doc__)
    parser.add_argument("out", help="output directory")
    parser.add_argument("runs", nargs="+", help="results.json files, earliest first")
    args = parser.parse_args(argv)
    try:
        runs = [json.loads(Path(p).read_text()) for p in args.runs]
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = merge_results(runs)
    files = report.write_all(results, Path(args.out), plots=tuple(results["meta"]["studies"]))
    print(f"wrote {len(files)} files to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
