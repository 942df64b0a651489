"""comparisons/: the CLI end to end (smoke mode, bad input) and the pieces it is built from.

The smoke run uses a small synthetic Fashion-MNIST written as gzipped idx files, so that it
needs no installed data set; one test reads the real files when they are installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comparisons import __main__ as cli
from comparisons import study_b, study_c, train_step
from comparisons.data import (
    DEFAULT_DIRS,
    DataError,
    carve_validation,
    load_fashion_mnist,
    read_idx,
    resolve_dir,
)
from comparisons.methods import (
    METHODS,
    PAPER,
    current_weight,
    missing_packages,
    normalise_rows_,
    parse_methods,
    prepare,
)
from comparisons.methods import hyperparameters as study_hyper
from comparisons.models import PreActResNet, ResNet18, VGGNet, resnet18_conv_shapes
from comparisons.train import angle_monitor, lr_drops, row_angles, train_run

from .fake_fmnist import write_idx

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
ISSUE_LABELS = [
    "SGD",
    "SGD-G",
    "Adam-G",
    "RiemannianSGD (Sphere)",
    "RiemannianSGD (SphereExact)",
    "RiemannianAdam (Sphere)",
    "RiemannianAdam (SphereExact)",
    "Adam",
    "SGDP",
    "AdamP",
    "AdamW",
]
#: the peers' published values (adamp 0.3.0: constructor defaults, AdamP's weight decay from
#: its README; SGDP with study A's SGD values; torch AdamW's defaults), as results.json has them
PEER_HYPER = {
    "SGDP": {
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "dampening": 0.0,
        "delta": 0.1,
        "wd_ratio": 0.1,
        "eps": 1e-8,
    },
    "AdamP": {
        "betas": [0.9, 0.999],
        "weight_decay": 1e-2,
        "nesterov": False,
        "delta": 0.1,
        "wd_ratio": 0.1,
        "eps": 1e-8,
    },
    "AdamW": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2},
}


# ----------------------------------------------------------------------------- helpers
def numbers(obj, path="$"):
    """Every (path, number) in a JSON tree."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")


# --------------------------------------------------------------------- smoke, end to end
@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory, fake_data) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke") / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "comparisons",
            "--smoke",
            "--sweep",
            "--out",
            str(out),
            "--data",
            str(fake_data),
            "--threads",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, proc


def test_smoke_run_writes_every_file(smoke_out):
    out, proc = smoke_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "summary.md",
        "results.json",
        "study_a_vgg_curves.png",
        "study_a_vgg_angles.png",
        "study_a_preact_resnet_curves.png",
        "study_b_rayleigh.png",
        "study_c_step_time.png",
    ):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_smoke_results_are_complete_and_finite(smoke_out):
    out, proc = smoke_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "A", "sweep", "B", "C"}
    values = list(numbers(results))
    assert len(values) > 100
    bad = [(p, v) for p, v in values if not math.isfinite(v)]
    assert not bad, bad[:5]
    for model in results["A"]["models"].values():
        assert list(model["methods"]) == ISSUE_LABELS
        for entry in model["methods"].values():
            s = entry["summary"]
            assert 0 <= s["test_error_median"] <= 100
            assert s["train_loss_median"] > 0 and s["seconds_per_epoch"] > 0
    assert list(results["sweep"]["methods"]) == ISSUE_LABELS
    # every method's implementation and fixed hyper-parameters are recorded, the peers' as
    # published, in study A and in the sweep
    version = importlib.metadata.version("adamp")
    assert results["meta"]["adamp"] == version
    for methods in [m["methods"] for m in results["A"]["models"].values()] + [
        results["sweep"]["methods"]
    ]:
        assert all(e["hyper"] and e["implementation"] for e in methods.values())
        for label, hyper in PEER_HYPER.items():
            assert methods[label]["hyper"] == hyper, label
        assert methods["SGDP"]["implementation"] == f"adamp.SGDP (adamp {version})"
        assert methods["AdamP"]["implementation"] == f"adamp.AdamP (adamp {version})"
        assert methods["AdamW"]["implementation"].startswith("torch.optim.AdamW (torch 2.")
        assert methods["SGD-G"]["hyper"]["grad_clip"] == PAPER["grad_clip"]
    for label in PEER_HYPER:
        assert results["A"]["models"]["vgg"]["methods"][label]["lrs"] == {
            "lr": METHODS[label.lower()].lrs["lr"]
        }
        assert set(results["sweep"]["methods"][label]["chosen"]) == {"lr"}
    b = results["B"]["sizes"]["20"]["methods"]
    assert b["pymanopt TrustRegions (Sphere)"]["iterations"] is not None
    assert b["SGD-G"]["iterations"] is not None
    c = results["C"]
    assert set(c["ratios"]) == set(study_c.BASELINE_OF)
    assert all(r > 0 for r in c["ratios"].values())
    # state sizes are exact, not timed: Adam-G one second moment per row, SGD-G = SGD
    assert set(c["state_bytes"]) == set(study_c.LABELS)
    assert set(c["state_ratios"]) == set(study_c.BASELINE_OF)
    assert c["state_ratios"]["SGD-G"] == 1.0
    assert 0.5 <= c["state_ratios"]["Adam-G"] <= 0.55
    assert set(c["speedups"]) == {"SGD-G", "Adam-G"} and all(v > 0 for v in c["speedups"].values())
    assert "SGD-G is " in proc.stdout and "faster than RiemannianSGD (SphereExact)" in proc.stdout
    t = c["train_step"]
    assert set(t["median_seconds"]) == set(train_step.TRAIN_LABELS)
    assert set(t["ratios"]) == set(train_step.TRAIN_BASELINE_OF)
    assert all(r > 0 for r in t["ratios"].values())
    assert "study C" in proc.stdout and "SGD-G (paper recipe): " in proc.stdout


