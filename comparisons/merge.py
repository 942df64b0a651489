"""Merge the ``results.json`` of several runs into one summary (later runs win per study).

The README's results come from more than one run (``--full`` for studies A-C, then
``--full --study sweep --sweep``, then a rerun of study C after a speed change); this puts
them into one ``summary.md`` / ``results.json`` / plots, and the summary lists every run's
command and wall time.

Example::

    python -m comparisons.merge docs/results /tmp/full/results.json /tmp/sweep/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report

__all__ = ["merge_results"]

STUDY_ORDER = ("A", "sweep", "B", "C")


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
        merged.update({k: v for k, v in run.items() if k != "meta"})
    meta = dict(runs[0].get("meta", {}))
    meta["studies"] = [s for s in STUDY_ORDER if s in merged]
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
