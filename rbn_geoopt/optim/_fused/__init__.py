r"""The fused per-row kernels of SGDG and AdamG, and the guard's sweep (private).

Every function here trusts its caller (:mod:`rbn_geoopt.optim.sgdg`, :mod:`.adamg`,
:mod:`.._guard`): the optimizers validated the hyper-parameters when the param group was
added and the step guard has read every point and gradient before a kernel runs, so no
argument is checked again. A tensor list is stepped in place by

* the C extension ``_crows`` (C99 + OpenMP, AVX2 + FMA copies when the CPU has them): one
  call per dtype for the rows of every CPU float32/float64 tensor of the list, spread over
  ``torch.get_num_threads()`` threads (one thread below ``PARALLEL_MIN_NUMEL`` elements);
  a strided one (a channels_last conv weight, a slice) through a contiguous copy written
  back after the call (ResNet-18's conv weights in channels_last: ~66 ms a step, against
  ~330 ms on the twin and 8 ms contiguous);
* the Triton kernels :mod:`.triton_rows` for CUDA tensors when ``triton`` is importable
  (one launch per tensor; the ``gpu`` extra installs it);
* its pure-torch twin :mod:`.torch_twin` for everything else (other devices, CUDA without
  triton, half precision, no compiler at install time), with the same
  formulas.

``RBN_GEOOPT_KERNELS=torch`` forces the twin, ``=c`` insists on C and ``=triton`` on Triton
(ValueError where it cannot be used; under ``TRITON_INTERPRET=1`` Triton's interpreter runs
CPU tensors too, which is how the tests check it), ``=auto`` (the default) picks per tensor.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

from . import torch_twin

try:  # imported after torch, so that it shares torch's OpenMP runtime (libgomp)
    from . import _crows
except ImportError:  # not built (no compiler): everything runs in torch
    _crows = None

__all__ = [
    "ENV_VAR", "adamg_", "backend", "c_first", "c_ok", "check_rows", "sgdg_", "sum_squares",
    "triton_ok",
]  # fmt: skip

#: environment variable that forces a backend: "torch", "c" or "auto" (the default)
ENV_VAR = "RBN_GEOOPT_KERNELS"
_BACKENDS = ("auto", "c", "torch", "triton")
#: whether triton is installed (the module :mod:`.triton_rows` is imported on first use)
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_C_DTYPES = {torch.float32: 0, torch.float64: 1}
#: below this many elements a call runs on one thread (OpenMP start-up dominates)
PARALLEL_MIN_NUMEL = 1 << 15


def backend() -> str:
    """The backend ``RBN_GEOOPT_KERNELS`` selects (ValueError for an unknown value)."""
    choice = os.environ.get(ENV_VAR, "auto").lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {_BACKENDS}, got {choice!r}")
    if choice == "c" and _crows is None:
        raise ValueError(f"{ENV_VAR}=c, but the C extension _crows is not built")
    if choice == "triton" and not HAVE_TRITON:
        raise ValueError(f"{ENV_VAR}=triton, but triton is not installed (pip install triton)")
    return choice


def _triton():
    from . import triton_rows  # imports triton: only when a tensor may take it

    return triton_rows


def triton_ok(choice: str, *tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels step these tensors: ``choice`` "triton", or "auto" for
    CUDA tensors when triton is installed (:func:`.triton_rows.takes` for the dtypes).
    With ``choice == "triton"`` a tensor it cannot take is a ValueError."""
    if choice == "triton":
        if _triton().takes(*tensors):
            return True
        found = [(t.device.type, t.dtype) for t in tensors if t is not None]
        raise ValueError(
            f"{ENV_VAR}=triton: the Triton kernels take CUDA tensors (any device under "
            f"TRITON_INTERPRET=1) of float32/float64/float16/bfloat16, got {found}"
        )
    return choice == "auto" and HAVE_TRITON and tensors[0].is_cuda and _triton().takes(*tensors)


