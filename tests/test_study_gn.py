"""comparisons/study_gn.py: the study beyond BatchNorm (``--study gn``).

The two models against numerical ground truth (tests/ground_truth.py, float64: each block of
consecutive rows times its own factor), the manifold bookkeeping (points counted from the
manifold, unit points that keep the model's function), then the CLI end to end on the
synthetic Fashion-MNIST of test_comparisons: the smoke run and its table, the counts of
weights / points on the manifold against an independent count, bad input, an interrupted
run and merging two seeds. Written to hold before and after block-invariant weights become
convertible: the counts are compared with what ``to_grassmann`` converts, whatever it is.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comparisons import __main__ as cli
from comparisons import merge, study_a, study_gn
from comparisons.methods import (
    METHODS,
    manifold_points,
    normalise_points_,
    normalise_rows_,
    on_manifold,
    prepare,
)
from comparisons.models import GNVGGNet, QKNormViT, build_model
from rbn_geoopt import Grassmann1
from rbn_geoopt.nn import find_scale_invariant, to_grassmann

from .ground_truth import assert_no_false_positive, truly_block_invariant, truly_invariant
from .test_comparisons import numbers

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ["SGD", "SGDP", "AdamW", "AdamP", "SGD-G", "Adam-G"]
SMOKE = {spec["key"]: spec for spec in study_gn.BUDGETS["smoke"]["models"]}


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- the two models
@pytest.mark.parametrize(("widths", "groups"), [((4, 8, 8, 8), 2), ((8, 8, 16, 16), 4)])
def test_gn_vgg_convs_are_invariant_in_groupnorm_blocks(widths, groups):
    """Each conv: ``groups`` blocks of C/groups rows, numerically invariant block by block and
    not row by row; the classifier: nothing. No false positive anywhere."""
    torch.manual_seed(0)
    model, x = GNVGGNet(widths, groups), _images()
    findings = find_scale_invariant(model)
    convs = [n for n in findings if n.startswith("features.")]
    assert len(convs) == 4
    for name in convs:
        f = findings[name]
        assert f.points == groups and not f.invariant, f.reason
        assert truly_block_invariant(model, name, x, groups)
        assert not truly_invariant(model, name, x)  # rows inside a block: not alone
    assert findings["classifier.weight"].points == 0
    assert_no_false_positive(model, findings, x)
    assert not getattr(model, "needs_example_inputs", False)


def test_gn_vgg_refuses_widths_that_groups_do_not_divide():
    with pytest.raises(ValueError, match=r"multiple of 3"):
        GNVGGNet((4, 8, 8, 8), groups=3)
    with pytest.raises(ValueError, match="4 positive widths"):
        GNVGGNet((4, 8, 8))


@pytest.mark.parametrize(("dim", "heads", "layers"), [(8, 2, 1), (12, 3, 2)])
def test_qk_vit_q_and_k_are_invariant_per_head_and_nothing_else(dim, heads, layers):
    torch.manual_seed(1)
    model, x = QKNormViT(dim=dim, heads=heads, layers=layers, mlp=16), _images()
    assert model.needs_example_inputs
    findings = find_scale_invariant(model, example_inputs=x)
    qk = {n for n in findings if n.endswith(("attn.q.weight", "attn.k.weight"))}
    assert len(qk) == 2 * layers
    for name, f in findings.items():
        if name in qk:
            assert f.points == heads and not f.invariant, f.reason
            assert truly_block_invariant(model, name, x, heads)
            assert not truly_invariant(model, name, x)
        else:
            assert f.points == 0, (name, f.reason)
    assert not truly_block_invariant(model, "blocks.0.attn.v.weight", x, 1)  # not even jointly
    assert_no_false_positive(model, findings, x)
    bare = find_scale_invariant(model)["blocks.0.attn.q.weight"]  # unflatten: real shapes
    assert bare.points == 0 and "example_inputs" in bare.reason


def test_qk_vit_tokens_are_the_7x7_patches():
    """Token t holds the pixels of patch (t // 4, t % 4) in row-major order: the embedding
    of an image whose only non-zero patch is t differs from the zero image's at token t only."""
    torch.manual_seed(0)
    model = QKNormViT(dim=8, heads=2, layers=1, mlp=16)
    seen = {}
    model.embed.register_forward_hook(lambda m, i, o: seen.update(tokens=i[0]))
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 7:14, 21:28] = torch.arange(49.0).reshape(7, 7)  # patch (1, 3): token 7
    model(x)
    tokens = seen["tokens"]
    assert tokens.shape == (1, 16, 49)
    assert torch.equal(tokens[0, 7], torch.arange(49.0))
    assert tokens[0, torch.arange(16) != 7].abs().max() == 0