def test_smoke_summary_has_a_table_per_study_with_the_issue_names(smoke_out):
    out, proc = smoke_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "summary.md").read_text()
    for heading in ("## Study A", "learning-rate sweep", "## Study B", "## Study C"):
        assert heading in text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    for label in ISSUE_LABELS:
        assert label in rows, label
    assert "pymanopt SteepestDescent (Sphere)" in rows
    assert "One training step of a BN-CNN" in text
    assert "Speed-up over geoopt on the same weights" in text
    assert "SGD-G (paper recipe)" in rows and "Adam-G (paper recipe)" in rows
    assert "nan" not in text.lower() and "inf " not in text.lower()
    assert f"adamp {importlib.metadata.version('adamp')}" in text
    impl_rows = [line for line in text.splitlines() if line.startswith("| AdamP | adamp.AdamP")]
    assert impl_rows and "delta=0.1, wd_ratio=0.1" in impl_rows[0], impl_rows


# -------------------------------------------------------------------------- bad input
def test_merge_takes_each_study_from_the_last_run_that_has_it(smoke_out, tmp_path):
    from comparisons import merge

    out, proc = smoke_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((out / "results.json").read_text())
    later = {"meta": {**full["meta"], "command": "python -m comparisons --study C"}}
    later["C"] = {**full["C"], "rounds": 999}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(full))
    second.write_text(json.dumps(later))
    assert merge.main([str(tmp_path / "merged"), str(first), str(second)]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["C"]["rounds"] == 999 and merged["A"] == full["A"]
    assert merged["meta"]["studies"] == ["A", "sweep", "B", "C"]
    summary = (tmp_path / "merged" / "summary.md").read_text()
    assert "`python -m comparisons --study C`: C" in summary
    assert (tmp_path / "merged" / "study_a_vgg_curves.png").is_file()
    assert merge.main([str(tmp_path / "x"), str(tmp_path / "missing.json")]) == 2


def test_merge_adds_the_seeds_of_study_a_runs_with_the_same_budget(smoke_out):
    import copy

    from comparisons import merge

    out, proc = smoke_out
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((out / "results.json").read_text())["A"]
    b = copy.deepcopy(a)
    b["seeds"] = [7]
    for model in b["models"].values():
        for entry in model["methods"].values():
            for run in entry["runs"]:
                run["test_error"] = [e + 10.0 for e in run["test_error"]]
    merged = merge.merge_study_a(a, b)
    assert merged["seeds"] == a["seeds"] + [7]
    both = merge.merge_results([{"meta": {"seeds": a["seeds"]}, "A": a}, {"meta": {}, "A": b}])
    assert both["meta"]["seeds"] == a["seeds"] + [7]
    for key, model in merged["models"].items():
        for label, entry in model["methods"].items():
            old = a["models"][key]["methods"][label]
            assert len(entry["runs"]) == len(old["runs"]) + 1
            assert "angle_per_step" not in entry["runs"][-1]
            finals = [r["test_error"][-1] for r in entry["runs"]]
            assert entry["summary"]["test_error_median"] == statistics.median(finals)
            assert entry["summary"]["test_error_max"] == max(finals)
    # same seeds, or another budget: the later run replaces the earlier one
    assert merge.merge_study_a(a, a) is a
    other = copy.deepcopy(b)
    next(iter(other["models"].values()))["drops"] = [99]
    assert merge.merge_study_a(a, other) is other


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--study", "A,D"], "unknown study name(s) 'D'"),
        (["--study", ""], "unknown study"),
        (["--methods", "sgd,lbfgs"], "unknown method name(s) 'lbfgs'"),
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "-1"], "non-negative"),
        (["--device", "nonsense"], "is not a torch device"),
        (["--methods", "sgdp,adamw,nope"], "unknown method name(s) 'nope'"),
    ],
)
def test_bad_names_give_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert needle in _error_line(capsys)


