"""The pure-torch twin of the fused kernels, batched (rbn_geoopt.optim._fused.torch_twin):
its launch budget (top-level aten ops per tensor per step, counted with torch.profiler), and
that batching many tensors of mixed shapes, layouts and dtypes into shared blocks gives
each tensor exactly what it gets when stepped alone, and what the C kernel gives."""

from __future__ import annotations

import math

import pytest
import torch

from comparisons import bench, bench_gpu
from comparisons.models import resnet18_conv_shapes
from rbn_geoopt.optim import _fused
from rbn_geoopt.optim._fused import torch_twin

F64 = torch.float64
ADAM = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


# ------------------------------------------------------------------ op budget
def test_at_most_15_top_level_aten_ops_per_tensor_on_resnet18(monkeypatch):
    """ResNet-18's 20 conv weights (8 distinct row shapes) on the torch twin, step guard
    included: <= 15 top-level aten ops per tensor per step for SGDG and AdamG (was ~150).
    The count depends on the shapes' structure only, not on the sizes: width 8 and 16 give
    the same count, so the small model stands for width 64 (``python -m comparisons.bench
    --ops`` counts that one)."""
    ops = bench_gpu.op_counts(resnet18_conv_shapes(width=8))
    assert 5 < ops["SGDG (torch)"] <= 15
    assert 5 < ops["AdamG (torch)"] <= 15
    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    wider = bench._ours(bench.SGDG, resnet18_conv_shapes(width=16), momentum=0.9)
    assert bench.count_aten_ops(wider.step) == 20 * ops["SGDG (torch)"]


def test_ops_do_not_grow_with_the_number_of_tensors(monkeypatch):
    """Tensors of one row shape share one block: 40 tensors cost what 4 cost."""
    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    few = bench.count_aten_ops(bench._ours(bench.SGDG, [(4, 3, 3, 3)] * 4, momentum=0.9).step)
    many = bench.count_aten_ops(bench._ours(bench.SGDG, [(4, 3, 3, 3)] * 40, momentum=0.9).step)
    assert few == many