def c_ok(choice: str, *tensors: torch.Tensor | None) -> bool:
    """Whether the C kernel steps these tensors: CPU, C-contiguous, one float32/float64
    dtype, and ``choice`` (from :func:`backend`) not "torch". With ``choice == "c"`` a
    tensor it cannot take is a ValueError."""
    if choice in ("torch", "triton"):
        return False
    ok = _crows is not None and _c_layout(tensors[0].dtype, tensors)
    if not ok and choice == "c":
        found = [(t.device.type, t.dtype) for t in tensors if t is not None]
        raise ValueError(
            f"{ENV_VAR}=c: the C kernel takes CPU C-contiguous float32/float64 tensors of one "
            f"dtype, got {found}"
        )
    return ok


def _c_layout(dtype: torch.dtype, tensors) -> bool:
    """Whether every tensor of ``tensors`` (None entries skipped) is a CPU, C-contiguous
    tensor of ``dtype``, a dtype of the C kernel: the test behind :func:`c_ok`."""
    return _c_route(dtype, tensors) == _DIRECT


_DIRECT, _COPIES = 2, 1


def _c_route(dtype: torch.dtype, tensors) -> int:
    """How the C kernel takes ``tensors`` (None entries skipped), in one pass: ``_DIRECT``
    when all are CPU, C-contiguous tensors of ``dtype`` (a dtype of the C kernel),
    ``_COPIES`` when all are CPU tensors of ``dtype`` but some is strided (a channels_last
    conv weight, a slice: stepped through :func:`_contiguous` copies), 0 when
    the C kernel cannot take them."""
    if dtype not in _C_DTYPES:
        return 0
    route = _DIRECT
    for t in tensors:
        if t is not None:
            if not (t.dtype == dtype and t.is_cpu):
                return 0
            if not t.is_contiguous():
                route = _COPIES
    return route


def _contiguous(tensors, copies: list) -> list:
    """``tensors`` made C-contiguous; each copy made is recorded as ``(tensor, copy)`` in
    ``copies`` (kept alive until the kernel has run; :func:`_copy_back` writes them)."""
    out = []
    for t in tensors:
        c = None if t is None else t.contiguous()
        if c is not t:
            copies.append((t, c))
        out.append(c)
    return out


def _copy_back(copies: list, written: set[int]) -> None:
    """Copy the kernel's results back into the strided tensors it wrote (ids in
    ``written``); read-only copies (gradients) are dropped."""
    for t, c in copies:
        if id(t) in written:
            t.copy_(c)


def c_first(choice: str) -> bool:
    """Whether ``choice`` lets the C kernel take the tensors it can (built, not "torch" or
    "triton")."""
    return _crows is not None and choice in ("auto", "c")


def _insist_c(choice: str, *tensors: torch.Tensor | None) -> None:
    """With ``choice == "c"``, the ValueError of :func:`c_ok` for tensors the C kernel
    cannot take; nothing otherwise."""
    if choice == "c":
        c_ok(choice, *tensors)


def _nthreads(numel: int, rows: int) -> int:
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def _written(tensors: list[torch.Tensor | None]) -> None:
    """Bump the autograd version counters of tensors the C kernel wrote through pointers,
    so that autograd still detects a step taken between a forward and its backward."""
    torch._C._increment_version([t for t in tensors if t is not None])


def _run_c(kernel: str, jobs: dict[torch.dtype, list[tuple]], numel: int, rows: int, *args):
    """``_crows.<kernel>(jobs, dtype code, *args, snap, threads)`` once per dtype; returns
    the first bad row of every job (-1: none)."""
    bad: list[int] = []
    threads = _nthreads(numel, rows)
    call = getattr(_crows, kernel)
    for dtype, items in jobs.items():
        bad += call(items, _C_DTYPES[dtype], *args, torch_twin.snap(dtype), threads)
    return bad


def _unstepped(bad: list[int]) -> None:
    """The guard refuses every row a kernel cannot step, so a flagged row means it was
    bypassed; such rows were left unchanged: say so rather than go on silently."""
    if bad and max(bad) >= 0:
        raise ValueError(
            "a zero or non-finite point, or a non-finite gradient, reached the fused kernel "
            "(the step guard was bypassed); those rows were left unchanged"
        )