def test_missing_peer_package_gives_one_line(capsys, tmp_path, monkeypatch):
    """Without ``adamp`` installed, SGDP/AdamP are refused before anything runs."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "adamp" else real(name, *a)
    )
    argv = ["--study", "A", "--methods", "sgd,adamp,sgdp", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert "adamp, sgdp need(s) adamp" in line and 'pip install -e ".[compare]"' in line
    assert not (tmp_path / "o").exists()
    assert missing_packages([METHODS["sgd"], METHODS["adamw"]]) == {}
    assert missing_packages([METHODS["adamp"]]) == {"adamp": ["adamp"]}


def test_unwritable_out_gives_one_line(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli.main(["--study", "C", "--out", str(blocker / "sub")]) == 2
    assert "is not a writable directory" in _error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_read_only_out_gives_one_line(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["--study", "C", "--out", str(ro)]) == 2
    finally:
        ro.chmod(0o700)
    assert "is not a writable directory" in _error_line(capsys)


def test_missing_data_dir_one_line_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "comparisons",
            "--smoke",
            "--study",
            "A",
            "--data",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "apt-get install -y dataset-fashion-mnist" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------- data
def test_idx_reader_round_trip_plain_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", a, gz=False)
    write_idx(tmp_path / "y", a, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "y.gz"), a)


def test_idx_reader_refuses_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_loader_standardizes_and_validation_split_is_disjoint(fake_data):
    train, test = load_fashion_mnist(fake_data)
    assert train.images.shape == (600, 1, 28, 28) and test.labels.shape == (300,)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    fit, val = carve_validation(train, 100)
    assert len(fit) == 500 and len(val) == 100
    rows = {tuple(x.flatten()[:64].tolist()) for x in fit.images}
    assert not any(tuple(x.flatten()[:64].tolist()) in rows for x in val.images)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        resolve_dir(fake_data / "missing")


@pytest.mark.skipif(
    not all(Path(d).is_dir() for d in DEFAULT_DIRS), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_when_installed():
    train, test = load_fashion_mnist()
    assert len(train) == 60000 and len(test) == 10000
    assert abs(float(train.images.mean())) < 1e-2 and abs(float(train.images.std()) - 1) < 1e-2
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# -------------------------------------------------------------------------- models
def test_resnet18_conv_weights_are_11_2m_parameters():
    # torchvision's resnet18 has 11,689,512 parameters: minus fc (512*1000 + 1000) and the
    # 20 BatchNorms (2 * 4800 affine values) leaves the conv weights.
    shapes = resnet18_conv_shapes()
    assert len(shapes) == 20
    assert sum(math.prod(s) for s in shapes) == 11_689_512 - 513_000 - 9_600


def test_resnet18_replica_is_torchvisions_network():
    """The device check's ResNet-18 (built here: torchvision's CUDA-only wheel does not
    import on this CPU torch) has torchvision's parameter count, its conv weights are
    resnet18_conv_shapes in order, and the analysis finds each of them, and nothing else,
    feeding a BatchNorm; the training-step timing runs it."""
    from rbn_geoopt.nn import find_scale_invariant

    assert sum(p.numel() for p in ResNet18().parameters()) == 11_689_512
    net = ResNet18(width=4, n_classes=10)
    convs = [(n, p) for n, p in net.named_parameters() if p.dim() == 4]
    assert [tuple(p.shape) for _, p in convs] == resnet18_conv_shapes(width=4)
    found = find_scale_invariant(net)
    assert sorted(n for n, f in found.items() if f.invariant) == sorted(n for n, _ in convs)
    budget = {"model": {"name": "resnet18", "width": 4}, "image": (3, 32, 32), "classes": 10}
    out = train_step.run_train_step({**budget, "batch": 4, "warmup": 1, "rounds": 1})
    assert out["model"] == {"name": "resnet18", "width": 4}
    assert set(out["ratios"]) == set(train_step.TRAIN_BASELINE_OF)


def test_only_the_paper_weights_go_on_the_manifold():
    from rbn_geoopt.nn import to_grassmann

    # VGG: convs 2-4 feed a BN and have p < n; conv 1 (16 rows of length 9) does not
    assert to_grassmann(VGGNet()) == [
        "features.3.weight",
        "features.7.weight",
        "features.11.weight",
    ]
    # pre-activation ResNet: only conv1 of each block feeds a BN directly (conv2 -> residual sum)
    names = to_grassmann(PreActResNet((16, 32, 64)))
    assert names == ["blocks.0.conv1.weight", "blocks.1.conv1.weight", "blocks.2.conv1.weight"]


# ------------------------------------------------------------------------- methods
def test_parse_methods():
    assert [m.label for m in parse_methods(None)] == ISSUE_LABELS
    assert [m.key for m in parse_methods("adam, sgdg,adam")] == ["adam", "sgdg"]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("sgd,nope")


def _one_step(key: str, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One step of ``key`` on a float64 VGG from one batch: G-weight -> (unit rows before,
    unit rows after)."""
    torch.manual_seed(seed)
    model = VGGNet((4, 8, 8, 8)).double()
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    prepared = prepare(METHODS[key], model)

    def unit_rows(name):
        w = current_weight(prepared.model, name).detach().clone()
        w = w.reshape(w.shape[0], -1)
        return w / w.norm(dim=1, keepdim=True)

    before = {name: unit_rows(name) for name in prepared.g_names}
    loss = torch.nn.functional.cross_entropy(prepared.model(x), y)
    loss.backward()
    if prepared.before_step is not None:
        prepared.before_step()
    prepared.optimizer.step()
    return {name: (before[name], unit_rows(name)) for name in prepared.g_names}