# ------------------------------------------------------- batched == one at a time
def _state(seed, shape, n, dtype=F64, layout=None):
    """A point (rows of norm 0.5..2.5), gradient, tangent momentum and second moment."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=gen, dtype=F64)
    rows = y.reshape(-1, n)
    rows *= (0.5 + 2 * torch.rand(rows.shape[0], 1, generator=gen, dtype=F64)) / rows.norm(
        dim=1, keepdim=True
    )
    g = torch.randn(shape, generator=gen, dtype=F64)
    m = torch.randn(shape, generator=gen, dtype=F64).reshape(-1, n)
    m = (m - (m * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True) * rows) * 0.3
    v = torch.rand(rows.shape[0], generator=gen, dtype=F64)
    y, g, m = (t.to(dtype) for t in (y, g, m.reshape(shape)))
    if layout == "channels_last":
        y, m = (t.contiguous(memory_format=torch.channels_last) for t in (y, m))
    elif layout == "slice":  # every row a slice of a wider row: not contiguous
        wide = torch.zeros(shape[0], shape[1] + 2, *shape[2:], dtype=dtype)
        wide[:, : shape[1]] = y
        y = wide[:, : shape[1]]
    return y, g, m, v.to(dtype)


# (shape, ndim, layout, v shape): tensors sharing a block (same shape[1:] and n), the same
# n with another shape[1:], strided layouts, flat and keepdim second moments
SPECS = [
    ((6, 3, 2, 2), 3, None, "keepdim"),
    ((9, 3, 2, 2), 3, "channels_last", "flat"),
    ((2, 3, 2, 2), 3, "slice", "keepdim"),
    ((5, 12), 1, None, "flat"),
    ((4, 12), 1, None, "keepdim"),
    ((2, 3, 4), 2, None, "keepdim"),
    ((12,), 1, None, "keepdim"),
    ((7, 5), 1, None, "flat"),
]


def _specs(dtype):
    out = []
    for seed, (shape, ndim, layout, v_shape) in enumerate(SPECS):
        n = math.prod(shape[len(shape) - ndim :])
        y, g, m, v = _state(seed, shape, n, dtype, layout)
        keep = shape[: len(shape) - ndim] + (1,) * ndim
        out.append([y, g, m, v.reshape(keep if v_shape == "keepdim" else -1), n])
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("nu", [math.inf, 0.5])
def test_batched_equals_one_tensor_at_a_time(dtype, nu):
    one, many = _specs(dtype), _specs(dtype)
    for y, g, m, _, n in one:
        assert not torch_twin.sgdg_many_([y], [g], [m], [n], lr=0.3, momentum=0.9, nu=nu)
    ys, gs, ms, vs, ns = (list(c) for c in zip(*many, strict=True))
    assert not torch_twin.sgdg_many_(ys, gs, ms, ns, lr=0.3, momentum=0.9, nu=nu)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    sizes = [0.1, 0.1, 0.2, 0.1, 0.3, 0.1, 0.2, 0.1]  # per-tensor step sizes
    for (y, g, m, v, n), size in zip(one, sizes, strict=True):
        torch_twin.adamg_many_([y], [g], [m], [v], [n], [size], nu=nu, **ADAM)
    torch_twin.adamg_many_(ys, gs, ms, vs, ns, sizes, nu=nu, **ADAM)
    for a, b in zip(one, many, strict=True):
        for x, z in zip(a[:4], b[:4], strict=True):
            assert torch.equal(x, z)
    slice_spec = many[2][0]
    assert not slice_spec.is_contiguous() and (slice_spec._base[:, 3:] == 0).all()


def test_block_cap_splits_blocks_and_changes_no_bit(monkeypatch):
    """Uncapped, the 12 tensors of shape (4, 3) form one block; with a cap of 40 elements
    they form blocks of 3 in order (a 100-element tensor one of its own), and every tensor
    steps exactly as uncapped."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3)] * 7 + [(25, 4)] + [(4, 3)] * 5
    ys = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    ns = [s[1] for s in shapes]
    fams = torch_twin._families(ys, ns, lambda i: (), lambda i: ())
    whole = {k: v for f in fams.values() for k, v in f.items()}
    assert sorted(whole.values()) == [[0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12], [7]]
    monkeypatch.setitem(torch_twin.BLOCK_CAP, "cpu", 40)
    fams = torch_twin._families(ys, ns, lambda i: (), lambda i: ())
    capped = sorted(v for f in fams.values() for v in f.values())
    assert capped == [[0, 1, 2], [3, 4, 5], [6, 8, 9], [7], [10, 11, 12]]
    runs = []
    for cap in (40, 1 << 20):
        monkeypatch.setitem(torch_twin.BLOCK_CAP, "cpu", cap)
        y = [t.clone() for t in ys]
        g = [
            1e-2 * torch.randn(s, dtype=F64, generator=torch.Generator().manual_seed(6))
            for s in shapes
        ]
        m = [torch.zeros(s, dtype=F64) for s in shapes]
        v = [torch.zeros(s[0], dtype=F64) for s in shapes]
        torch_twin.sgdg_many_(y, g, m, ns, lr=0.3, momentum=0.9)
        torch_twin.adamg_many_(y, g, m, v, ns, [0.1] * len(shapes), **ADAM)
        runs.append(y + m + v)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_block_cap_cuts_large_tensors_into_row_pieces(monkeypatch):
    """A tensor above the cap is stepped and swept as views of whole rows: a conv weight
    (10, 3, 2, 2) in pieces of 3 dim-0 slices, a block weight (12, 16) with 4 points of 48
    elements in threes of slices (one point each), Adam-G's per-row second moments cut
    alike; every tensor steps exactly as uncapped, and the guard's sweep names a bad row in
    any piece by its row in the whole tensor."""
    gen = torch.Generator().manual_seed(7)
    shapes, ns = [(10, 3, 2, 2), (12, 16), (3, 5)], [12, 48, 5]
    vshapes = [(10, 1, 1, 1), (4, 1), (3, 1)]
    ys = [torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    gs = [1e-1 * torch.randn(s, dtype=F64, generator=gen) for s in shapes]
    monkeypatch.setitem(torch_twin.BLOCK_CAP, "cpu", 40)
    cut, cut_ns, (cut_gs,), (cut_vs,), _, origin = torch_twin._pieces(
        ys, ns, alike=(gs,), per_row=([torch.zeros(v) for v in vshapes],)
    )
    assert [tuple(t.shape) for t in cut] == [(3, 3, 2, 2)] * 3 + [(1, 3, 2, 2)] + [(3, 16)] * 4 + [
        (3, 5)
    ]
    assert origin == [(0, 0), (0, 3), (0, 6), (0, 9), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert all(
        p.untyped_storage().data_ptr() == ys[0].untyped_storage().data_ptr() for p in cut[:4]
    )
    assert [v.numel() for v in cut_vs] == [3, 3, 3, 1, 1, 1, 1, 1, 3] and cut_ns[4] == 48
    runs = []
    for cap in (40, 1 << 20):
        monkeypatch.setitem(torch_twin.BLOCK_CAP, "cpu", cap)
        y, g = [t.clone() for t in ys], [t.clone() for t in gs]
        m = [torch.zeros_like(t) for t in ys]
        v = [torch.zeros(s, dtype=F64) for s in vshapes]
        torch_twin.sgdg_many_(y, g, m, ns, lr=0.3, momentum=0.9)
        torch_twin.adamg_many_(y, g, m, v, ns, [0.1, 0.2, 0.1], **ADAM)
        torch_twin.sgdg_many_(y, g, [None] * 3, ns, lr=0.3, momentum=0.0)
        stepped = [t.clone() for t in y + m + v]
        g[0][9, 1, 0, 1] = math.inf  # last piece of the conv weight
        y[1][7, 3] = math.nan  # point 2 (slices 6-8 of the block weight): its third piece
        verdicts = torch_twin.first_bad_rows(y, g, ns, _fused.limits)
        runs.append((stepped, verdicts))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True))
    assert runs[0][1] == runs[1][1] == [(-1, 9), (2, 2), (-1, -1)]  # a NaN point fails both


