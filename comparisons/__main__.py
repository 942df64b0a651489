"""Command line: ``python -m comparisons [--quick | --full | --smoke] [options]``.

Runs the selected studies and writes ``summary.md``, ``results.json`` and PNG plots into
``--out`` (default ``results/``), rewritten after each study so that a long run leaves its
finished part behind. Bad input (unknown study or method, unwritable ``--out``, missing
data, bad seeds or device) prints one line ``error: ...`` and exits with status 2.

Examples::

    python -m comparisons                       # --quick: all studies, <= 5 min on 2 cores
    python -m comparisons --full --out results  # the README's table (about 75 min)
    python -m comparisons --sweep --study sweep # only the learning-rate sweep
    python -m comparisons --study B --seeds 0,1,2
    python -m comparisons --study lr            # LR sensitivity, CI size (< 30 s)
    python -m comparisons --study lr --full --methods sgd,sgdg --threads 1
    python -m comparisons --study gn --full     # beyond BatchNorm: GroupNorm, QK-norm
    python -m comparisons --long                # the long budget (about 1 h, 2 jobs)
    python -m comparisons --long --methods sgd,sgdg --seeds 0 --jobs 1

Study ``gn`` runs only its own methods (``comparisons.study_gn.METHOD_KEYS``: sgd, sgdp,
adamw, adamp, sgdg, adamg); ``--methods`` naming another one is refused for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STUDIES = ("A", "sweep", "lr", "gn", "B", "C", "long")
DEFAULT_SEEDS = {"smoke": [0], "quick": [0], "full": [0, 1]}


class UsageError(ValueError):
    """Bad command-line input; its message is printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m comparisons",
        description="SGD-G / Adam-G against geoopt's sphere optimizers and torch.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small budget, <= 5 min on 2 CPU cores (default)",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the README's budget, about 75 min on 2 idle CPU cores",
    )
    mode.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="a few batches per study (CI), < 1 min",
    )
    p.set_defaults(mode=None)  # quick, unless --long
    p.add_argument("--out", default="results", help="output directory (default: results/)")
    p.add_argument(
        "--study",
        default=None,
        help="comma-separated studies among A, B, C, sweep, lr, gn, long (default: A,B,C); lr "
        "is the learning-rate sensitivity study: a CI-sized run with --smoke/--quick, the real "
        "one with --full (5-8 min a method with 2 seeds, 1 thread, on a shared 2-core "
        "machine); gn is the study beyond BatchNorm (a GroupNorm CNN and a QK-norm "
        "transformer; methods sgd, sgdp, adamw, adamp, sgdg, adamg; --full 13 min with 2 "
        "seeds, measured on the shared 2-core machine); long is the long budget (see "
        "--long), CI-sized with --smoke/--quick",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help="the long budget: --study long --full (60k images, 15 epochs, 3 seeds, 6 methods "
        "at the learning rates the lr study chose; about an hour as 2 jobs on 2 idle cores: "
        "116 CPU-minutes measured)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also run the learning-rate sweep chosen on a validation split "
        "(estimated on 2 idle cores: about 16 min with --quick, 43 min with --full)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated study-A methods (default: all): "
        "sgd, sgdg, adamg, rsgd-sphere, rsgd-sphereexact, radam-sphere, "
        "radam-sphereexact, adam, sgdp, adamp, adamw",
    )
    p.add_argument("--seeds", default=None, help="comma-separated integer seeds")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, ...")
    p.add_argument("--data", default=None, help="directory with the Fashion-MNIST idx files")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes of the long study, 1 thread each unless --threads "
        "(default: 2 with --full, else 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_studies(text: str | None, sweep: bool, long: bool = False) -> list[str]:
    if text is None:
        text = "long" if long else "A,B,C"
    elif long:
        text += ",long"
    by_name = {s.lower(): s for s in STUDIES}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown or not names:
        raise UsageError(
            f"unknown study name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"known: {', '.join(STUDIES)}"
        )
    chosen = {by_name[n.lower()] for n in names} | ({"sweep"} if sweep else set())
    return [s for s in STUDIES if s in chosen]


def parse_seeds(text: str | None, mode: str) -> list[int]:
    if text is None:
        return list(DEFAULT_SEEDS[mode])
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds must be non-negative integers, got {text!r}")
    return list(dict.fromkeys(seeds))