def _geodesic(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the angle ``t`` and unit tangent ``e`` with ``after = cos t y + sin t e``."""
    t = row_angles(before, after)
    e = (after - torch.cos(t)[:, None] * before) / torch.sin(t)[:, None]
    return t, e


def test_every_manifold_method_starts_from_the_same_unit_rows_and_model():
    """to_grassmann keeps rows as they are and geoopt's spheres need unit vectors: prepare
    normalises the G-weights explicitly for every manifold method, so that they all start
    from the same model (rows, other parameters and outputs bit-identical)."""
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    starts = {}
    for key, method in METHODS.items():
        if method.geometry == "euclidean":
            continue
        torch.manual_seed(3)
        raw = VGGNet((4, 8, 8, 8)).double()
        prepared = prepare(method, raw)
        rows = {}
        for name in prepared.g_names:
            w = current_weight(prepared.model, name).detach()
            norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-15)
            rows[name] = w.clone()
        prepared.model.eval()
        starts[key] = (rows, prepared.model(x))
    first = starts["sgdg"]
    for key, (rows, out) in starts.items():
        assert list(rows) == list(first[0]), key
        for name in rows:
            assert torch.equal(rows[name], first[0][name]), (key, name)
        assert torch.equal(out, first[1]), key


def test_geoopt_sgd_on_sphereexact_takes_the_same_first_step_times_1_9():
    """Same rows, lr, clipping and orthogonality as SGD-G: geoopt's RiemannianSGD moves
    every row along the same geodesic, (1 + momentum) = 1.9 times as far on the first step
    (geoopt's momentum buffer starts as the raw Euclidean gradient), exactly."""
    ours, theirs = _one_step("sgdg"), _one_step("rsgd-sphereexact")
    assert list(ours) == list(theirs) and len(ours) == 4
    for name in ours:
        torch.testing.assert_close(ours[name][0], theirs[name][0], rtol=0, atol=1e-15)
        t_ours, e_ours = _geodesic(*ours[name])
        t_theirs, e_theirs = _geodesic(*theirs[name])
        assert float(t_ours.min()) > 1e-4  # a real step
        torch.testing.assert_close(t_theirs, 1.9 * t_ours, rtol=1e-10, atol=0)
        torch.testing.assert_close(e_theirs, e_ours, rtol=0, atol=1e-9)
        # clipping: no row moved further than lr * nu = 0.2 * 0.1
        assert float(t_ours.max()) <= 0.02 + 1e-12


def test_geoopt_adam_on_sphereexact_takes_the_same_first_step():
    """Adam-G vs geoopt's RiemannianAdam: the same direction; the angle differs only by
    where eps enters (inside vs outside the square root), a few 1e-6 rad here."""
    ours, theirs = _one_step("adamg"), _one_step("radam-sphereexact")
    for name in ours:
        t_ours, e_ours = _geodesic(*ours[name])
        t_theirs, e_theirs = _geodesic(*theirs[name])
        assert float(t_ours.min()) > 1e-3
        torch.testing.assert_close(e_theirs, e_ours, rtol=0, atol=1e-9)
        assert float((t_theirs - t_ours).abs().max()) < 5e-5


def test_sphere_retraction_differs_from_the_exact_step():
    exact, normalized = _one_step("rsgd-sphereexact"), _one_step("rsgd-sphere")
    for name in exact:
        t_exact, e_exact = _geodesic(*exact[name])
        t_norm, e_norm = _geodesic(*normalized[name])
        torch.testing.assert_close(e_norm, e_exact, rtol=0, atol=1e-9)
        # normalization: angle atan(s) for a tangent step of length s = tan^-1 of the exact
        torch.testing.assert_close(t_norm, torch.atan(t_exact), rtol=1e-10, atol=0)
        assert float((t_exact - t_norm).max()) > 1e-7


@pytest.mark.parametrize("key", list(METHODS))
def test_lr_schedule_reaches_every_group(key):
    """The LR drop multiplies every param group of every method, sphere chains included,
    and covers every parameter of the model exactly once."""
    prepared = prepare(METHODS[key], VGGNet((4, 8, 8, 8)))
    groups = prepared.optimizer.param_groups
    base = [g["lr"] for g in groups]
    expected = METHODS[key].lrs
    assert {g["lr"] for g in groups} == set(expected.values())
    prepared.set_lr_factor(0.2)
    prepared.set_lr_factor(0.04)
    assert [g["lr"] for g in groups] == pytest.approx([0.04 * b for b in base], rel=1e-12)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(prepared.model.parameters()))


@pytest.mark.parametrize("key", ["sgdg", "adamg"])
def test_grassmann_methods_are_the_library_recipe_with_decay_on_every_plain_weight(key):
    """SGD-G / Adam-G come from ``rbn_geoopt.nn.paper_optimizer`` with PAPER's values, BN
    parameters and biases decayed like the other plain weights (the library's default there
    is 0), and step bit for bit like the hand-built two-group optimizer study A used before."""
    from rbn_geoopt.optim import create

    torch.manual_seed(0)
    model = VGGNet((4, 8, 8, 8)).double()
    twin = VGGNet((4, 8, 8, 8)).double()
    twin.load_state_dict(model.state_dict())
    prepared = prepare(METHODS[key], model, {"lr_g": 0.1})
    groups = prepared.optimizer.param_groups
    assert type(prepared.optimizer).__name__ == {"sgdg": "SGDG", "adamg": "AdamG"}[key]
    assert groups[0]["param_names"] == prepared.g_names
    assert (groups[0]["lr"], groups[0]["grad_clip"], groups[0]["omega"]) == (0.1, 0.1, 0.1)
    for g in groups[1:]:
        assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) == (
            0.01,
            PAPER["weight_decay"],
            PAPER["momentum"],
            True,
        )
    # the hand-built optimizer of before: G-weights in one group, everything else in another
    from rbn_geoopt.nn import to_grassmann

    normalise_rows_(twin, prepared.g_names)  # study A's common start: unit rows
    g_names = to_grassmann(twin)
    named = dict(twin.named_parameters())
    g_group = {"params": [named[n] for n in g_names], "lr": 0.1, "grad_clip": 0.1, "omega": 0.1}
    g_group.update({"momentum": 0.9} if key == "sgdg" else {"betas": (0.9, 0.99), "eps": 1e-8})
    rest = [p for n, p in named.items() if n not in g_names]
    rest_group = {
        "params": rest,
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "euclidean": "sgd",
    }
    old = create(key, [g_group, rest_group], lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (8,), generator=gen)
        for net, opt in ((model, prepared.optimizer), (twin, old)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_lr_drops_and_row_angles():
    assert lr_drops(8) == [4, 6] and lr_drops(4) == [2, 3] and lr_drops(1) == []
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    b = a + 1e-3 * torch.randn(5, 7, dtype=torch.float64, generator=gen)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(row_angles(a, 3 * b), torch.acos(cos), rtol=1e-7, atol=0)
    assert float(row_angles(a, a).abs().max()) == 0.0


@pytest.mark.parametrize("key", list(METHODS))
def test_study_angles_come_from_the_library_monitor(key):
    """The per-step angle of study A (``rbn_geoopt.AngleMonitor`` on the G-weights, by layer
    name) is the mean over the layer weight's rows of the angle the step turned them, for
    every method, sphere parametrizations included (half-angle reference, float64)."""
    torch.manual_seed(0)
    prepared = prepare(METHODS[key], VGGNet((4, 8, 8, 8)).double())
    monitor = angle_monitor(prepared)
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))

    torch.nn.functional.cross_entropy(prepared.model(x), y).backward()
    if prepared.before_step is not None:
        prepared.before_step()
    before = {n: current_weight(prepared.model, n).detach().clone() for n in prepared.g_names}
    with monitor.track() as report:
        prepared.optimizer.step()
    assert list(report["params"]) == prepared.g_names and len(prepared.g_names) == 4
    for name, w0 in before.items():
        a = w0.reshape(w0.shape[0], -1)
        b = current_weight(prepared.model, name).detach().reshape(a.shape)
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        ref = 2 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1))
        assert float(ref.min()) > 1e-6  # every row moved
        stats = report["params"][name]
        assert stats["points"] == a.shape[0]
        assert stats["mean"] == pytest.approx(float(ref.mean()), rel=1e-9)


