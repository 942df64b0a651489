"""The Triton kernels (rbn_geoopt/optim/_fused/triton_rows.py) against the C kernel, the
composed Grassmann1 operators and the torch twin.

Without CUDA the root conftest sets ``TRITON_INTERPRET=1``: Triton's interpreter runs the
very kernels on CPU tensors (slow, hence the small shapes). On a CUDA machine (no
``TRITON_INTERPRET``) the same tests run the compiled kernels on CUDA tensors against the
C kernel on CPU copies: this file is the CUDA test subset of ``comparisons.bench --device
cuda``. Skipped when triton is not installed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import geoopt  # noqa: E402

from comparisons.bench_gpu import top_level_aten  # noqa: E402
from rbn_geoopt import Grassmann1  # noqa: E402
from rbn_geoopt.optim import SGDG, AdamG, NonFiniteGradientError, _fused  # noqa: E402
from rbn_geoopt.optim._fused import torch_twin, triton_rows  # noqa: E402
from tests.test_kernels import (  # noqa: E402
    ADAM,
    NDIM,
    SHAPE,
    TOL,
    _err,
    _rel,
    _rounded,
    adamg_step_,
    random_state,
    ref_adamg,
    ref_sgdg,
    sgdg_step_,
)

DEV = triton_rows.DEVICE
if DEV == "cuda" and not torch.cuda.is_available():  # compiled mode without a GPU
    pytest.skip("triton without CUDA and without TRITON_INTERPRET=1", allow_module_level=True)
needs_c = pytest.mark.skipif(_fused._crows is None, reason="C extension _crows not built")
F64 = torch.float64
# Triton against C: both float64 per-row scalars; float32 sums differ in order only
VS_C = {torch.float64: 1e-12, torch.float32: 1e-6}


def _dev(*ts):
    """Copies on the kernels' device (the strides kept)."""
    return [None if t is None else t.to(DEV, copy=True) for t in ts]


def _step(backend, algo, y, g, mom, v, *, ndim=NDIM, nu=0.5):
    if algo == "adamg":
        adamg_step_(y, g, mom, v, ndim=ndim, step=3, lr=0.3, grad_clip=nu, backend=backend, **ADAM)
    else:
        momentum = 0.0 if mom is None else 0.9
        sgdg_step_(y, g, mom, ndim=ndim, lr=0.7, momentum=momentum, grad_clip=nu, backend=backend)


def _c_and_triton(algo, dtype, y, g, mom, v, *, ndim=NDIM, nu=0.5):
    """The same step by the C kernel (CPU) and by Triton (DEV); returns both states."""
    state = [None if t is None else t.to(dtype) for t in (y, g, mom, v)]
    c_state = [None if t is None else t.clone() for t in state]
    t_state = _dev(*state)
    _step("c", algo, *c_state, ndim=ndim, nu=nu)
    _step("triton", algo, *t_state, ndim=ndim, nu=nu)
    return c_state, [None if t is None else t.cpu() for t in t_state]


