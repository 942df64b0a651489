"""comparisons/study_long.py: the long budget (``--long`` / ``--study long``).

The per-claim measures against hand-computed values, then the study end to end on the
synthetic Fashion-MNIST of test_comparisons: in this process, in two spawned jobs (the same
numbers), an interrupted run that leaves its finished runs readable, and the CLI's bad input.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from comparisons import __main__ as cli
from comparisons import report, study_long
from comparisons.data import load_fashion_mnist
from comparisons.methods import METHODS
from comparisons.study_long import (
    BUDGETS,
    CHOSEN_LRS,
    FRACTIONS,
    drop_measures,
    merge_long,
    phase_decrease,
    run_long_study,
    summarize_method,
)
from comparisons.train import lr_drops

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(fake_data):
    return load_fashion_mnist(fake_data)


# ---------------------------------------------------------------------------- measures
def test_drop_measures_by_hand():
    """Two drops, 5 steps an epoch, window 2, 3 steps after: every number by hand."""
    loss = [4.0, 4.0, 4.0, 3.0, 3.0] + [2.8, 2.6, 2.0, 2.0, 1.9] + [1.8, 1.8, 1.2, 1.2, 1.0]
    errors = [40.0, 30.0, 25.0]
    out = drop_measures(loss, errors, [1, 2], 5, 3, 2)
    # drop 1 at step 5: before = mean(3, 3) = 3, after = mean(steps 6, 7) = (2.6 + 2.0) / 2
    assert out[0]["loss_decrease_pct"] == pytest.approx(100 * (3.0 - 2.3) / 3.0)
    assert out[0]["error_change"] == -10.0
    # drop 2 at step 10: before = mean(2.0, 1.9), after = mean(steps 11, 12) = (1.8 + 1.2) / 2
    assert out[1]["loss_decrease_pct"] == pytest.approx(100 * (1.95 - 1.5) / 1.95)
    assert out[1]["error_change"] == -5.0


def test_drop_measures_too_short_gives_none_not_a_number():
    out = drop_measures([1.0, 1.0, 1.0], [10.0], [1], 2, 3, 2)
    assert out == [{"epoch": 1, "loss_decrease_pct": None, "error_change": None}]


def _run(seed, errors, final_loss, epoch_loss):
    """A finished run of 3 epochs, 2 steps an epoch: step losses (2, 2 | s, s | 1, 1) with
    ``s = 2 - seed / 10``, so the drop at epoch 1 gives a decrease of ``5 * seed`` %."""
    s = 2.0 - seed / 10.0
    return {
        "seed": seed,
        "test_error": errors,
        "train_loss": epoch_loss,
        "step_loss": [2.0, 2.0, s, s, 1.0, 1.0],
        "steps_per_epoch": 2,
        "final_train_loss": final_loss,
        "seconds": 60.0,
        "cpu_seconds": 59.0,
    }


CONFIG = {"window": 1, "plateau_steps": 1}


def test_summary_medians_reach_drops_and_divergence():
    runs = [
        _run(0, [30.0, 20.0, 12.0], 0.3, [2.0, 1.5, 1.2]),
        _run(1, [28.0, 18.0, 10.0], 0.2, [2.0, 1.5, 1.5]),
        _run(2, [35.0, 22.0, 11.0], 0.1, [2.0, 1.0, 0.9]),
        {"seed": 3, "diverged": "loss became nan", "seconds": 1.0},
    ]
    s = summarize_method(runs, 18.5, [1], CONFIG)
    assert s["runs"] == 4 and s["diverged"] == 1
    assert (s["test_error_median"], s["test_error_min"], s["test_error_max"]) == (11, 10, 12)
    assert s["test_error_curve_median"] == [30.0, 20.0, 11.0]
    assert s["epochs_to_baseline"] == 3  # the median curve is 20 > 18.5 after epoch 2
    assert s["final_train_loss_median"] == 0.2
    # loss decrease at the drop: 0, 5, 10 % -> 5; over the phase (epochs 1..2): 20, 0, 10 %
    # -> 10; test error change after it: -10, -10, -13 -> -10
    (drop,) = s["drops"]
    assert drop["epoch"] == 1 and drop["error_change"] == -10.0
    assert drop["loss_decrease_pct"] == pytest.approx(5.0)
    assert drop["phase_decrease_pct"] == pytest.approx(10.0)
    assert summarize_method(runs, 5.0, [1], CONFIG)["epochs_to_baseline"] is None
    assert summarize_method(runs[3:], 5.0, [1], CONFIG) == {"runs": 1, "diverged": 1}


def test_phase_decrease_by_hand():
    assert phase_decrease([4.0, 2.0, 1.0, 0.5, 0.5], [1, 3]) == [50.0, 0.0]
    assert phase_decrease([4.0, 2.0, 1.0], [2]) == [None]  # a one-epoch phase


def test_schedule_is_the_papers_scaled_and_rates_are_the_lr_studys():
    assert lr_drops(15, FRACTIONS) == [4, 9, 12]
    assert lr_drops(BUDGETS["full"]["epochs"], FRACTIONS) == [4, 9, 12]
    assert BUDGETS["full"]["train"] is None and BUDGETS["full"]["epochs"] >= 15
    assert len(BUDGETS["full"]["seeds"]) >= 3
    # the values of docs/results/lr_sensitivity.md, as printed there (3 significant digits)
    printed = {"sgd": 0.316, "sgdp": 0.1, "adamw": 0.01, "adamp": 0.00316}
    for key, lr in printed.items():
        assert f"{CHOSEN_LRS[key]['lr']:.3g}" == f"{lr:.3g}"
    assert f"{CHOSEN_LRS['sgdg']['lr_g']:.3g}" == "0.0632" and CHOSEN_LRS["sgdg"]["lr"] == 0.1
    assert CHOSEN_LRS["adamg"] == {"lr": 0.1, "lr_g": 0.05}
    assert set(CHOSEN_LRS) == set(METHODS)


# ------------------------------------------------------------------------- end to end
def _strip(result: dict) -> dict:
    """The numbers of a result, without timings."""
    return {
        label: [
            (r["seed"], r["test_error"], r["final_train_loss"], r["step_loss"])
            for r in entry["runs"]
        ]
        for label, entry in result["methods"].items()
    }


def test_smoke_study_in_process_learns_and_reports_every_method(data):
    budget = {**BUDGETS["quick"], "batch_size": 32}
    methods = [METHODS["sgd"], METHODS["sgdg"]]
    seen = []
    result = run_long_study(
        budget,
        data,
        methods,
        [0, 1],
        progress=False,
        on_run=lambda r: seen.append([(m["key"], len(m["runs"])) for m in r["methods"].values()]),
    )
    # seeds in order: every method at seed 0 before any at seed 1
    assert seen == [
        [("sgd", 1), ("sgdg", 0)],
        [("sgd", 1), ("sgdg", 1)],
        [("sgd", 2), ("sgdg", 1)],
        [("sgd", 2), ("sgdg", 2)],
    ]
    assert result["baseline"] == "SGD"
    for label in ("SGD", "SGD-G"):
        entry = result["methods"][label]
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        s = entry["summary"]
        assert s["test_error_median"] < 75.0  # learns the fake data (chance: 90 %)
        for run in entry["runs"]:
            per_epoch = run["steps_per_epoch"]
            assert len(run["step_loss"]) == budget["epochs"] * per_epoch
            first, last = run["step_loss"][:per_epoch], run["step_loss"][-per_epoch:]
            assert sum(last) < 0.9 * sum(first)
            assert all(math.isfinite(v) for v in run["step_loss"])
        assert len(s["drops"]) == len(result["drops"]) == 3  # 4 epochs: [1, 2, 3]
    lines = report.long_markdown(result)
    assert any(line.startswith("| SGD-G |") for line in lines)
    assert any("lr_g=0.0632456" in line for line in lines)


def test_interrupted_study_leaves_finished_runs_readable(data, tmp_path):
    methods = [METHODS["sgd"], METHODS["sgdg"]]

    def stop_after_first(partial):
        report.write_all({"meta": {"mode": "smoke"}, "long": partial}, tmp_path, plots=())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_long_study(
            BUDGETS["smoke"], data, methods, [0], progress=False, on_run=stop_after_first
        )
    saved = json.loads((tmp_path / "results.json").read_text())["long"]
    assert len(saved["methods"]["SGD"]["runs"]) == 1
    assert saved["methods"]["SGD-G"]["runs"] == []
    summary = (tmp_path / "summary.md").read_text()
    assert "| SGD |" in summary and "| SGD-G |" in summary


def test_cli_two_spawned_jobs_write_table_and_plot_with_one_process_numbers(
    fake_data, data, tmp_path
):
    """``--jobs 2``: two spawned 1-thread workers give bit for bit the numbers of one
    process, and the CLI writes the table and the plot."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "comparisons", "--study", "long", "--smoke", "--jobs", "2"]
        + ["--methods", "sgd,sgdg", "--data", str(fake_data), "--out", str(out)]
        + ["--threads", "1", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "long study: 2 runs in" in proc.stdout
    assert (out / "long_curves.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "## Long budget" in summary and "| SGD-G |" in summary
    saved = json.loads((out / "results.json").read_text())["long"]
    assert saved["jobs"] == 2 and saved["cpu_seconds"] > 0
    methods = [METHODS["sgd"], METHODS["sgdg"]]
    here = run_long_study(BUDGETS["smoke"], data, methods, [0], progress=False, jobs=1)
    assert _strip(saved) == _strip(here)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--long", "--quick"], "--long runs the full budget"),
        (["--long", "--smoke"], "--long runs the full budget"),
        (["--study", "long", "--jobs", "0"], "--jobs must be >= 1"),
        (["--study", "long", "--methods", "sgd,nope"], "unknown method name(s) 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, fake_data, tmp_path, capsys):
    code = cli.main(argv + ["--data", str(fake_data), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_budget_that_cannot_fit_is_refused(data):
    with pytest.raises(ValueError, match="at least one batch"):
        study_long.check_budget({**BUDGETS["smoke"], "train": 10}, len(data[0]))
    with pytest.raises(ValueError, match="LR drops"):
        study_long.check_budget({**BUDGETS["smoke"], "epochs": 1}, len(data[0]))


def test_gpu_budget_is_the_same_protocol_with_a_wider_net():
    gpu, cpu = study_long.budget_for("full", "cuda"), study_long.budget_for("full", "cpu")
    assert cpu is BUDGETS["full"] and study_long.budget_for("quick", "cuda") is BUDGETS["quick"]
    same = ("train", "test", "epochs", "batch_size", "plateau_steps", "window", "seeds")
    assert all(gpu[k] == cpu[k] for k in same)
    assert gpu["model"]["name"] == cpu["model"]["name"] == "vgg"
    assert all(
        a == 8 * b for a, b in zip(gpu["model"]["widths"], cpu["model"]["widths"], strict=True)
    )


def test_long_flag_selects_the_long_study_only():
    assert cli.parse_studies(None, False, long=True) == ["long"]
    assert cli.parse_studies("A", False, long=True) == ["A", "long"]
    assert cli.parse_studies(None, False) == ["A", "B", "C"]


def test_merge_adds_seeds_and_recomputes_summaries(data, tmp_path):
    """Two runs of the same budget with seeds 0 and 1 merge into the study of seeds [0, 1]
    (what one run with both gives), through ``python -m comparisons.merge`` too."""
    methods = [METHODS["sgd"], METHODS["sgdg"]]
    budget = BUDGETS["smoke"]
    both = run_long_study(budget, data, methods, [0, 1], progress=False)
    one = run_long_study(budget, data, methods, [0], progress=False)
    two = run_long_study(budget, data, methods, [1], progress=False)
    merged = merge_long(json.loads(json.dumps(one)), json.loads(json.dumps(two)))
    assert merged["seeds"] == [0, 1]
    assert _strip(merged) == _strip(json.loads(json.dumps(both)))
    timing = ("seconds_per_run", "cpu_seconds_per_run")
    for label in ("SGD", "SGD-G"):
        got, want = merged["methods"][label]["summary"], both["methods"][label]["summary"]
        # the same logs give the same medians, bit for bit (JSON keeps every float)
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing
        }
    assert merge_long(one, one) is one  # the same seeds: the later run replaces
    files = []
    for i, result in enumerate((one, two)):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps({"meta": {"mode": "smoke", "command": f"r{i}"}, "long": result}))
        files.append(str(path))
    from comparisons import merge

    assert merge.main([str(tmp_path / "out"), *files]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Long budget" in summary and "seeds [0, 1]" in summary