# ------------------------------------------------------- manifold points, unit points
def test_manifold_points_counts_what_the_manifold_sees():
    conv = torch.randn(6, 4, 3, 3)
    assert manifold_points(geoopt.ManifoldParameter(conv, manifold=Grassmann1(ndim=3))) == 6
    assert manifold_points(geoopt.ManifoldParameter(conv, manifold=Grassmann1(ndim=2))) == 24
    blocks = conv.reshape(2, 3 * 36)  # 2 blocks of 3 rows as one point each
    assert manifold_points(geoopt.ManifoldParameter(blocks, manifold=Grassmann1())) == 2
    rows = conv.reshape(6, -1) / conv.reshape(6, -1).norm(dim=1, keepdim=True)
    assert manifold_points(geoopt.ManifoldParameter(rows, manifold=geoopt.Sphere())) == 6
    assert manifold_points(nn.Parameter(conv)) == 0
    assert manifold_points(geoopt.ManifoldParameter(conv)) == 0  # geoopt's Euclidean


class _BlockGN(nn.Module):
    """A conv whose weight is stored as ``groups`` points of G(1, C/groups * fan_in) (a
    stand-in for a block manifold), then GroupNorm(groups, C): each point is one block."""

    def __init__(self, groups: int = 2, per: int = 3) -> None:
        super().__init__()
        self.shape = (groups * per, 2, 3, 3)
        w = torch.randn(self.shape, dtype=torch.float64).reshape(groups, -1)
        w *= torch.linspace(0.1, 10.0, w.shape[0], dtype=torch.float64)[:, None]
        self.w = geoopt.ManifoldParameter(w, manifold=Grassmann1())
        self.gn = nn.GroupNorm(groups, groups * per, eps=1e-200).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(F.conv2d(x, self.w.reshape(self.shape)))