def sgdg_(ys, gs, taus, ns, *, lr: float, momentum: float, nu: float, choice: str) -> None:
    """One SGD-G step of every ``(ys[i], gs[i], taus[i])``, points of G(1, ns[i]) in rows
    (``taus[i]`` None without momentum), in place: the C kernel, the Triton kernels, and
    one batched :func:`.torch_twin.sgdg_many_` call for the tensors neither takes."""
    jobs: dict[torch.dtype, list[tuple]] = {}
    written, bad, copies = [], [], []
    tri: tuple[list, ...] = ([], [], [], [])  # y, g, tau, n: the Triton kernels' tensors
    twin: tuple[list, ...] = ([], [], [], [])
    numel = rows = 0
    c_wanted = c_first(choice)
    for y, g, tau, n in zip(ys, gs, taus, ns, strict=True):
        count = y.numel() // n
        if count == 0:
            continue
        route = _c_route(y.dtype, (y, g, tau)) if c_wanted else 0
        if route:
            yc, gc, tc = (y, g, tau) if route == _DIRECT else _contiguous((y, g, tau), copies)
            job = (yc.data_ptr(), gc.data_ptr(), 0 if tc is None else tc.data_ptr(), count, n)
            jobs.setdefault(y.dtype, []).append(job)
            written += (y, tau)
            numel, rows = numel + count * n, rows + count
            continue
        _insist_c(choice, y, g, tau)
        if triton_ok(choice, y, g, tau):
            for column, value in zip(tri, (y, g, tau, n), strict=True):
                column.append(value)
            continue
        for column, value in zip(twin, (y, g, tau, n), strict=True):
            column.append(value)
    if twin[0] and torch_twin.sgdg_many_(*twin, lr=lr, momentum=momentum, nu=nu):
        bad.append(0)
    if jobs:
        bad += _run_c("sgdg_many", jobs, numel, rows, lr, momentum, nu)
        _written(written)
        if copies:
            _copy_back(copies, {id(t) for t in written})
    if tri[0]:
        bad += _triton().sgdg_(*tri, lr=lr, momentum=momentum, nu=nu)
    _unstepped(bad)


def adamg_(
    ys, gs, ms, vs, ns, step_sizes, *, beta1: float, beta2: float, eps: float, nu: float,
    choice: str,
) -> None:  # fmt: skip
    """One Adam-G step of every ``(ys[i], gs[i], ms[i], vs[i])`` (``vs[i]``: one second
    moment per row) with ``step_sizes[i] = lr sqrt(1 - beta2^k) / (1 - beta1^k)``, in place:
    the C kernel, the Triton kernels, and one batched :func:`.torch_twin.adamg_many_` call
    for the others."""
    jobs: dict[torch.dtype, list[tuple]] = {}
    written, bad, copies = [], [], []
    tri: tuple[list, ...] = ([], [], [], [], [], [])  # y, g, m, v, n, step size: Triton's
    twin: tuple[list, ...] = ([], [], [], [], [], [])
    numel = rows = 0
    c_wanted = c_first(choice)
    for y, g, m, v, n, step_size in zip(ys, gs, ms, vs, ns, step_sizes, strict=True):
        count = y.numel() // n
        if count == 0:
            continue
        route = _c_route(y.dtype, (y, g, m, v)) if c_wanted else 0
        if route:
            yc, gc, mc, vc = (y, g, m, v) if route == _DIRECT else _contiguous((y, g, m, v), copies)
            job = (yc.data_ptr(), gc.data_ptr(), mc.data_ptr(), vc.data_ptr(), count, n, step_size)
            jobs.setdefault(y.dtype, []).append(job)
            written += (y, m, v)
            numel, rows = numel + count * n, rows + count
            continue
        _insist_c(choice, y, g, m, v)
        if triton_ok(choice, y, g, m, v):
            for column, value in zip(tri, (y, g, m, v, n, step_size), strict=True):
                column.append(value)
            continue
        for column, value in zip(twin, (y, g, m, v, n, step_size), strict=True):
            column.append(value)
    if twin[0] and torch_twin.adamg_many_(*twin, beta1=beta1, beta2=beta2, eps=eps, nu=nu):
        bad.append(0)
    if jobs:
        bad += _run_c("adamg_many", jobs, numel, rows, beta1, beta2, eps, nu)
        _written(written)
        if copies:
            _copy_back(copies, {id(t) for t in written})
    if tri[0]:
        bad += _triton().adamg_(*tri, beta1=beta1, beta2=beta2, eps=eps, nu=nu)
    _unstepped(bad)


