"""comparisons/study_lr.py: the learning-rate sensitivity study (``--study lr``).

The pieces (the good-basin width, the widening log grid) against closed forms, then the CLI
end to end on the synthetic Fashion-MNIST of test_comparisons: its ``--quick`` CI variant,
an interrupted run, a budget that cannot fit, and merging two halves of a run.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comparisons import __main__ as cli
from comparisons import merge, report, study_lr
from comparisons.methods import METHODS
from comparisons.study_lr import CHANCE, basin, log_grid_search

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
QUICK_METHODS = "sgd,adamg"


# ------------------------------------------------------------------------------ basin
@settings(max_examples=60, deadline=None)
@given(
    slope_left=st.floats(0.5, 20.0),
    slope_right=st.floats(0.5, 20.0),
    floor=st.floats(0.0, 50.0),
    scale=st.floats(1e-5, 1e2),
    tolerance=st.floats(0.1, 3.0),
)
def test_basin_of_a_v_is_its_closed_form_and_shift_invariant(
    slope_left, slope_right, floor, scale, tolerance
):
    """error = floor + slope * |log10(x / x*)| (points per decade), x* on the grid: the
    interpolation is exact, and the basin is tolerance / slope decades on each side (while it
    stays inside the grid), whatever the error floor and the scale of the learning rates."""
    decades = [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]  # a sqrt(10) grid, best in the middle
    xs = [scale * 10.0**d for d in decades]
    errors = [floor + (slope_left if d < 0 else slope_right) * abs(d) for d in decades]
    b = basin(xs, errors, tolerance)
    left, right = tolerance / slope_left, tolerance / slope_right
    assert b["open_lo"] == (left >= 1.5) and b["open_hi"] == (right >= 1.5)
    want = min(left, 1.5) + min(right, 1.5)
    assert b["decades"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert math.log10(b["lo"] / scale) == pytest.approx(-min(left, 1.5), abs=1e-9)
    assert math.log10(b["hi"] / scale) == pytest.approx(min(right, 1.5), abs=1e-9)
    shifted = basin(xs, [e + 7.0 for e in errors], tolerance)
    assert shifted["decades"] == pytest.approx(b["decades"], rel=1e-12, abs=1e-12)


def test_basin_is_the_contiguous_range_around_the_best():
    # a second dip at the right edge is outside the basin: the range stops at the first bump
    xs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    b = basin(xs, [20.0, 10.0, 13.0, 30.0, 10.5], tolerance=1.0)
    assert b["lo"] == pytest.approx(10 ** (-3 + 9 / 10))  # 20 -> 10 crosses 11 at 0.9
    assert b["hi"] == pytest.approx(10 ** (-2 + 1 / 3))  # 10 -> 13 crosses 11 at 1/3
    assert not b["open_lo"] and not b["open_hi"]
    assert b["decades"] == pytest.approx(1 / 10 + 1 / 3)
    # one point alone within tolerance: a basin narrower than a grid step, still > 0
    assert 0 < basin([0.1, 1.0, 10.0], [CHANCE, 5.0, CHANCE])["decades"] < 1
    # flat everywhere: the whole grid, open at both ends
    flat = basin([0.1, 1.0, 10.0], [5.0, 5.0, 5.5])
    assert flat["decades"] == pytest.approx(2.0) and flat["open_lo"] and flat["open_hi"]


@pytest.mark.parametrize(
    ("xs", "errors", "match"),
    [
        ([0.1, 1.0], [1.0], "2 learning rates but 1 errors"),
        ([1.0, 0.1], [1.0, 2.0], "positive and ascending"),
        ([0.0, 0.1], [1.0, 2.0], "positive and ascending"),
    ],
)
def test_basin_refuses_bad_input(xs, errors, match):
    with pytest.raises(ValueError, match=match):
        basin(xs, errors)


# ------------------------------------------------------------------------ the grid
def _recording(f):
    calls: list[float] = []

    def evaluate(x: float) -> float:
        calls.append(x)
        return f(x)

    return evaluate, calls


@pytest.mark.parametrize(
    ("optimum", "lo", "hi", "best"),
    [
        (0.0, -3, 3, 0),
        (0.7, -3, 3, 1),
        (-1.0, -3, 3, -2),
        (-1.6, -4, 3, -3),  # best on the edge: one more point below shows it interior
        (-2.2, -5, 3, -4),  # two more points
        (3.0, -3, 5, 5),  # the cap: still on the edge after two points
    ],
)
def test_grid_widens_until_the_best_is_interior_or_the_cap(optimum, lo, hi, best):
    """A parabola in log10(x) with its minimum at ``optimum`` decades: the 7-point sqrt(10)
    grid around 1 (k = -3 .. 3, half a decade apart) widens by one point at a time towards
    it while the best is on the edge, at most twice, never evaluating a point twice."""
    evaluate, calls = _recording(lambda x: (math.log10(x) - optimum) ** 2)
    ks, values = log_grid_search(evaluate, 1.0, 7, math.sqrt(10), widen=2)
    assert ks == list(range(lo, hi + 1))
    assert len(calls) == len(ks) == len(set(calls))
    assert calls[:7] == pytest.approx([10 ** (k / 2) for k in range(-3, 4)], rel=1e-12)
    assert min(ks, key=values.get) == best


def test_grid_without_widening_and_with_an_even_number_of_points():
    evaluate, calls = _recording(lambda x: -x)  # best always at the top edge
    ks, _ = log_grid_search(evaluate, 0.1, 4, 10.0, widen=0)
    assert ks == [-2, -1, 0, 1] and calls == pytest.approx([1e-3, 1e-2, 0.1, 1.0])


# ------------------------------------------------------------------- CLI end to end
@pytest.fixture(scope="module")
def quick_lr(tmp_path_factory, fake_data) -> tuple[Path, subprocess.CompletedProcess]:
    """The CI variant: ``--quick`` (a few hundred images, 3 points a decade apart, 1 seed)
    for one Euclidean and one G(1,n) method (an SGD type and an Adam type: both panels)."""
    out = tmp_path_factory.mktemp("lr") / "results"
    argv = ["--study", "lr", "--methods", QUICK_METHODS, "--out", str(out)]
    argv += ["--data", str(fake_data), "--threads", "1", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "comparisons", "--quick", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, proc


def test_quick_lr_study_writes_its_table_and_plot(quick_lr):
    out, proc = quick_lr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "lr_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "summary.md").read_text()
    assert "## Learning-rate sensitivity" in text and "nan" not in text.lower()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line[:2] == "| "}
    assert {"SGD", "Adam-G"} <= set(rows)
    assert "`lr_g`" in rows["Adam-G"] and "lr=0." in rows["Adam-G"]  # the fixed Euclidean lr
    assert "`lr`" in rows["SGD"]
    # the noise-tolerant basin (+3 points) is computed from the same validation means
    result = json.loads((out / "results.json").read_text())["lr"]["methods"]["SGD"]
    xs, means = [p["x"] for p in result["grid"]], [p["val_mean"] for p in result["grid"]]
    wide = basin(xs, means, report.WIDE_BASIN)
    cell = rows["SGD"].split("|")[-2].strip()
    assert cell == ("≥ " if wide["open_lo"] or wide["open_hi"] else "") + f"{wide['decades']:.2f}"
    assert wide["decades"] >= result["basin_decades"]


def test_quick_lr_study_chooses_on_validation_and_reports_test(quick_lr):
    out, proc = quick_lr
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["lr"]
    budget = study_lr.BUDGETS["quick"]
    assert result["seeds"] == [0] and result["config"]["val"] == budget["val"]
    assert list(result["methods"]) == ["SGD", "Adam-G"]
    for label, e in result["methods"].items():
        method = METHODS[e["key"]]
        xs = [p["x"] for p in e["grid"]]
        assert budget["points"] <= len(xs) <= budget["points"] + budget["widen"]
        center = method.lrs[e["axis"]]
        for x in xs:  # every point is the published value times a power of the step
            k = math.log(x / center, budget["step"])
            assert k == pytest.approx(round(k), abs=1e-9), (label, x)
        for p in e["grid"]:
            assert len(p["val_errors"]) == len(p["test_errors"]) == 1
            assert all(0 <= v <= 100 for v in p["val_errors"] + p["test_errors"])
            assert p["val_mean"] == pytest.approx(statistics.fmean(p["val_errors"]))
        best = min(e["grid"], key=lambda p: p["val_mean"])  # validation picks ...
        assert e["chosen_x"] == best["x"] and e["val_error"] == best["val_mean"]
        assert e["test_error_median"] == statistics.median(best["test_errors"])  # ... test reports
        assert e["edge"] == (best["x"] in (xs[0], xs[-1]))
        again = basin(xs, [p["val_mean"] for p in e["grid"]], budget["tolerance"])
        assert e["basin_decades"] == pytest.approx(again["decades"])
        if e["axis"] == "lr_g":  # the Euclidean lr first, chosen on validation, then fixed
            stage = e["fixed_grid"]
            assert [s["lrs"]["lr"] for s in stage] == list(method.grid["lr"])
            assert all(s["lrs"]["lr_g"] == method.lrs["lr_g"] for s in stage)
            assert e["fixed"]["lr"] == min(stage, key=lambda s: s["val_mean"])["lrs"]["lr"]
            assert all(p["lrs"]["lr"] == e["fixed"]["lr"] for p in e["grid"])
        else:
            assert e["fixed"] == {} and all(set(p["lrs"]) == {"lr"} for p in e["grid"])


def test_merge_adds_the_methods_of_two_halves_of_an_lr_study(quick_lr, tmp_path):
    out, proc = quick_lr
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((out / "results.json").read_text())
    first = {**full, "lr": {**full["lr"], "methods": {"SGD": full["lr"]["methods"]["SGD"]}}}
    rest = {k: v for k, v in full["lr"]["methods"].items() if k != "SGD"}
    second = {**full, "lr": {**full["lr"], "methods": rest}}
    paths = [tmp_path / "1.json", tmp_path / "2.json"]
    for path, run in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(run))
    assert merge.main([str(tmp_path / "m"), *map(str, paths)]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["lr"]["methods"] == full["lr"]["methods"]
    assert merged["meta"]["studies"] == ["lr"]
    assert (tmp_path / "m" / "lr_sensitivity.png").is_file()
    # other seeds: not the same study, the later run replaces the earlier one
    other = {**second["lr"], "seeds": [5]}
    assert merge.merge_lr(first["lr"], other) is other


def test_interrupted_lr_study_leaves_its_finished_methods(fake_data, tmp_path, monkeypatch):
    """The summary is rewritten after every method: a run stopped in the second method
    leaves the first one's row, plot and json."""
    real = study_lr._sweep_method

    def stop_at_the_second(method, *args):
        if method.key != "sgd":
            raise KeyboardInterrupt
        return real(method, *args)

    monkeypatch.setattr(study_lr, "_sweep_method", stop_at_the_second)
    out = tmp_path / "o"
    argv = ["--smoke", "--study", "lr", "--methods", "sgd,adam", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--data", str(fake_data), "--no-progress"])
    result = json.loads((out / "results.json").read_text())
    assert list(result["lr"]["methods"]) == ["SGD"]
    assert "| SGD |" in (out / "summary.md").read_text()
    assert (out / "lr_sensitivity.png").is_file()


def test_lr_budget_that_cannot_fit_gives_one_line_and_exit_2(fake_data, tmp_path, capsys):
    # --full carves 1,000 validation images: the 600 synthetic training images cannot
    out = tmp_path / "o"
    argv = ["--full", "--study", "lr", "--methods", "sgd", "--data", str(fake_data)]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "validation split (1000 images)" in err[0] and "(600 images)" in err[0]
    assert not (out / "results.json").exists()
    assert cli.main(["--study", "lr,D", "--out", str(out)]) == 2
    assert "unknown study name(s) 'D'" in capsys.readouterr().err