@pytest.mark.skipif(_fused._crows is None, reason="C extension not built")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_batched_equals_the_c_kernel(dtype):
    tol = 1e-12 if dtype == F64 else 1e-6
    twin, c = _specs(dtype), _specs(dtype)
    c = [[t.contiguous() if torch.is_tensor(t) else t for t in s] for s in c]
    for specs, choice in ((twin, "torch"), (c, "c")):
        ys, gs, ms, vs, ns = (list(col) for col in zip(*specs, strict=True))
        _fused.sgdg_(ys, gs, ms, ns, lr=0.3, momentum=0.9, nu=0.5, choice=choice)
        _fused.adamg_(ys, gs, ms, vs, ns, [0.1] * len(ys), nu=0.5, choice=choice, **ADAM)
    for a, b in zip(twin, c, strict=True):
        for x, z in zip(a[:4], b[:4], strict=True):
            err = (x.double() - z.double()).abs().max() / max(1.0, z.abs().max().item())
            assert err < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_points_batched_with_float32_momenta(dtype):
    """Half points (float32 momenta) share blocks: each tensor as when stepped alone, the
    momentum tangent at the rounded point stored."""
    one, many = _specs(torch.float32), _specs(torch.float32)
    for specs in (one, many):
        for s in specs:
            s[0] = s[0].to(dtype)
            s[1] = s[1].to(dtype)
    for y, g, m, _, n in one:
        torch_twin.sgdg_many_([y], [g], [m], [n], lr=0.3, momentum=0.9)
    ys, gs, ms, _, ns = (list(c) for c in zip(*many, strict=True))
    torch_twin.sgdg_many_(ys, gs, ms, ns, lr=0.3, momentum=0.9)
    for a, b in zip(one, many, strict=True):
        assert a[0].dtype == dtype and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
        rows, mom = b[0].float().reshape(-1, b[4]), b[2].reshape(-1, b[4])
        assert ((rows * mom).sum(1).abs() / (rows * rows).sum(1) < 1e-6).all()