def test_normalise_points_makes_each_block_unit_and_keeps_the_function():
    torch.manual_seed(0)
    model, x = _BlockGN(), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    before_w, before_out = model.w.detach().clone(), model(x).detach()
    normalise_points_(model, ["w"])
    norms = model.w.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-15)
    ratio = model.w.detach() / before_w  # one factor per block: the rows keep their ratios
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-14, atol=0)
    assert torch.allclose(model(x), before_out, rtol=0, atol=1e-12)
    # normalising each ROW of the same weight instead changes the function
    rows = before_w.reshape(model.shape[0], -1)
    rowwise = (rows / rows.norm(dim=1, keepdim=True)).reshape(model.shape)
    changed = model.gn(F.conv2d(x, rowwise))
    assert (changed - before_out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'gn.weight' is not on a manifold"):
        normalise_points_(model, ["gn.weight"])


def test_normalise_points_is_normalise_rows_when_points_are_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    twin = copy.deepcopy(net)
    names = to_grassmann(net)
    normalise_points_(net, names)
    normalise_rows_(twin, names)
    assert torch.equal(net[0].weight.detach(), twin[0].weight.detach())
    assert on_manifold(net, names) == {"weights": 1, "points": 8, "per_weight": {"0.weight": 8}}
    # study A's BN VGG: every converted row is a point, for SGD-G and a geoopt sphere method
    spec = {"name": "vgg", "widths": (4, 8, 8, 8)}
    for key in ("sgdg", "rsgd-sphere", "sgd"):
        prepared = prepare(METHODS[key], build_model(spec, 0))
        counts = on_manifold(prepared.model, prepared.g_names)
        want = 0 if key == "sgd" else 4 + 8 + 8 + 8
        assert (counts["weights"], counts["points"]) == ((4 if want else 0), want), key


def _tiny_eps(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-200
    return model


@pytest.mark.parametrize("key", ["gn_vgg", "qk_vit"])
@pytest.mark.parametrize("method", ["sgdg", "adamg"])
def test_prepare_keeps_the_models_function_and_counts_what_to_grassmann_converts(key, method):
    """SGD-G/Adam-G start from unit points: whatever ``to_grassmann`` converts (nothing on a
    main without the block manifold, the block-invariant weights after it), the float64
    output is unchanged and the counts are the analysis's."""
    x = _images(4, seed=2).double()
    model = _tiny_eps(build_model(SMOKE[key]["model"], seed=0).double())
    example = x[:2] if getattr(model, "needs_example_inputs", False) else None
    before = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no Grassmann1 parameter" while none is convertible
        converted = to_grassmann(copy.deepcopy(model), example_inputs=example)
        prepared = prepare(METHODS[method], model, example_inputs=example)
    assert prepared.g_names == converted
    fresh = build_model(SMOKE[key]["model"], 0).double()
    findings = find_scale_invariant(fresh, example_inputs=example)
    counts = on_manifold(model, prepared.g_names)
    assert counts["weights"] == len(converted)
    assert counts["points"] == sum(findings[n].points for n in converted)
    assert torch.allclose(model(x), before, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ CLI end to end
@pytest.fixture(scope="module")
def smoke_gn(tmp_path_factory, fake_data) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gn") / "results"
    argv = ["--smoke", "--study", "gn", "--out", str(out), "--data", str(fake_data)]
    proc = subprocess.run(
        [sys.executable, "-m", "comparisons", *argv, "--threads", "1", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, proc


def _expected_counts(key: str, fake_images: torch.Tensor) -> dict:
    """What the manifold methods should report, from the analysis and ``to_grassmann``."""
    spec = SMOKE[key]["model"]
    model = build_model(spec, 0)
    example = fake_images[:2] if getattr(model, "needs_example_inputs", False) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = to_grassmann(copy.deepcopy(model), example_inputs=example)
    findings = find_scale_invariant(model, example_inputs=example)
    return {"weights": len(converted), "points": sum(findings[n].points for n in converted)}


def test_smoke_gn_study_has_every_method_and_its_counts(smoke_gn, fake_data):
    out, proc = smoke_gn
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "gn"} and results["meta"]["studies"] == ["gn"]
    bad = [(p, v) for p, v in numbers(results) if not math.isfinite(v)]
    assert not bad, bad[:5]
    from comparisons.data import load_fashion_mnist

    images = load_fashion_mnist(fake_data)[0].images
    text = (out / "summary.md").read_text()
    assert "## Beyond BatchNorm" in text and "nan" not in text.lower()
    for key in ("gn_vgg", "qk_vit"):
        model = results["gn"]["models"][key]
        assert list(model["methods"]) == LABELS
        assert (out / f"study_gn_{key}_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        want = _expected_counts(key, images)
        section = text.split(f"### {key}:")[1].split("###")[0]
        rows: dict[str, str] = {}  # the first table of the section (not the implementations)
        for line in section.splitlines():
            if line[:2] == "| ":
                rows.setdefault(line.split("|")[1].strip(), line)
        for label, entry in model["methods"].items():
            counts = entry["on_manifold"]
            geometry = METHODS[entry["key"]].geometry
            expect = want if geometry == "grassmann" else {"weights": 0, "points": 0}
            assert {k: counts[k] for k in ("weights", "points")} == expect, (key, label)
            assert sum(counts["per_weight"].values()) == counts["points"]
            assert f"| {counts['weights']} / {counts['points']} |" in rows[label]
            s = entry["summary"]
            assert 0 <= s["test_error_median"] <= 100 and s["train_loss_median"] > 0
        # the table says in words when the manifold methods put nothing on a manifold
        assert ("0 weights on the manifold" in section) == (want["weights"] == 0)


def test_gn_study_refuses_methods_outside_it(capsys, tmp_path):
    for methods, name in (("sgd,rsgd-sphere", "'rsgd-sphere'"), ("adam", "'adam'")):
        out = tmp_path / "o"
        argv = ["--study", "gn", "--methods", methods, "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert f"method(s) {name} are not part of the gn study" in err[0]
        assert "sgd, sgdp, adamw, adamp, sgdg, adamg" in err[0]
        assert not out.exists()
    with pytest.raises(ValueError, match="not part of the gn study"):
        study_gn.run_gn_study(study_gn.BUDGETS["smoke"], None, [METHODS["adam"]], [0])


def test_interrupted_gn_study_leaves_its_finished_methods(fake_data, tmp_path, monkeypatch):
    real, calls = study_a.train_run, []

    def stop_at_the_third(method, *args, **kwargs):
        calls.append(method.key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(method, *args, **kwargs)

    monkeypatch.setattr(study_a, "train_run", stop_at_the_third)
    out = tmp_path / "o"
    argv = ["--smoke", "--study", "gn", "--methods", "sgd,sgdg,adamw", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--data", str(fake_data), "--threads", "1", "--no-progress"])
    result = json.loads((out / "results.json").read_text())["gn"]
    methods = result["models"]["gn_vgg"]["methods"]
    assert list(methods) == ["SGD", "SGD-G"]
    assert methods["SGD-G"]["summary"]["test_error_median"] >= 0
    assert "| SGD-G |" in (out / "summary.md").read_text()


def test_merge_adds_the_seeds_of_two_gn_runs(smoke_gn, tmp_path):
    out, proc = smoke_gn
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    second = copy.deepcopy(first)
    second["gn"]["seeds"] = [1]
    paths = [tmp_path / "1.json", tmp_path / "2.json"]
    for path, run in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(run))
    assert merge.main([str(tmp_path / "m"), *map(str, paths)]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["meta"]["studies"] == ["gn"] and merged["gn"]["seeds"] == [0, 1]
    for model in merged["gn"]["models"].values():
        assert all(len(e["runs"]) == 2 and "on_manifold" in e for e in model["methods"].values())
    assert "## Beyond BatchNorm" in (tmp_path / "m" / "summary.md").read_text()


@pytest.mark.parametrize(("key", "weights", "points"), [("gn_vgg", 4, 16), ("qk_vit", 4, 8)])
def test_full_size_models_put_what_the_readme_says_on_the_manifold(key, weights, points):
    """The README's counts for the --full models: every GroupNorm conv in 4 blocks, every
    q/k weight in 2 (one per head), on Grassmann1Blocks; nothing else."""
    spec = next(s["model"] for s in study_gn.BUDGETS["full"]["models"] if s["key"] == key)
    model = build_model(spec, 0)
    example = _images() if getattr(model, "needs_example_inputs", False) else None
    prepared = prepare(METHODS["sgdg"], model, example_inputs=example)
    counts = on_manifold(model, prepared.g_names)
    assert (counts["weights"], counts["points"]) == (weights, points)
    kinds = {type(model.get_parameter(n).manifold).__name__ for n in prepared.g_names}
    assert kinds == {"Grassmann1Blocks"}