def test_training_learns(fake_data):
    """SGD and SGD-G (the paper's recipe) learn the synthetic task far past chance (90%)
    in four short epochs; the angular log has one entry per step."""
    train, test = load_fashion_mnist(fake_data)
    for key, loss_ratio, max_error in (("sgd", 0.5, 20.0), ("sgdg", 0.8, 60.0)):
        log = train_run(
            METHODS[key],
            {"name": "vgg", "widths": (8, 8, 8, 8)},
            train,
            {"test": test},
            epochs=4,
            drops=[],
            seed=0,
            batch_size=32,
            progress=False,
        )
        assert log["train_loss"][-1] < loss_ratio * log["train_loss"][0], (key, log)
        assert log["test_error"][-1] < max_error, (key, log["test_error"])
        steps = len(log["angle_per_step"]["features.3.weight"])
        assert steps == 4 * math.ceil(600 / 32)


# --------------------------------------------------------------------------- study B
def test_rayleigh_matrix_has_the_designed_spectrum():
    a = study_b.rayleigh_matrix(50)
    np.testing.assert_allclose(a, a.T, atol=0)
    eig = np.linalg.eigvalsh(a)
    expected = np.sort(np.concatenate([[1.0], np.linspace(0.9, -1.0, 49)]))
    np.testing.assert_allclose(eig, expected, atol=1e-13)