def check_out_dir(out: str) -> Path:
    """Create ``out`` and prove it writable, or raise UsageError."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(f"--out {out!r} is not a writable directory ({reason})") from None
    return path


def check_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run(args: argparse.Namespace) -> list[Path]:
    """Validate everything, then run the studies; returns the files written."""
    if args.long and args.mode not in (None, "full"):
        raise UsageError(f"--long runs the full budget; it cannot be combined with --{args.mode}")
    args.mode = "full" if args.long else args.mode or "quick"
    studies = parse_studies(args.study, args.sweep, args.long)
    seeds = parse_seeds(args.seeds, args.mode)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    from .methods import missing_packages, parse_methods
    from .study_long import DEFAULT_METHODS

    try:
        methods = parse_methods(args.methods)
        long_methods = parse_methods(args.methods or DEFAULT_METHODS)
    except ValueError as err:
        raise UsageError(str(err)) from None
    gn_methods = None
    if "gn" in studies:
        from .study_gn import check_methods, default_methods

        gn_methods = default_methods() if args.methods is None else methods
        try:
            check_methods(gn_methods)
        except ValueError as err:
            raise UsageError(str(err)) from None
    needs_data = bool({"A", "sweep", "lr", "gn", "long"} & set(studies))
    if needs_data:
        uses_a = bool({"A", "sweep", "lr"} & set(studies))  # study A's methods
        wanted = (methods if uses_a else []) + (long_methods if "long" in studies else [])
        missing = missing_packages(wanted + (gn_methods or []))
        if missing:
            needs = "; ".join(f"{', '.join(keys)} need(s) {pkg}" for pkg, keys in missing.items())
            raise UsageError(
                f'{needs}, which is not installed: pip install -e ".[compare]" '
                "(or leave the method(s) out with --methods)"
            )
    out = check_out_dir(args.out)

    import geoopt
    import torch

    from . import report, study_a, study_b, study_c, study_gn, study_long, study_lr
    from .data import DataError, load_fashion_mnist

    device = check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = None
    if needs_data:
        try:
            data = load_fashion_mnist(args.data)
        except DataError as err:
            raise UsageError(str(err)) from None
    if "lr" in studies:
        try:  # a budget that cannot fit is refused before anything runs
            study_lr.check_budget(study_lr.BUDGETS[args.mode], len(data[0]))
        except ValueError as err:
            raise UsageError(str(err)) from None
    if "long" in studies:
        try:
            study_long.check_budget(study_long.budget_for(args.mode, device), len(data[0]))
        except ValueError as err:
            raise UsageError(str(err)) from None

    progress = not args.no_progress
    # the long study's seeds: its budget's, unless --seeds
    long_seeds = (
        seeds if args.seeds is not None else study_long.budget_for(args.mode, device)["seeds"]
    )
    start = time.perf_counter()
    results: dict = {
        "meta": {
            "mode": args.mode,
            "studies": studies,
            # a run of the long study alone: its seeds
            "seeds": long_seeds if studies == ["long"] else seeds,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "geoopt": geoopt.__version__,
            "adamp": _package_version("adamp"),
            "command": "python -m comparisons " + " ".join(sys.argv[1:]),
            "seconds": 0.0,
            "study_seconds": {},
            "study_cpu_seconds": {},
        }
    }
    files: list[Path] = []

    def save_partial(study: str, plots: tuple[str, ...] = ()) -> Callable[[dict], None]:
        """A callback that writes the summary with ``study``'s result so far: the finished
        part of a long study survives an interrupt."""

        def write(partial: dict) -> None:
            results["meta"]["seconds"] = time.perf_counter() - start
            report.write_all({**results, study: partial}, out, plots=plots)

        return write

    for study in studies:
        t0, c0 = time.perf_counter(), time.process_time()
        if study == "A":
            budget = study_a.BUDGETS[args.mode]
            results["A"] = study_a.run_study_a(budget, data, methods, seeds, device, progress)
        elif study == "sweep":
            budget = study_a.BUDGETS[args.mode]
            results["sweep"] = study_a.run_sweep(budget, data, methods, seeds, device, progress)
        elif study == "lr":
            budget = study_lr.BUDGETS[args.mode]
            results["lr"] = study_lr.run_lr_study(
                budget,
                data,
                methods,
                seeds,
                device,
                progress,
                on_method=save_partial("lr", plots=("lr",)),
            )
        elif study == "gn":
            budget = study_gn.BUDGETS[args.mode]
            results["gn"] = study_gn.run_gn_study(
                budget, data, gn_methods, seeds, device, progress, on_method=save_partial("gn")
            )
        elif study == "long":
            results["long"] = study_long.run_long_study(
                study_long.budget_for(args.mode, device),
                data,
                long_methods,
                long_seeds,
                device,
                progress,
                jobs=args.jobs,
                threads=args.threads or 1,
                on_run=save_partial("long"),
            )
            print("\n".join(report.long_time_lines(results["long"])), flush=True)
        elif study == "B":
            results["B"] = study_b.run_study_b(study_b.BUDGETS[args.mode], seeds, progress)
        else:
            budget = study_c.BUDGETS[args.mode]
            results["C"] = study_c.run_study_c(budget, progress, device=device)
            print("\n".join(study_c.summary_lines(results["C"])), flush=True)
        results["meta"]["study_seconds"][study] = time.perf_counter() - t0
        results["meta"]["study_cpu_seconds"][study] = time.process_time() - c0
        results["meta"]["seconds"] = time.perf_counter() - start
        # summary and json after every study (a long run leaves its finished part behind)
        written = report.write_all(results, out, plots=(study,))
        files = list(dict.fromkeys(files + written))
    return files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} files to {files[0].parent if files else args.out}/")
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