def test_a_bad_row_leaves_only_its_row_unchanged_in_a_shared_block():
    states, ok = _specs(F64), _specs(F64)
    states[1][0][4] = math.nan  # a NaN point in the second tensor of the first block
    ok[1][0][4] = 1.0  # the same row, valid
    m_row, v_row = states[1][2][4].clone(), states[1][3][4].clone()
    for specs in (states, ok):
        ys, gs, ms, vs, ns = (list(c) for c in zip(*specs, strict=True))
        bad = torch_twin.adamg_many_(ys, gs, ms, vs, ns, [0.1] * len(ys), **ADAM)
        assert bad == (specs is states)
    assert torch.isnan(states[1][0][4]).all()
    assert torch.equal(states[1][2][4], m_row) and torch.equal(states[1][3][4], v_row)
    for i, (a, b) in enumerate(zip(states, ok, strict=True)):
        rest = torch.ones(a[0].shape[0], dtype=torch.bool)
        rest[4 if i == 1 else a[0].shape[0] :] = False
        for x, z in zip(a[:3], b[:3], strict=True):
            assert torch.equal(x[rest], z[rest])


def test_guard_finds_the_first_bad_rows_of_every_tensor_in_a_batch():
    states = _specs(F64)
    ys, gs, ns = [s[0] for s in states], [s[1] for s in states], [s[4] for s in states]
    limits = _fused.limits
    assert torch_twin.first_bad_rows(ys, gs, ns, limits) == [(-1, -1)] * len(ys)
    ys[1][7] = 0.0  # second tensor of a shared block: zero point at row 7
    ys[1][3] = math.inf  # ... and an infinite one at row 3
    gs[4][2, 5] = math.nan  # a NaN gradient in row 2 of (4, 12)
    found = torch_twin.first_bad_rows(ys, gs, ns, limits)
    expected = [(-1, -1)] * len(ys)
    expected[1], expected[4] = (3, 3), (-1, 2)  # |g| |y|^2 is not finite at an inf row
    assert found == expected
    assert _fused.check_rows(ys, gs, ns, "torch") == expected


@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
def test_channels_last_points_and_gradients_step_on_the_twin(algo, monkeypatch):
    """A channels_last conv weight has a channels_last gradient: torch.cat of such tensors
    is channels_last too, and the twin (step and guard) must still lay its rows out."""
    import geoopt

    from rbn_geoopt import SGDG, AdamG, Grassmann1

    monkeypatch.setenv(_fused.ENV_VAR, "torch")
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(6, 4, 3, 3, generator=gen, dtype=F64)
    g = torch.randn(6, 4, 3, 3, generator=gen, dtype=F64)
    outs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        p = geoopt.ManifoldParameter(y.clone(memory_format=fmt), manifold=Grassmann1(ndim=3))
        p.grad = g.clone(memory_format=fmt)
        opt = SGDG([p], lr=0.1, momentum=0.9) if algo == "sgdg" else AdamG([p], lr=0.1)
        assert _fused.check_rows([p.detach()], [p.grad], [36], "torch") == [(-1, -1)]
        opt.step()
        opt.step()
        outs.append(p.detach().contiguous())
    assert torch.equal(outs[0], outs[1])