@pytest.mark.parametrize("kind", ["sgdg", "rsgd"])
def test_rayleigh_run_reaches_the_eigh_optimum(kind):
    a = study_b.rayleigh_matrix(30)
    x0 = study_b.start_point(30, 0)
    run = study_b.run_torch(kind, a, x0, {"lr": 0.4, "momentum": 0.5}, 400)
    assert run["iterations"] is not None and run["final_gap"] <= study_b.TOL
    # gaps are measured against numpy.linalg.eigvalsh's lambda_max
    assert run["gaps"][0] > 1e-3 and run["gaps"][-1] == run["final_gap"]


def test_pymanopt_trust_regions_reaches_the_optimum():
    a = study_b.rayleigh_matrix(30)
    run = study_b.run_pymanopt("pymanopt-tr", a, study_b.start_point(30, 0), 50)
    assert run["iterations"] is not None and run["iterations"] < 30
    assert run["final_gap"] <= study_b.TOL and run["seconds"] > 0


# --------------------------------------------------------------------------- study C
def test_state_bytes_counts_every_state_tensor():
    p = torch.nn.Parameter(torch.zeros(10))
    p.grad = torch.ones(10)
    adam = torch.optim.Adam([p], lr=1e-3)
    assert study_c.state_bytes(adam) == 0
    adam.step()
    assert study_c.state_bytes(adam) == 2 * 10 * 4 + 4  # exp_avg, exp_avg_sq, step (float32)