@functools.cache
def limits(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(lo2, hi2, glim2)``: the step guard accepts a row when ``lo2 <= <y,y> <= hi2``,
    ``<g,g> <= hi2`` and ``<g,g> <y,y>^2 <= glim2``, in the working dtype's range:
    ``|y|`` from ``tiny^(1/4)`` to ``sqrt(max) / 4`` (float32: 3.3e-10 to 4.6e18; float64:
    1.2e-77 to 3.4e153), ``|g|`` and ``|g| |y|^2`` at most ``sqrt(max) / 4``, so that every
    dot product and coefficient of a step is finite and normal."""
    info = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    hi2 = info.max / 16
    return math.sqrt(info.tiny), hi2, hi2


def check_rows(ys, gs, ns, choice: str) -> list[tuple[int, int]]:
    """Per tensor, ``(first row with a bad point, first row with a bad gradient)`` (-1:
    none) by the rule of :func:`limits`: one read of every point and gradient, one C call
    per dtype for the CPU float32/float64 tensors (strided ones through contiguous copies),
    the Triton sweep for the tensors it takes, one batched
    :func:`.torch_twin.first_bad_rows` call (one synchronization per device and dtype)
    for the others."""
    out: list[tuple[int, int]] = [(-1, -1)] * len(ys)  # an empty tensor has no bad row
    c_jobs: dict[torch.dtype, tuple[list[int], list[tuple]]] = {}  # (indices, jobs)
    pending: list[int] = []
    tri: dict[torch.device, list[tuple[int, torch.Tensor, torch.Tensor, int]]] = {}
    copies: list = []  # contiguous copies of strided CPU tensors, read by the C sweep
    numel = rows = 0
    c_wanted = c_first(choice)
    for i, (y, g, n) in enumerate(zip(ys, gs, ns, strict=True)):
        count = y.numel() // n if n else 0
        if count == 0:
            continue
        dtype = y.dtype
        route = _c_route(dtype, (y, g)) if c_wanted else 0
        if route:
            yc, gc = (y, g) if route == _DIRECT else _contiguous((y, g), copies)
            indices, jobs = c_jobs.setdefault(dtype, ([], []))
            indices.append(i)
            jobs.append((yc.data_ptr(), gc.data_ptr(), count, n, *limits(dtype)))
            numel, rows = numel + count * n, rows + count
            continue
        _insist_c(choice, y, g)
        if triton_ok(choice, y, g):
            tri.setdefault(y.device, []).append((i, y, g, n))
        else:
            pending.append(i)
    threads = _nthreads(numel, rows)
    for dtype, (indices, jobs) in c_jobs.items():
        found = _crows.check_rows(jobs, _C_DTYPES[dtype], threads)
        for i, pair in zip(indices, found, strict=True):
            out[i] = tuple(pair)
    for items in tri.values():
        found = _triton().check_rows(*zip(*[item[1:] for item in items], strict=True), limits)
        for (i, *_), pair in zip(items, found, strict=True):
            out[i] = pair
    if pending:
        found = torch_twin.first_bad_rows(
            [ys[i] for i in pending], [gs[i] for i in pending], [ns[i] for i in pending], limits
        )
        for i, pair in zip(pending, found, strict=True):
            out[i] = pair
    return out


def sum_squares(t: torch.Tensor, choice: str) -> tuple[float, bool] | None:
    """``(sum of t^2, all finite)`` in one C sweep, or None where the C kernel does not
    read ``t`` (the guard then measures with torch). Partial sums run in ``t``'s dtype, the
    total in double: inf when a partial sum overflows, NaN when ``t`` holds NaN."""
    if not c_ok("auto" if choice == "c" else choice, t):
        return None
    numel = t.numel()
    return _crows.sum_squares(t.data_ptr(), numel, _C_DTYPES[t.dtype], _nthreads(numel, numel))
