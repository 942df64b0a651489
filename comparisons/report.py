"""Tables (Markdown), ``results.json`` and PNG plots from the studies' result dicts.

``write_all(results, out_dir)`` writes ``summary.md``, ``results.json`` and the plots and
returns the list of files written. ``results`` is ``{"meta": {...}, "A": ..., "sweep": ...,
"lr": ..., "gn": ..., "B": ..., "C": ..., "long": ...}`` with any study left out.

Example::

    results = {"meta": {"mode": "smoke"}, "C": run_study_c(BUDGETS["smoke"])}
    write_all(results, Path("results"))  # [results/summary.md, results/results.json, ...]
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

__all__ = ["long_markdown", "long_time_lines", "plot_long", "summary_markdown", "write_all"]

NONE = "—"
#: the lr study's second, noise-tolerant basin (points of validation error above the best)
WIDE_BASIN = 3.0
#: study A's methods from outside this project and geoopt, drawn dotted
PEERS = ("sgdp", "adamp", "adamw")


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return NONE
    return f"{x:.{digits}f}"


def _sci(x: float | None) -> str:
    return NONE if x is None else f"{x:.1e}"


def _spread(summary: dict, key: str, digits: int = 2) -> str:
    """``median (min–max)`` of ``summary[key + "_median" / "_min" / "_max"]``.

    >>> _spread({"e_median": 9.5, "e_min": 9.25, "e_max": 10.0}, "e")
    '9.50 (9.25–10.00)'
    """
    lo, mid, hi = (summary[f"{key}_{part}"] for part in ("min", "median", "max"))
    return f"{mid:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _budget_sentence(cfg: dict, drops: list[int], seeds: list[int]) -> str:
    """One model's data, epochs, batch, LR drops and seeds (study A and the gn study)."""
    return (
        f"{cfg['train']} training / {cfg['test']} test images, {cfg['epochs']} epochs, "
        f"batch {cfg.get('batch_size', 128)}, LR x0.2 at epochs {drops} (0-based), "
        f"seeds {seeds}."
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _lrs(lrs: dict | None) -> str:
    if not lrs:
        return NONE
    return ", ".join(f"{k}={v:g}" for k, v in lrs.items())


def _value(v) -> str:
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    return str(v)


def _hyper(hyper: dict | None) -> str:
    """``{"betas": [0.9, 0.999], "nesterov": True}`` -> ``betas=(0.9, 0.999), nesterov=True``."""
    if not hyper:
        return NONE
    return ", ".join(f"{k}={_value(v)}" for k, v in hyper.items())


def implementations_markdown(methods: dict) -> list[str]:
    """Which code steps each method, and its fixed hyper-parameters (results before these
    were recorded have neither: no table)."""
    rows = [
        [label, e["implementation"], _hyper(e.get("hyper"))]
        for label, e in methods.items()
        if "implementation" in e
    ]
    if not rows:
        return []
    header = ["Method", "implementation", "fixed hyper-parameters (learning rates above)"]
    return ["Implementations:", ""] + _table(header, rows) + [""]


def _model_name(spec: dict) -> str:
    args = ", ".join(
        f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in spec.items() if k != "name"
    )
    return f"{spec['name']}({args})"


def study_a_markdown(result: dict) -> list[str]:
    lines = ["## Study A — BN-CNN on Fashion-MNIST (recipe as published)", ""]
    for key, model in result["models"].items():
        cfg = model["config"]
        lines += [
            f"### {key}: {_model_name(cfg['model'])}",
            "",
            _budget_sentence(cfg, model["drops"], result["seeds"])
            + f" Baseline for 'epochs to reach': {model['baseline_method']} at "
            f"{model['baseline_error']:.2f}% test error.",
            "",
        ]
        header = [
            "Method",
            "learning rates",
            "test error % median (min–max)",
            "final train loss",
            f"epochs to {model['baseline_method']}'s error",
            "s / epoch",
            "angle / step (deg), first → last epoch",
        ]
        rows = []
        for label, entry in model["methods"].items():
            s = entry["summary"]
            rows.append(
                [
                    label,
                    _lrs(entry["lrs"]),
                    _spread(s, "test_error"),
                    f"{s['train_loss_median']:.4f}",
                    NONE if s["epochs_to_baseline"] is None else str(s["epochs_to_baseline"]),
                    _num(s["seconds_per_epoch"], 1),
                    f"{_num(s['angle_deg_first_epoch'], 3)} → {_num(s['angle_deg_last_epoch'], 3)}",
                ]
            )
        lines += _table(header, rows) + [""]
    models = list(result["models"].values())
    if models:
        lines += implementations_markdown(models[0]["methods"])
    return lines


def _on_manifold(entry: dict) -> str:
    counts = entry.get("on_manifold")
    if counts is None:
        return NONE
    return f"{counts['weights']} / {counts['points']}"


def gn_markdown(result: dict) -> list[str]:
    """The study beyond BatchNorm: per model, per method the weights / points it put on a
    manifold and study A's columns; a warning when a manifold method put none there."""
    from .methods import METHODS

    lines = [
        "## Beyond BatchNorm — GroupNorm CNN and QK-norm transformer on Fashion-MNIST",
        "",
        "Study A's recipe (same init, data order and LR schedule for every method, published "
        "learning rates, no sweep). 'on the manifold': how many weights, and how many points "
        "in all, the method put on a manifold (SGD-G/Adam-G: what `to_grassmann` converts; "
        "a point is a block of consecutive rows, `W.reshape(points, -1)[k]`). SGDP/AdamP "
        "guess per step which weights look scale invariant and put none on a manifold.",
        "",
    ]
    for key, model in result["models"].items():
        cfg = model["config"]
        lines += [
            f"### {key}: {_model_name(cfg['model'])}",
            "",
            _budget_sentence(cfg, model["drops"], result["seeds"]),
            "",
        ]
        empty = [
            label
            for label, e in model["methods"].items()
            if METHODS[e["key"]].geometry != "euclidean"
            and (e.get("on_manifold") or {}).get("weights") == 0
        ]
        if empty:
            lines += [
                f"**{', '.join(empty)}: 0 weights on the manifold.** `to_grassmann` converted "
                f"no weight of {key}, so these methods stepped every parameter as plain "
                "Nesterov SGD (the recipe's lr for the other parameters): this table does not "
                "compare SGD-G/Adam-G on the scale-invariant weights.",
                "",
            ]
        header = [
            "Method",
            "learning rates",
            "on the manifold (weights / points)",
            "test error % median (min–max)",
            "final train loss",
            "s / epoch",
        ]
        rows = []
        for label, entry in model["methods"].items():
            s = entry["summary"]
            rows.append(
                [
                    label,
                    _lrs(entry["lrs"]),
                    _on_manifold(entry),
                    _spread(s, "test_error"),
                    f"{s['train_loss_median']:.4f}",
                    _num(s["seconds_per_epoch"], 1),
                ]
            )
        lines += _table(header, rows) + [""]
    models = list(result["models"].values())
    if models:
        lines += implementations_markdown(models[0]["methods"])
    return lines


def sweep_markdown(result: dict) -> list[str]:
    cfg = result["config"]
    lines = [
        "## Study A — learning-rate sweep (chosen on a validation split, compared on test)",
        "",
        f"{_model_name(cfg['model'])}: {cfg['fit']} training images, {cfg['val']} validation "
        f"images carved from the training set, {cfg['test']} test images, {cfg['epochs']} "
        f"epochs, LR x0.2 at epochs {result['drops']}. Chosen by the final validation "
        "error of the first seed.",
        "",
    ]
    header = ["Method", "chosen", "grid size", "val error %", "test error % median (min–max)"]
    rows = []
    for label, e in result["methods"].items():
        rows.append(
            [
                label,
                _lrs(e["chosen"]),
                str(len(e["grid"])),
                f"{e['val_error']:.2f}",
                _spread(e, "test_error"),
            ]
        )
    return lines + _table(header, rows) + [""]


def _x(value: float) -> str:
    return f"{value:.3g}"


def lr_markdown(result: dict) -> list[str]:
    """The sensitivity table: per method the swept rate, the chosen point, its errors and
    the good basin (mean validation error within ``tolerance`` of the best)."""
    from .study_lr import basin

    cfg = result["config"]
    tol = cfg["tolerance"]
    lines = [
        "## Learning-rate sensitivity (chosen on a validation split, reported on test)",
        "",
        f"{_model_name(cfg['model'])}: {cfg['fit']} training images, {cfg['val']} validation "
        f"images carved from the training set, {cfg['test']} test images, {cfg['epochs']} "
        f"epochs, LR x0.2 at epochs {result['drops']}, seeds {result['seeds']} at every grid "
        f"point. Grid: the published value x {cfg['step']:.3g}^k, {cfg['points']} points, "
        f"widened by one point beyond the edge while the best is on it (at most "
        f"{cfg['widen']}). The Euclidean methods sweep `lr`; the manifold methods sweep "
        "`lr_g` with `lr` fixed at its best value (the best of its sweep grid at the "
        "published `lr_g`, on validation). Chosen by the mean validation error over seeds; "
        "test error at the chosen point. Good basin: the range of the swept rate where the "
        f"mean validation error, interpolated linearly in log10(rate) between grid points, "
        f"is within +{tol:g} point of the best; '≥' when it reaches the edge of the grid. "
        f"A diverged run counts as {90:g} % error. The seeds' spread of one grid point's "
        "validation error is often more than a point at small budgets: the last column, "
        f"the same basin within +{WIDE_BASIN:g} points, is less sensitive to that noise.",
        "",
    ]
    header = [
        "Method",
        "swept",
        "fixed",
        "grid (points)",
        "chosen",
        "val error %",
        "test error % median (min–max)",
        f"good basin (decades, +{tol:g} pt)",
        "basin range",
        f"basin, +{WIDE_BASIN:g} pt (decades)",
    ]
    rows = []
    for label, e in result["methods"].items():
        xs = [p["x"] for p in e["grid"]]
        b = e["basin"]
        open_ = b["open_lo"] or b["open_hi"]
        wide = basin(xs, [p["val_mean"] for p in e["grid"]], WIDE_BASIN)
        rows.append(
            [
                label,
                f"`{e['axis']}`",
                _lrs(e["fixed"]),
                f"{_x(xs[0])}–{_x(xs[-1])} ({len(xs)})",
                _x(e["chosen_x"]) + (" (edge)" if e["edge"] else ""),
                f"{e['val_error']:.2f}",
                _spread(e, "test_error"),
                ("≥ " if open_ else "") + f"{e['basin_decades']:.2f}",
                f"{_x(b['lo'])}–{_x(b['hi'])}",
                ("≥ " if wide["open_lo"] or wide["open_hi"] else "") + f"{wide['decades']:.2f}",
            ]
        )
    return lines + _table(header, rows) + [""]


def plot_lr(result: dict, out: Path) -> list[Path]:
    """Test error (median over seeds) against the swept rate, SGD-type and Adam-type."""
    rules = [("sgd", "SGD-type"), ("adam", "Adam-type")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    top, bottom = 0.0, 100.0
    for ax, (rule, title) in zip(axes[0], rules, strict=True):
        for label, e in result["methods"].items():
            if e["rule"] != rule:
                continue
            xs = [p["x"] for p in e["grid"]]
            ys = [p["test_median"] for p in e["grid"]]
            style = "--" if "Riemannian" in label else ":" if e["key"] in PEERS else "-"
            name = f"{label} ({e['axis']})"
            (line,) = ax.plot(xs, ys, style, marker="o", ms=3, label=name)
            ax.plot([e["chosen_x"]], [e["test_error_median"]], "*", ms=10, color=line.get_color())
            top = max(top, e["test_error_median"])
            bottom = min(bottom, e["test_error_median"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate swept (lr; lr_g for the manifold methods)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.set_ylim(bottom=max(0.0, bottom - 5.0), top=min(92.0, top + 20.0))
    axes[0][0].set_ylabel("test error % (median over seeds)")
    fig.suptitle("Learning-rate sensitivity: star = the point chosen on validation", fontsize=9)
    fig.tight_layout()
    path = out / "lr_sensitivity.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def long_time_lines(result: dict) -> list[str]:
    """The long study's cost: wall time and CPU time of all runs, as measured."""
    runs = sum(len(m["runs"]) for m in result["methods"].values())
    wall, cpu = result.get("seconds", 0.0), result.get("cpu_seconds", 0.0)
    return [
        f"long study: {runs} runs in {wall / 60:.1f} min of wall time, {cpu / 60:.1f} min of "
        f"CPU time ({result.get('jobs', 1)} job(s) x {result.get('threads', 1)} thread(s))"
    ]


def _pct(x: float | None) -> str:
    return NONE if x is None else f"{x:+.1f}"


def long_markdown(result: dict) -> list[str]:
    """The long budget's table: one row per method, one column per claim of the paper."""
    from .study_long import FRACTIONS

    cfg = result["config"]
    drops = result["drops"]
    fractions = "/".join(f"{round(100 * f)}" for f in FRACTIONS)
    base = result.get("baseline")
    base_error = result.get("baseline_error")
    lines = [
        "## Long budget — the paper's claims over a full schedule",
        "",
        f"{_model_name(cfg['model'])}: {cfg['train']} training / {cfg['test']} test images, "
        f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, every LR x0.2 at {fractions} % "
        f"of training (epochs {drops}, 0-based), seeds {result['seeds']}; each method at the "
        "learning rates the lr study chose on its validation split (a wider VGG on 3,500 "
        "images: transferred, not re-tuned). Final training loss: cross entropy of the final "
        "model on the whole training set (eval mode). After each drop: the training loss's "
        f"relative decrease from the {cfg['window']} steps before the drop to the "
        f"{cfg['window']} steps ending {cfg['plateau_steps']} steps after it (%: what the drop "
        "itself gives); the relative decrease of the epoch-mean training loss over the rest "
        "of the phase, from the first epoch at the new rate to the last before the next drop "
        "(%: near 0 is a plateau, higher keeps learning); the test error one epoch after the "
        "drop minus just before it (points, lower is better). Medians over seeds.",
        "",
        *long_time_lines(result),
        "",
    ]
    header = [
        "Method",
        "learning rates",
        "test error % median (min–max)",
        "final train loss median (min–max)",
        f"epochs to {base}'s {_num(base_error)} %" if base else "epochs to SGD's error",
        "loss decrease at each drop (%)",
        "loss decrease over each phase (%)",
        "test error change after drops (pt)",
        "min / run, wall (CPU)",
    ]
    rows = []
    for label, entry in result["methods"].items():
        s = entry.get("summary", {})
        if "test_error_median" not in s:
            rows.append([label, _lrs(entry["lrs"]), f"{s.get('diverged', 0)} diverged"])
            rows[-1] += [NONE] * (len(header) - 3)
            continue
        diverged = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        rows.append(
            [
                label,
                _lrs(entry["lrs"]),
                _spread(s, "test_error") + diverged,
                _spread(s, "final_train_loss", 4),
                NONE if s["epochs_to_baseline"] is None else str(s["epochs_to_baseline"]),
                " / ".join(_num(d["loss_decrease_pct"], 1) for d in s["drops"]),
                " / ".join(_num(d.get("phase_decrease_pct"), 1) for d in s["drops"]),
                " / ".join(_pct(d["error_change"]) for d in s["drops"]),
                f"{_num(s['seconds_per_run'] / 60, 1)} ({_num(s['cpu_seconds_per_run'] / 60, 1)})",
            ]
        )
    lines += _table(header, rows) + [""]
    lines += implementations_markdown(result["methods"])
    return lines


def plot_long(result: dict, out: Path) -> list[Path]:
    """Training loss per step (median over seeds, smoothed) and test error per epoch."""
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for label, entry in result["methods"].items():
        runs = [r for r in entry["runs"] if not r.get("diverged")]
        if not runs:
            continue
        steps = min(len(r["step_loss"]) for r in runs)
        per_epoch = runs[0]["steps_per_epoch"]
        loss = [statistics.median(r["step_loss"][i] for r in runs) for i in range(steps)]
        window = max(1, per_epoch // 10)
        smooth = _smooth(loss, window)
        x = [(i + 1) / per_epoch for i in range(len(smooth))]
        if len(smooth) > 2 * per_epoch:  # from epoch 1 on: the first epoch squeezes the rest
            x, smooth = x[per_epoch:], smooth[per_epoch:]
        style = ":" if entry.get("key") in PEERS else "-"
        ax_loss.plot(x, smooth, style, lw=1, label=label)
        curve = entry["summary"]["test_error_curve_median"]
        ax_err.plot(range(1, len(curve) + 1), curve, style, marker="o", ms=3)
    for ax in (ax_loss, ax_err):
        for i, d in enumerate(result["drops"]):
            x = d if ax is ax_loss else d + 0.5
            ax.axvline(x, color="grey", ls=":", lw=1, label="LR x0.2" if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss per step (median, smoothed)")
    ax_err.set_ylabel("test error % (median over seeds)")
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=7, frameon=False)
    fig.suptitle("Long budget: same init, data order and LR schedule", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = out / "long_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def study_b_markdown(result: dict) -> list[str]:
    lines = [
        "## Study B — Rayleigh quotient on G(1,n)",
        "",
        f"Iterations and seconds until f(y) - f* <= {result['tol']:g} (f* from numpy.linalg.eigh; "
        f"eigengap {result['eigengap']:g}, at most {result['max_iters']} iterations). Torch "
        "methods: best point of a small lr (momentum) grid; pymanopt: untuned.",
        "",
    ]
    for n, entry in result["sizes"].items():
        lines += [f"### n = {n}", ""]
        header = ["Method", "hyper-parameters", "iterations", "seconds", "reached", "final gap"]
        rows = []
        for label, s in entry["methods"].items():
            its = s["iterations"]
            rows.append(
                [
                    label,
                    _lrs(s["hyper"]),
                    NONE if its is None else f"{its:.0f}",
                    _num(s["seconds"], 3),
                    f"{s['reached']}/{s['runs']}",
                    _sci(s["final_gap"]),
                ]
            )
        lines += _table(header, rows) + [""]
    return lines


def _mib(n: int | None) -> str:
    return NONE if n is None else f"{n / 2**20:.1f}"


def study_c_markdown(result: dict) -> list[str]:
    lines = [
        "## Study C — optimizer step time",
        "",
        f"Conv weights of a ResNet-18 ({result['n_params']:,} parameters), one `step()` with a "
        f"fixed gradient, methods interleaved, median of {result['rounds']} rounds, "
        f"{result['threads']} thread(s). Ratio = time / time of the torch baseline (foreach). "
        "State = bytes of every tensor in `optimizer.state` after the timed steps.",
        "",
    ]
    sizes, state_ratios = result.get("state_bytes", {}), result.get("state_ratios", {})
    header = ["Method", "baseline", "step time ratio", "state MiB (baseline's)", "state ratio"]
    rows = []
    for label, ratio in result["ratios"].items():
        base = result["baseline_of"][label]
        state = state_ratios.get(label)
        rows.append(
            [
                label,
                base,
                f"{ratio:.2f}",
                f"{_mib(sizes.get(label))} ({_mib(sizes.get(base))})",
                NONE if state is None else f"{state:.2f}",
            ]
        )
    lines += _table(header, rows) + [""]
    speedups = result.get("speedups", {})
    if speedups:
        lines += [
            "Speed-up over geoopt on the same weights (geoopt's step time / ours): "
            + ", ".join(f"{ours} {value:.1f}x" for ours, value in speedups.items())
            + ".",
            "",
        ]
    if "train_step" in result:
        lines += _train_step_markdown(result["train_step"])
    return lines


def _train_step_markdown(train: dict) -> list[str]:
    lines = [
        "### One training step of a BN-CNN",
        "",
        f"{_model_name(train['model'])} ({train['n_params']:,} parameters), batch "
        f"{train['batch']} of 28x28 random images: zero_grad, forward, backward and `step()`, "
        f"each method on its own copy of the same initial model, interleaved, median of "
        f"{train['rounds']} rounds. Paper recipe = `to_grassmann` + `paper_optimizer`; "
        "torch SGD with Nesterov momentum 0.9 and weight decay 5e-4.",
        "",
    ]
    header = ["Method", "baseline", "ms / step (baseline's)", "training step ratio"]
    seconds = train["median_seconds"]
    rows = [
        [
            label,
            base,
            f"{1e3 * seconds[label]:.1f} ({1e3 * seconds[base]:.1f})",
            f"{train['ratios'][label]:.2f}",
        ]
        for label, base in train["baseline_of"].items()
        if label in train["ratios"]
    ]
    return lines + _table(header, rows) + [""]


def summary_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [
        "# rbn_geoopt comparisons",
        "",
        f"Mode `{meta.get('mode')}`, device `{meta.get('device')}`, seeds {meta.get('seeds')}, "
        f"torch {meta.get('torch')}, geoopt {meta.get('geoopt')}, "
        + (f"adamp {meta['adamp']}, " if meta.get("adamp") else "")
        + f"wall time {meta.get('seconds', 0):.0f} s.",
        "",
    ]
    if meta.get("runs"):  # merged from several runs (comparisons.merge)
        lines += ["Merged from these runs (later runs replace a study):", ""]
        for run in meta["runs"]:
            studies = ", ".join(run["studies"])
            lines.append(f"* `{run['command']}`: {studies} ({run['seconds'] or 0:.0f} s)")
        lines.append("")
    if "A" in results:
        lines += study_a_markdown(results["A"])
    if "sweep" in results:
        lines += sweep_markdown(results["sweep"])
    if "lr" in results:
        lines += lr_markdown(results["lr"])
    if "gn" in results:
        lines += gn_markdown(results["gn"])
    if "long" in results:
        lines += long_markdown(results["long"])
    if "B" in results:
        lines += study_b_markdown(results["B"])
    if "C" in results:
        lines += study_c_markdown(results["C"])
    return "\n".join(lines)


def _mark_drops(ax, drops: list[int], offset: float = 0.5, label: bool = True) -> None:
    """Vertical lines between the last epoch at the old rate and the first at the new."""
    for i, d in enumerate(drops):
        text = "LR x0.2" if i == 0 and label else None
        ax.axvline(d + offset, color="grey", ls=":", lw=1, label=text)


def plot_study_gn(result: dict, out: Path) -> list[Path]:
    """The training curves of the study beyond BatchNorm (``study_gn_<model>_curves.png``)."""
    return plot_study_a(result, out, prefix="study_gn", angles=False)


def plot_study_a(
    result: dict, out: Path, prefix: str = "study_a", angles: bool = True
) -> list[Path]:
    files = []
    for key, model in result["models"].items():
        fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
        for label, entry in model["methods"].items():
            runs = entry["runs"]
            epochs = range(1, len(runs[0]["train_loss"]) + 1)
            loss = [statistics.median(r["train_loss"][e - 1] for r in runs) for e in epochs]
            style = "--" if "Riemannian" in label else ":" if entry.get("key") in PEERS else "-"
            ax_loss.plot(epochs, loss, style, marker="o", ms=3, label=label)
            ax_err.plot(
                epochs, entry["summary"]["test_error_curve_median"], style, marker="o", ms=3
            )
        for ax in (ax_loss, ax_err):
            _mark_drops(ax, model["drops"], label=ax is ax_loss)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_loss.set_ylabel("training loss (epoch mean, median over seeds)")
        ax_err.set_ylabel("test error % (median over seeds)")
        handles, labels = ax_loss.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
        study = "Study A" if prefix == "study_a" else "Beyond BatchNorm"
        fig.suptitle(f"{study}, {key}: same init, data order and LR schedule", fontsize=9)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = out / f"{prefix}_{key}_curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
        if angles:
            files += _plot_angles(key, model, out)
    return files


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) < window:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_angles(key: str, model: dict, out: Path) -> list[Path]:
    chosen = [m for m in ("SGD", "SGD-G") if m in model["methods"]]
    series = {m: model["methods"][m]["runs"][0].get("angle_per_step", {}) for m in chosen}
    layers = list(dict.fromkeys(name for s in series.values() for name in s))
    if not layers:
        return []
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for m in chosen:
            values = [math.degrees(v) for v in series[m].get(layer, [])]
            if not values:
                continue
            steps_per_epoch = max(
                len(values) // len(model["methods"][m]["runs"][0]["train_loss"]), 1
            )
            window = max(steps_per_epoch // 10, 1)
            ax.plot(range(1, len(values) + 1), _smooth(values, window), lw=1, label=m)
        n_epochs = len(model["methods"][chosen[0]]["runs"][0]["train_loss"])
        total = len(series[chosen[0]].get(layer, []))
        for i, d in enumerate(model["drops"]):
            ax.axvline(
                d * total / max(n_epochs, 1),
                color="grey",
                ls=":",
                lw=1,
                label="LR x0.2" if i == 0 else None,
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean angle per step (deg)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Study A, {key}: how far each step turns the weight rows (seed 0)", fontsize=9)
    fig.tight_layout()
    path = out / f"study_a_{key}_angles.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_study_b(result: dict, out: Path) -> list[Path]:
    sizes = list(result["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes, strict=True):
        for i, (label, s) in enumerate(result["sizes"][n]["methods"].items()):
            gaps = [max(g, 1e-17) for g in s["gaps"] if math.isfinite(g)]
            ax.plot(range(len(gaps)), gaps, ("-", "--", ":")[i % 3], lw=1.2, label=label)
        ax.axhline(result["tol"], color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("f(y) - f*")
        ax.set_title(f"n = {n} (first seed, chosen hyper-parameters)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "study_b_rayleigh.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_study_c(result: dict, out: Path) -> list[Path]:
    bars = {f"{k}, step": v for k, v in result["ratios"].items()}
    train = result.get("train_step", {}).get("ratios", {})
    bars.update({f"{k}, training step": v for k, v in train.items()})
    labels = list(bars)
    colors = ["tab:orange" if k.endswith("training step") else "tab:blue" for k in labels]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.35 * len(labels)))
    ax.barh(labels, [bars[k] for k in labels], color=colors)
    ax.axvline(1.0, color="k", lw=1)
    for i, k in enumerate(labels):
        ax.text(bars[k], i, f" {bars[k]:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("time / torch's (foreach SGD or Adam)")
    title = f"Study C: step on ResNet-18 conv weights ({result['n_params']:,} parameters)"
    if train:
        title += ";\norange: one whole training step of the VGG BN-CNN"
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    path = out / "study_c_step_time.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def write_all(results: dict, out: Path, plots: tuple[str, ...] = ("A", "B", "C")) -> list[Path]:
    """Write ``summary.md``, ``results.json`` and the plots of the studies in ``plots``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(results) + "\n")
    raw = out / "results.json"
    raw.write_text(json.dumps(results, indent=1, default=str) + "\n")
    files = [summary, raw]
    plotters = {
        "A": plot_study_a,
        "lr": plot_lr,
        "gn": plot_study_gn,
        "B": plot_study_b,
        "C": plot_study_c,
        "long": plot_long,
    }
    for study in plots:
        if study in results and study in plotters:
            files += plotters[study](results[study], out)
    return files