def test_step_benchmark_smoke_and_python_call_budget():
    """The step benchmark runs (no timing is asserted); one step on one Grassmann1
    parameter stays within 60 Python calls (a count, not a time: deterministic)."""
    from comparisons import bench

    out = bench.main(["--quick"])
    assert out["python_calls"]["SGDG"] <= 60 and out["python_calls"]["AdamG"] <= 60
    assert all(ratio > 0 for ratio in out["small"].values())


def test_device_check_measures_run_on_cpu():
    """The GPU check's timings (comparisons.bench --device cuda) on CPU with small shapes:
    every method steps (the twin under RBN_GEOOPT_KERNELS=torch for its calls only), every
    ratio and host time is positive, the training step runs; no timing is asserted."""
    import os

    from comparisons import bench_gpu
    from rbn_geoopt.optim._fused import ENV_VAR

    before = os.environ.get(ENV_VAR)
    budget = {"model": {"name": "resnet18", "width": 2}, "image": (3, 32, 32), "classes": 10}
    out = bench_gpu.device_measures(
        "cpu", [(8, 4, 3, 3)] * 3, 1, {**budget, "batch": 2, "warmup": 1, "rounds": 1}
    )
    assert os.environ.get(ENV_VAR) == before
    assert {"SGDG (torch twin)", "AdamG (torch twin)", "torch SGD (foreach)"} <= set(
        out["median_seconds"]
    )
    assert set(out["host_seconds"]) == set(out["median_seconds"])
    assert all(v > 0 for v in (*out["ratios"].values(), *out["host_seconds"].values()))
    assert set(out["train"]["ratios"]) == set(train_step.TRAIN_BASELINE_OF)


def test_step_benchmark_parts_smoke():
    """``--parts`` times the guard's sweep and the kernel of one SGDG.step() alone (no
    timing is asserted beyond what must hold): each part is positive."""
    from comparisons import bench
    from rbn_geoopt.optim import _fused

    if _fused._crows is None:
        pytest.skip("--parts times the C extension, not built here")
    parts = bench.main(["--parts", "--repeats", "1"])["parts"]
    assert set(parts) == {"torch SGD", "SGDG.step()", "guard sweep (C)", "kernel (C)"}
    assert all(seconds > 0 for seconds in parts.values())


# ---------------------------------------------------------------- the peers: SGDP, AdamP, AdamW
def test_peer_methods_are_built_with_their_published_values():
    """Each peer is its package's optimizer, one group over every parameter, with the values
    results.json records; SGDP/AdamP's delta, wd_ratio, eps (and AdamP's betas) are the
    constructor defaults of the installed ``adamp``."""
    import inspect

    import adamp

    classes = {"sgdp": adamp.SGDP, "adamp": adamp.AdamP, "adamw": torch.optim.AdamW}
    for key, cls in classes.items():
        method = METHODS[key]
        prepared = prepare(method, VGGNet((4, 8, 8, 8)))
        opt = prepared.optimizer
        assert type(opt) is cls and prepared.before_step is None, key
        (group,) = opt.param_groups
        assert len(group["params"]) == len(list(prepared.model.parameters()))
        assert group["lr"] == method.lrs["lr"]
        recorded = json.loads(json.dumps(study_hyper(method)))
        assert recorded == PEER_HYPER[method.label], key
        for name, value in method.hyper.items():
            assert group[name] == value, (key, name)
        if cls is not torch.optim.AdamW:
            defaults = inspect.signature(cls.__init__).parameters
            for name in ("delta", "wd_ratio", "eps") + (("betas",) if key == "adamp" else ()):
                assert group[name] == defaults[name].default, (key, name)
    # SGDP is a drop-in for study A's SGD: same values, plus the projection's
    assert {k: METHODS["sgdp"].hyper[k] for k in METHODS["sgd"].hyper} == METHODS["sgd"].hyper