CASES = [  # (shape, ndim, tile): one block per row, and rows looped in blocks
    (SHAPE, NDIM, triton_rows.TILE),  # 40 points of G(1, 27), 16 per tile
    ((5, 37), 1, 16),  # odd length in 3 blocks of 16
    ((3, 1, 4099), 2, triton_rows.TILE),  # longer than the tile: 2 blocks of 4096
]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("algo", ["sgdg", "sgdg-no-momentum", "adamg"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_equals_c(dtype, algo, case, monkeypatch):
    shape, ndim, tile = CASES[case]
    monkeypatch.setattr(triton_rows, "TILE", tile)
    y, g, mom, v = random_state(case, shape=shape, ndim=ndim)
    if algo == "sgdg-no-momentum":
        mom, algo = None, "sgdg"
    c_state, t_state = _c_and_triton(algo, dtype, y, g, mom, v, ndim=ndim)
    for c, t in zip(c_state, t_state, strict=True):
        if c is not None:
            assert t.dtype == dtype
            assert _rel(t, c) <= VS_C[dtype]
    assert torch.equal(t_state[1], c_state[1])  # the gradient is not touched


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdg_matches_composition(dtype, momentum):
    y, g, tau = _rounded(dtype, *random_state(3)[:3])
    tau = tau if momentum else None
    ref_y, ref_tau = ref_sgdg(y, g, tau, lr=1.5, momentum=momentum, nu=0.5)
    yk, gk, tk = _dev(y.to(dtype), g.to(dtype), None if tau is None else tau.to(dtype))
    sgdg_step_(yk, gk, tk, ndim=NDIM, lr=1.5, momentum=momentum, grad_clip=0.5, backend="triton")
    assert _err(yk.cpu(), ref_y) < TOL[dtype]
    if tau is not None:
        assert _rel(tk.cpu(), ref_tau) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("step", [1, 50])
def test_adamg_matches_composition(dtype, step):
    y, g, m, v = _rounded(dtype, *random_state(4))
    ref_y, ref_m, ref_v = ref_adamg(y, g, m, v, step=step, lr=0.3, nu=None, **ADAM)
    yk, gk, mk, vk = _dev(*(t.to(dtype) for t in (y, g, m, v)))
    adamg_step_(yk, gk, mk, vk, ndim=NDIM, step=step, lr=0.3, backend="triton", **ADAM)
    assert _err(yk.cpu(), ref_y) < TOL[dtype]
    assert _rel(mk.cpu(), ref_m) < TOL[dtype]
    assert _rel(vk.cpu(), ref_v) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_rows_snap_to_norm_one_and_zero_steps_are_exact(dtype):
    man = Grassmann1(ndim=NDIM)
    y, g, tau, _ = random_state(5)
    y = man.projx(y) * (1 + 1e-9)  # within snap of 1 in both dtypes
    y[:3] *= 2.5  # these keep their norm
    g[-2:], tau[-2:] = 0, 0  # no step at all
    yk, gk, tk = _dev(y.to(dtype), g.to(dtype), tau.to(dtype))
    before = yk.clone()
    sgdg_step_(yk, gk, tk, ndim=NDIM, lr=0.3, momentum=0.9, backend="triton")
    norms = yk.cpu().to(F64).flatten(1).norm(dim=1)
    eps = torch.finfo(dtype).eps
    assert (norms[3:-2] - 1).abs().max() < 8 * eps
    assert (norms[:3] - 2.5 * (1 + 1e-9)).abs().max() < 8 * 2.5 * eps
    assert torch.equal(yk[-2:], before[-2:])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf/NaN rows
@pytest.mark.parametrize("algo", ["sgdg", "adamg"])
@pytest.mark.parametrize("bad", ["zero", "nan-point", "inf-point", "nan-grad", "inf-grad"])
def test_bad_rows_are_left_unchanged_and_reported(algo, bad):
    """As the C kernel and the twin: the row (and its v) kept, the others stepped, an error."""
    y, g, mom, v = random_state(6)
    v = v.flatten()
    target, value = (g, bad[:3]) if bad.endswith("grad") else (y, bad[:3])
    target[5] = {"zer": 0.0, "nan": math.nan, "inf": math.inf}[value]
    ok = [t.clone() for t in (y, g, mom, v)]
    ok[0][5], ok[1][5] = 1.0, 0.0
    yk, gk, mk, vk = _dev(y, g, mom, v)
    before = [t.clone() for t in (yk, mk, vk)]
    with pytest.raises(ValueError, match="left unchanged"):
        _step("triton", algo, yk, gk, mk, vk if algo == "adamg" else None)
    _step("torch", algo, *ok[:3], ok[3] if algo == "adamg" else None)
    rest = torch.arange(SHAPE[0]) != 5
    for new, old, want in zip((yk, mk, vk), before, (ok[0], ok[2], ok[3]), strict=True):
        assert torch.equal(new[5].isnan(), old[5].isnan())
        assert torch.equal(new[5].nan_to_num(), old[5].nan_to_num())
        assert _rel(new.cpu()[rest], want[rest]) < 1e-12
        assert torch.isfinite(new[rest]).all()


@needs_c
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_strided_tensors_are_stepped_through_copies_and_written_back(layout):
    y, g, mom, v = random_state(8, shape=(6, 4, 3, 3))
    if layout == "transposed":  # points along dim 0 of a (n, rows) storage
        y, g, mom = (t.flatten(1).t().contiguous().t().view(6, 4, 3, 3) for t in (y, g, mom))
    elif layout == "channels_last":
        y, g, mom = (t.contiguous(memory_format=torch.channels_last) for t in (y, g, mom))
    else:
        y, g, mom = (torch.cat([t, t], dim=3)[..., ::2] for t in (y, g, mom))
    assert not y.is_contiguous()
    c_state, t_state = _c_and_triton("adamg", F64, *(t.contiguous() for t in (y, g, mom, v)))
    yk, gk, mk, vk = (t if DEV == "cpu" else t.to(DEV) for t in (y, g, mom, v))
    ptr = yk.data_ptr()
    _step("triton", "adamg", yk, gk, mk, vk)
    assert yk.data_ptr() == ptr
    for c, t in zip(c_state, (yk, gk, mk, vk), strict=True):
        assert _rel(t.cpu(), c) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", [triton_rows.TILE, 16])
def test_half_precision_as_the_twin(dtype, tile, monkeypatch):
    """float32 math, the point stored rounded, the float32 momentum re-projected there."""
    monkeypatch.setattr(triton_rows, "TILE", tile)
    y, g, m, v = random_state(9, shape=(6, 27), ndim=1)
    y, g = y.to(dtype), g.to(dtype)
    m, v = m.float(), v.float()
    for algo in ("sgdg", "adamg"):
        twin = [t.clone() for t in (y, g, m, v)]
        mine = _dev(*twin)
        if algo == "sgdg":
            torch_twin.sgdg_rows_(twin[0], twin[1], twin[2], lr=0.3, momentum=0.9, nu=0.5)
            triton_rows.sgdg_([mine[0]], [mine[1]], [mine[2]], [27], lr=0.3, momentum=0.9, nu=0.5)
        else:
            kw = {"beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "nu": 0.5}
            torch_twin.adamg_rows_(*twin, step_size=0.05, **kw)
            triton_rows.adamg_(*([t] for t in mine), [27], [0.05], **kw)
        ulp = torch.finfo(dtype).eps * 4  # |y| <= 3: one rounding step at most
        assert mine[0].dtype == dtype and _err(mine[0].cpu(), twin[0]) <= ulp
        # the momentum is projected at the stored point, which may differ by one ulp
        assert _rel(mine[2].cpu(), twin[2]) < torch.finfo(dtype).eps
        assert _rel(mine[3].cpu(), twin[3]) < 1e-5
        ys = mine[0].cpu().float()
        assert ((ys * mine[2].cpu()).sum(1).abs() < 1e-5).all()  # tangent at the stored point


@needs_c
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on huge rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_guard_sweep_equals_c(dtype, monkeypatch):
    monkeypatch.setattr(triton_rows, "TILE", 32)
    lo2, hi2, _ = _fused.limits(dtype)
    ys, gs, ns = [], [], []
    for k, (bad_point, bad_grad) in enumerate([(-1, -1), (3, 7), (9, 2), (-1, 0), (11, -1)]):
        y, g, _, _ = random_state(10 + k, shape=(12, 37), ndim=1)
        if bad_point >= 0:
            y[bad_point] = [0.0, math.nan, 0.5 * math.sqrt(lo2), 2 * math.sqrt(hi2)][k % 4]
        if bad_grad >= 0:
            g[bad_grad, 5] = [math.inf, 2 * math.sqrt(hi2)][k % 2]
        ys.append(y.to(dtype))
        gs.append(g.to(dtype))
        ns.append(37)
    want = _fused.check_rows(ys, gs, ns, "c")
    assert want != [(-1, -1)] * 5
    assert _fused.check_rows(_dev(*ys), _dev(*gs), ns, "triton") == want


@needs_c
@pytest.mark.parametrize("opt_class", [SGDG, AdamG])
def test_optimizers_end_to_end_equal_the_c_path(opt_class, monkeypatch):
    """A few steps of SGDG / AdamG (mixed shapes, a Euclidean bias, clipping and the
    orthogonality term) with RBN_GEOOPT_KERNELS=triton against =c."""
    results = []
    for backend in ("c", "triton"):
        monkeypatch.setenv(_fused.ENV_VAR, backend)
        gen = torch.Generator().manual_seed(0)
        shapes = [((6, 3, 3, 3), 3), ((5, 20), 1), ((3, 33), 1)]
        device = DEV if backend == "triton" else "cpu"
        params = [
            geoopt.ManifoldParameter(
                torch.randn(s, generator=gen, dtype=F64).to(device), manifold=Grassmann1(ndim=k)
            )
            for s, k in shapes
        ]
        bias = torch.nn.Parameter(torch.randn(4, dtype=F64, generator=gen).to(params[0].device))
        kw = {"lr": 0.2, "momentum": 0.9} if opt_class is SGDG else {"lr": 0.05}
        groups = [{"params": params, "omega": 0.1}, {"params": [bias], "omega": 0.0}]
        opt = opt_class(groups, grad_clip=0.1, **kw)
        for _ in range(3):
            for p in (*params, bias):
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(p.device)
            opt.step()
        results.append([p.detach().cpu() for p in (*params, bias)])
        results[-1] += [t.cpu() for s in opt.state.values() for t in s.values() if t.dim()]
    for c, t in zip(*results, strict=True):
        assert _rel(t, c) < 1e-12
    monkeypatch.setenv(_fused.ENV_VAR, "triton")
    params[1].grad[2, 3] = math.nan
    before = params[1].detach().clone()
    with pytest.raises(NonFiniteGradientError, match="row 2"):
        opt.step()
    assert torch.equal(params[1].detach(), before)


def test_dispatch_rules(monkeypatch):
    y = torch.randn(4, 5, dtype=F64)
    monkeypatch.setenv(_fused.ENV_VAR, "triton")
    assert _fused.backend() == "triton"
    assert not _fused.c_ok("triton", y, y)
    assert not _fused.triton_ok("auto", y, y)  # auto: CUDA tensors only
    assert not _fused.triton_ok("torch", y.to(DEV), y.to(DEV))
    assert _fused.triton_ok("triton", y.to(DEV), y.to(DEV))
    with pytest.raises(ValueError, match="=triton: the Triton kernels take"):
        _fused.triton_ok("triton", y.to(DEV), y.to(DEV).float())  # gradient of another dtype
    monkeypatch.setattr(triton_rows, "INTERPRET", False)
    with pytest.raises(ValueError, match="=triton: the Triton kernels take CUDA tensors"):
        _fused.triton_ok("triton", y, y)
    monkeypatch.setattr(_fused, "HAVE_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        _fused.backend()


@pytest.mark.parametrize("opt_class", [SGDG, AdamG])
def test_profiler_op_count_per_tensor(opt_class, monkeypatch):
    """At most 5 non-Triton aten ops per G(1,n) tensor for a whole step (guard included)."""
    monkeypatch.setenv(_fused.ENV_VAR, "triton")
    count = 6
    params = [
        geoopt.ManifoldParameter(torch.randn(4 + k, 9, device=DEV), manifold=Grassmann1())
        for k in range(count)
    ]
    kw = {"momentum": 0.9} if opt_class is SGDG else {}
    opt = opt_class(params, lr=0.1, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state created
    launches: list = []
    ops = top_level_aten(opt.step, exclude_triton=True, launches=launches)
    # the guard's sweep and the step, per tensor
    assert launches == [triton_rows._check_rows] * count + [triton_rows._step_rows] * count
    assert 0 < len(ops) <= 5 * count, ops


SM90_COMPILE = textwrap.dedent(
    """
    import triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from rbn_geoopt.optim._fused import triton_rows as tr
    assert not tr.INTERPRET
    ptr = {"fp32": "*fp32", "fp64": "*fp64", "fp16": "*fp16", "bf16": "*bf16"}
    acc = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float32, "bf16": tl.float32}
    def build(kernel, types, consts):
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in kernel.arg_names}
        index = {(kernel.arg_names.index(a),): v for a, v in consts.items()}
        src = ASTSource(kernel, sig, constexprs=index)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    scalars = {a: "fp64" for a in ("lr", "gamma", "step_size", "beta1", "beta2", "eps", "nu",
                                    "snap_tol", "lo2", "hi2", "glim2")}
    cases = (  # (point dtype, momentum dtype, one block per row, Adam-G, momentum)
        ("fp16", "fp32", False, True, True), ("bf16", "fp32", True, True, True),
        ("fp32", "fp32", True, False, True), ("fp64", "fp64", False, False, False),
    )
    for dt, state, one, adam, mom in cases:
        types = dict(y_ptr=ptr[dt], g_ptr=ptr[dt], m_ptr=ptr[state], v_ptr=ptr[state],
                     bad_ptr="*i64", **scalars)
        consts = dict(ADAM=adam, MOM=mom, HALF=dt in ("fp16", "bf16"), ACC=acc[dt], ROWS=4,
                      BLOCK=64, ONE_BLOCK=one)
        assert build(tr._step_rows, types, consts)
    types = dict(y_ptr="*fp64", g_ptr="*fp64", out_ptr="*i64", **scalars)
    assert build(tr._check_rows, types, dict(ACC=tl.float64, ROWS=4, BLOCK=64))
    print("compiled")
    """
)


def test_kernels_compile_for_cuda_sm90(tmp_path):
    """The interpreter is lenient: compile the kernels to sm_90 machine code (no GPU
    needed) in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True,
        timeout=300, cwd=root,
    )  # fmt: skip
    if "ptxas" in done.stderr and "not found" in done.stderr:  # pragma: no cover
        pytest.skip("no ptxas in this triton install")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