def _peer_first_step_reference(
    key: str, w: torch.Tensor, g: torch.Tensor, plain: bool = False
) -> torch.Tensor:
    """One step from fresh state, written out from the published rules (float64).

    For a weight that feeds a BatchNorm every row of ``g`` is (nearly) orthogonal to its row
    of ``w``, so SGDP/AdamP take their channel-wise projection ``P`` (the radial part of
    the update removed) and decay by ``wd * wd_ratio``.
    SGDP (Nesterov, buffer = g): ``w (1 - lr wd wd_ratio / (1 - m)) - lr P(g + m g)``.
    AdamP / AdamW (bias-corrected first step: ``m_hat / (sqrt(v_hat) + eps) = g / (|g| +
    eps)``): ``w (1 - lr wd r) - lr P(g / (|g| + eps))`` with r = wd_ratio and P the
    projection for AdamP, r = 1 and no projection for AdamW. ``plain``: SGDP/AdamP as if
    they never projected (P = identity, r = 1): what a wrongly wired step would give.
    """
    method = METHODS[key]
    h, lr = dict(method.hyper), method.lrs["lr"]
    if plain:
        h["wd_ratio"] = 1.0
    rows = w.reshape(w.shape[0], -1)
    unit = rows / (rows.norm(dim=1, keepdim=True) + h["eps"])  # adamp's p / (|p| + eps)

    def project(u: torch.Tensor) -> torch.Tensor:
        if plain:
            return u
        u = u.reshape(rows.shape)
        return (u - unit * (unit * u).sum(1, keepdim=True)).reshape(w.shape)

    if key == "sgdp":
        m = h["momentum"]
        decay = lr * h["weight_decay"] * h["wd_ratio"] / (1 - m)
        return w * (1 - decay) - lr * project(g + m * g)
    adam_step = g / (g.abs() + h["eps"])
    if key == "adamp":
        return w * (1 - lr * h["weight_decay"] * h["wd_ratio"]) - lr * project(adam_step)
    return w * (1 - lr * h["weight_decay"]) - lr * adam_step


@pytest.mark.parametrize("key", ["sgdp", "adamp", "adamw"])
def test_peer_first_step_matches_the_published_rule_on_the_scale_invariant_weights(key):
    """One float64 step of the wired optimizer on the VGG's BN-fed conv weights equals the
    rule written out by hand; plain SGD/Adam (a method wired to the wrong optimizer, or
    with other hyper-parameters) would miss it by the decay or the projection."""
    torch.manual_seed(5)
    model = VGGNet((4, 8, 8, 8)).double()
    prepared = prepare(METHODS[key], model)
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(prepared.model(x), y).backward()
    named = dict(prepared.model.named_parameters())
    before = {n: (named[n].detach().clone(), named[n].grad.clone()) for n in prepared.g_names}
    prepared.optimizer.step()
    assert len(before) == 4  # every conv of this small VGG feeds a BN with p < n
    for name, (w, g) in before.items():
        rows_w, rows_g = w.reshape(w.shape[0], -1), g.reshape(g.shape[0], -1)
        cos = (rows_w * rows_g).sum(1) / (rows_w.norm(dim=1) * rows_g.norm(dim=1))
        # nearly tangent (BN's eps leaves a radial part of a few 1e-6): SGDP/AdamP's
        # channel-wise test |cos| < delta / sqrt(n) holds, so they project
        assert float(cos.abs().max()) < 1e-4 < 0.1 / math.sqrt(rows_w.shape[1])
        expected = _peer_first_step_reference(key, w, g)
        moved = float((expected - w).abs().max())
        torch.testing.assert_close(named[name].detach(), expected, rtol=0, atol=1e-9 * moved)
        if key != "adamw":  # without the projection and wd_ratio: SGD / AdamW, far off
            plain = _peer_first_step_reference(key, w, g, plain=True)
            assert float((named[name].detach() - plain).abs().max()) > 1e3 * 1e-9 * moved


@pytest.mark.parametrize(("key", "lr"), [("sgdp", 0.1), ("adamp", 1e-2), ("adamw", 1e-2)])
def test_peer_methods_train_and_learn(fake_data, key, lr):
    """Each peer learns the synthetic task far past chance (90 %) through ``train_run``,
    the path study A and the sweep take, LR drop included (the Adam types at lr 1e-2: the
    published 1e-3 needs more than these 114 steps on this task)."""
    train, test = load_fashion_mnist(fake_data)
    log = train_run(
        METHODS[key],
        {"name": "vgg", "widths": (8, 8, 8, 8)},
        train,
        {"test": test},
        epochs=3,
        drops=[2],
        seed=0,
        batch_size=16,
        lrs={"lr": lr},
        progress=False,
    )
    assert log["train_loss"][-1] < 0.5 * log["train_loss"][0], (key, log["train_loss"])
    assert log["test_error"][-1] < 20.0, (key, log["test_error"])
    assert len(log["angle_per_step"]["features.3.weight"]) == 3 * math.ceil(600 / 16)
