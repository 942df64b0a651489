r"""Fused SGD-G / Adam-G steps for Grassmann1 parameters: picks the C kernel or pure torch.

``sgdg_step_`` and ``adamg_step_`` step one parameter tensor in place, every point (the
trailing ``ndim`` dimensions) at once; ``sgdg_foreach_`` and ``adamg_foreach_`` step a
list of them (the optimizers' multi-tensor path: one C call, one OpenMP loop over the rows
of all of them). Both use the per-row formulas of
:mod:`rbn_geoopt.kernels.torch_rows`. They equal the straightforward composition of
``Grassmann1`` operators (``egrad2rgrad``, per-point clipping, ``expmap_transp``) to float
rounding, at the memory traffic of torch's momentum SGD: one read of ``y``, ``g`` and the
momentum, one write of ``y`` and the momentum.

Backend: the C extension ``_crows`` for CPU float32/float64 tensors that are C-contiguous,
of one dtype and non-overlapping; pure torch otherwise (CUDA, half precision, strided
views, or when the extension is not built). The C kernel runs blocks of rows on
``torch.get_num_threads()`` OpenMP threads (one thread below ``PARALLEL_MIN_NUMEL``
elements), with AVX2 + FMA code when the CPU has it (``_crows.isa()``).
``backend="torch"`` or the environment variable ``RBN_GEOOPT_KERNELS=torch`` forces torch;
``backend="c"`` insists on C (ValueError if it cannot be used).

>>> import torch
>>> y = torch.randn(8, 3, 3, 3, dtype=torch.float64)
>>> tau = torch.zeros_like(y)
>>> sgdg_step_(y, torch.randn_like(y), tau, ndim=3, lr=0.1, momentum=0.9)
>>> torch.allclose(y.flatten(1).norm(dim=1), torch.ones(8, dtype=torch.float64))
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch.autograd.graph import increment_version

from . import torch_rows
from .arguments import (
    check_no_overlap,
    check_scalar,
    check_tensors,
    clip_threshold,
    list_item_name,
    per_tensor_ndims,
    same_length,
)

try:  # imported after torch, so that it shares torch's OpenMP runtime (libgomp)
    from . import _crows
except ImportError:  # not built (no compiler): everything runs in torch
    _crows = None

__all__ = [
    "ENV_VAR",
    "adamg_foreach_",
    "adamg_step_",
    "c_available",
    "c_eligible",
    "c_enabled",
    "sgdg_foreach_",
    "sgdg_step_",
    "sum_squares",
]

#: environment variable that forces a backend: "torch", "c" or "auto" (the default)
ENV_VAR = "RBN_GEOOPT_KERNELS"
Backend = Literal["auto", "c", "torch"]
_BACKENDS = ("auto", "c", "torch")
_C_DTYPES = {torch.float32: 0, torch.float64: 1}
#: below this many elements a tensor is stepped by one thread (OpenMP start-up dominates)
PARALLEL_MIN_NUMEL = 1 << 15


def c_available() -> bool:
    """True when the C extension was built and imported."""
    return _crows is not None


def c_eligible(*tensors: torch.Tensor | None) -> str | None:
    """None when the C kernel can step these tensors, else the reason why not."""
    if _crows is None:
        return "the C extension rbn_geoopt.kernels._crows is not built"
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    for t in ts:
        if not t.is_cpu:
            return f"tensor on {t.device}, the C kernel runs on CPU only"
        if t.dtype != dtype or t.dtype not in _C_DTYPES:
            return f"dtypes {[t.dtype for t in ts]}: the C kernel needs one of float32/float64"
        if not t.is_contiguous():
            return "a tensor is not C-contiguous"
    return None


def _c_ok(*tensors: torch.Tensor | None) -> bool:
    """``c_eligible(*tensors) is None``, cheaply (it runs for every tensor of every step)."""
    dtype = tensors[0].dtype
    if _crows is None or dtype not in _C_DTYPES:
        return False
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
            return False
    return True


def c_enabled() -> bool:
    """Whether ``backend="auto"`` may use the C kernel: built, and not disabled by
    ``RBN_GEOOPT_KERNELS=torch`` (ValueError for an unknown value of that variable)."""
    return _crows is not None and _backend("auto") != "torch"


def sum_squares(t: torch.Tensor, *, enabled: bool | None = None) -> tuple[float, bool] | None:
    """``(sum of t^2, all finite)`` in one C sweep, or None where the C kernel is not used.

    Partial sums run in ``t``'s dtype, their total in double: the sum is ``inf`` when a
    partial sum overflows (float32: above ~3.4e38), NaN when ``t`` holds NaN.
    None for tensors the C kernel cannot read (see :func:`c_eligible`) or when it is not
    enabled (``enabled``: the value of :func:`c_enabled`, looked up when None): the caller
    then measures with torch. Used by the step guard.

    >>> sum_squares(torch.tensor([3.0, 4.0])) in ((25.0, True), None)
    True
    """
    if not (c_enabled() if enabled is None else enabled) or not _c_ok(t):
        return None
    numel = t.numel()
    threads = _nthreads(numel, numel)
    return _crows.sum_squares(t.data_ptr(), numel, _C_DTYPES[t.dtype], threads)


def _backend(backend: Backend) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {_BACKENDS}, got {env!r}")
        backend = env
    return backend


def _use_c(choice: str, *tensors: torch.Tensor | None) -> bool:
    """Whether to step these tensors in C; ``choice`` is ``_backend(backend)``."""
    if choice == "torch":
        return False
    if _c_ok(*tensors):
        return True
    if choice == "c":
        raise ValueError(f"backend='c' cannot be used: {c_eligible(*tensors)}")
    return False


def _nthreads(numel: int, rows: int) -> int:
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


class _Rows:
    """A ``(rows, n)`` view of a tensor, or a contiguous copy written back by ``done()``."""

    def __init__(self, t: torch.Tensor, n: int) -> None:
        self.t = t
        self.copied = False
        try:
            self.rows = t.view(-1, n)
        except RuntimeError:  # not viewable (strided): step a copy, write it back
            self.rows = t.reshape(-1, n).clone()
            self.copied = True

    def done(self) -> None:
        if self.copied:
            self.t.copy_(self.rows.view(self.t.shape))


def _written(*tensors: torch.Tensor | None) -> None:
    """Bump the autograd version counters of tensors the C kernel wrote through pointers,
    so that autograd still detects a step taken between a forward and its backward."""
    for t in tensors:
        if t is not None:
            increment_version(t)


def _raise_bad(first_bad: int, y: torch.Tensor, n: int, name: str = "y") -> None:
    raise ValueError(
        f"point {first_bad} of {name} (shape {tuple(y.shape)}, rows of {n}) is a zero or "
        "non-finite vector (not a point of G(1,n)) or its gradient is not finite: it was "
        "left unchanged, the other rows were stepped"
    )


#: dtype code -> [(tensor index, the C tuple of that tensor, rows, n)]
_Jobs = dict[int, list[tuple[int, tuple, int, int]]]


def _run_c(kernel: str, jobs: _Jobs, bad: list[int], *args: float) -> list[int]:
    """One multi-tensor call of ``_crows.<kernel>`` per dtype; ``bad[i]`` gets tensor i's
    first bad row or -1. Returns the indices of the tensors it wrote."""
    written = []
    for code, items in jobs.items():
        numel = sum(rows * n for _, _, rows, n in items)
        rows = sum(rows for _, _, rows, _ in items)
        call = getattr(_crows, kernel)
        out = call([job for _, job, _, _ in items], code, *args, _nthreads(numel, rows))
        for (i, *_), first in zip(items, out, strict=True):
            bad[i] = first
            written.append(i)
    return written


def _raise_first_bad(bad: list[int], ys: Sequence[torch.Tensor], ns: list[int]) -> None:
    for i, first in enumerate(bad):
        if first >= 0:
            _raise_bad(first, ys[i], ns[i], list_item_name("y", i, len(ys)))


def sgdg_foreach_(
    ys: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    taus: Sequence[torch.Tensor | None],
    *,
    ndims: int | Sequence[int],
    lr: float,
    momentum: float,
    grad_clip: float | None = None,
    backend: Backend = "auto",
    check: bool = True,
) -> None:
    r"""One SGD-G step of several Grassmann1 parameters, in place (the multi-tensor path).

    :func:`sgdg_step_` on every ``(ys[i], gs[i], taus[i])`` with ``ndims[i]`` (one int:
    the same for all); the C-eligible tensors of one dtype are stepped by one C call that
    spreads the rows of all of them over the threads. With ``check``, a zero or
    non-finite point raises ValueError after every other point was stepped.

    >>> ys = [torch.randn(4, 6), torch.randn(3, 2, 5)]
    >>> taus = [torch.zeros_like(y) for y in ys]
    >>> sgdg_foreach_(ys, [torch.randn_like(y) for y in ys], taus, ndims=[1, 2], lr=0.1,
    ...               momentum=0.9)
    >>> [bool(torch.allclose(y.flatten(1).norm(dim=1), torch.ones(len(y)))) for y in ys]
    [True, True]
    """
    count = same_length(ys=ys, gs=gs, taus=taus)
    ndims = per_tensor_ndims(ndims, count)
    check_scalar("lr", lr)
    check_scalar("momentum", momentum, 0.0)
    nu = clip_threshold(grad_clip)
    ns = []
    for y, g, tau, ndim in zip(ys, gs, taus, ndims, strict=True):
        ns.append(check_tensors(y, ndim, g=g, tau=tau))
        if g.shape != y.shape or (tau is not None and tau.shape != y.shape):
            shapes = (tuple(y.shape), tuple(g.shape), None if tau is None else tuple(tau.shape))
            raise ValueError(f"y, g, tau must have one shape, got {shapes}")
        if tau is None and momentum != 0:
            raise ValueError("momentum != 0 needs a momentum buffer tau (zeros at the start)")
    check_no_overlap({"y": ys, "tau": taus}, {"g": gs})
    choice = _backend(backend)
    bad = [-1] * count
    jobs: _Jobs = {}
    for i, (y, g, tau, n) in enumerate(zip(ys, gs, taus, ns, strict=True)):
        if y.numel() == 0:
            continue
        if _use_c(choice, y, g, tau):
            rows = y.numel() // n
            job = (y.data_ptr(), g.data_ptr(), 0 if tau is None else tau.data_ptr(), rows, n)
            jobs.setdefault(_C_DTYPES[y.dtype], []).append((i, job, rows, n))
        else:
            bad[i] = _sgdg_torch(y, g, tau, n, lr=lr, momentum=momentum, nu=nu)
    for i in _run_c("sgdg_many", jobs, bad, float(lr), float(momentum), nu):
        _written(ys[i], taus[i])
    if check:
        _raise_first_bad(bad, ys, ns)


def _sgdg_torch(y, g, tau, n: int, *, lr: float, momentum: float, nu: float) -> int:
    with torch.no_grad():
        yr, gr = _Rows(y, n), _Rows(g, n)
        tr = None if tau is None else _Rows(tau, n)
        mask = torch_rows.sgdg_rows_(
            yr.rows, gr.rows, None if tr is None else tr.rows, lr=lr, momentum=momentum, nu=nu
        )
        yr.done()
        if tr is not None:
            tr.done()
    return _first(mask)


def _first(mask: torch.Tensor) -> int:
    """The first True row of ``mask``, or -1 (one synchronization on CUDA)."""
    if not bool(mask.any()):
        return -1
    return int(mask.view(-1).nonzero()[0, 0])


def sgdg_step_(
    y: torch.Tensor,
    g: torch.Tensor,
    tau: torch.Tensor | None,
    *,
    ndim: int,
    lr: float,
    momentum: float,
    grad_clip: float | None = None,
    backend: Backend = "auto",
    check: bool = True,
) -> None:
    r"""One SGD-G step of a Grassmann1 parameter ``y``, in place (``tau`` too).

    Per point, ``h = <y, y> g - <y, g> y``, ``h^ = h min(1, grad_clip / |h|_y)``,
    ``d = momentum tau - lr h^``, ``y <- expmap(y, d)`` (unit rows),
    ``tau <- transp_follow_expmap(y_old, d, d)``.

    Parameters
    ----------
    y : the parameter (``(*batch, *point)``, the trailing ``ndim`` dims form one point).
    g : its Euclidean gradient, same shape (not modified).
    tau : the momentum buffer, same shape (zeros before the first step), or None when
        ``momentum == 0``.
    ndim : number of trailing dims that form one point (``Grassmann1.ndim``).
    lr, momentum, grad_clip : the hyper-parameters (``grad_clip=None``: no clipping).
    backend : "auto" (C when eligible), "c" or "torch".
    check : raise ValueError when a point of ``y`` is zero or not finite (that point is
        left unchanged); on CUDA the check costs one synchronization.
    """
    sgdg_foreach_(
        [y],
        [g],
        [tau],
        ndims=ndim,
        lr=lr,
        momentum=momentum,
        grad_clip=grad_clip,
        backend=backend,
        check=check,
    )


def adamg_foreach_(
    ys: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    *,
    ndims: int | Sequence[int],
    steps: int | float | Sequence[int | float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    grad_clip: float | None = None,
    backend: Backend = "auto",
    check: bool = True,
) -> None:
    r"""One Adam-G step of several Grassmann1 parameters, in place (the multi-tensor path).

    :func:`adamg_step_` on every ``(ys[i], gs[i], ms[i], vs[i])`` with ``ndims[i]`` and
    ``steps[i]`` (one number: the same for all); C-eligible tensors of one dtype share one
    C call, as in :func:`sgdg_foreach_`.

    >>> ys, ms = [torch.randn(4, 6)], [torch.zeros(4, 6)]
    >>> adamg_foreach_(ys, [torch.randn(4, 6)], ms, [torch.zeros(4)], ndims=1, steps=1,
    ...                lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    >>> bool(torch.allclose(ys[0].norm(dim=1), torch.ones(4)))
    True
    """
    count = same_length(ys=ys, gs=gs, ms=ms, vs=vs)
    ndims = per_tensor_ndims(ndims, count)
    if isinstance(steps, (int, float)):
        steps = [steps] * count
    elif len(steps) != count:
        raise ValueError(f"steps has {len(steps)} entries for {count} tensors")
    check_scalar("lr", lr)
    check_scalar("beta1", beta1, 0.0, 1.0)
    check_scalar("beta2", beta2, 0.0, 1.0)
    check_scalar("eps", eps, 0.0)
    nu = clip_threshold(grad_clip)
    ns = []
    for y, g, m, v, ndim, step in zip(ys, gs, ms, vs, ndims, steps, strict=True):
        n = check_tensors(y, ndim, g=g, m=m, v=v)
        ns.append(n)
        if g.shape != y.shape or m.shape != y.shape:
            shapes = (tuple(y.shape), tuple(g.shape), tuple(m.shape))
            raise ValueError(f"y, g, m must have one shape, got {shapes}")
        if v.numel() != y.numel() // n:
            rows = y.numel() // n
            raise ValueError(f"v has {v.numel()} elements, expected one per point ({rows})")
        check_scalar("step", step, 1.0)
    check_no_overlap({"y": ys, "m": ms, "v": vs}, {"g": gs})
    choice = _backend(backend)
    bad = [-1] * count
    jobs: _Jobs = {}
    hyper = {"beta1": beta1, "beta2": beta2, "eps": eps, "nu": nu}
    for i, (y, g, m, v, n, step) in enumerate(zip(ys, gs, ms, vs, ns, steps, strict=True)):
        if y.numel() == 0:
            continue
        rows = y.numel() // n
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if _use_c(choice, y, g, m, v):
            job = (y.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), rows, n, step_size)
            jobs.setdefault(_C_DTYPES[y.dtype], []).append((i, job, rows, n))
        else:
            bad[i] = _adamg_torch(y, g, m, v, n, step_size=step_size, **hyper)
    for i in _run_c("adamg_many", jobs, bad, float(beta1), float(beta2), float(eps), nu):
        _written(ys[i], ms[i], vs[i])
    if check:
        _raise_first_bad(bad, ys, ns)


def _adamg_torch(y, g, m, v, n: int, *, step_size: float, **hyper: float) -> int:
    with torch.no_grad():
        yr, gr, mr, vr = _Rows(y, n), _Rows(g, n), _Rows(m, n), _Rows(v, 1)
        mask = torch_rows.adamg_rows_(
            yr.rows, gr.rows, mr.rows, vr.rows, step_size=step_size, **hyper
        )
        yr.done()
        mr.done()
        vr.done()
    return _first(mask)


def adamg_step_(
    y: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    ndim: int,
    step: int | float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    grad_clip: float | None = None,
    backend: Backend = "auto",
    check: bool = True,
) -> None:
    r"""One Adam-G step of a Grassmann1 parameter ``y``, in place (``m`` and ``v`` too).

    Per point, with ``h^`` the clipped Riemannian gradient as in :func:`sgdg_step_`:
    ``m' = beta1 m + (1 - beta1) h^``, ``v' = beta2 v + (1 - beta2) |h^|_y^2``,
    ``d = -lr sqrt(1 - beta2^step) / (1 - beta1^step) m' / sqrt(v' + eps)``,
    ``y <- expmap(y, d)``, ``m <- transp_follow_expmap(y_old, d, m')``.

    ``m`` has the shape of ``y``; ``v`` holds one scalar per point (``rows`` elements in
    row order, e.g. the keepdim shape ``(out, 1, 1, 1)``); both start at zero and ``step``
    counts from 1. Other arguments as in :func:`sgdg_step_`.
    """
    adamg_foreach_(
        [y],
        [g],
        [m],
        [v],
        ndims=ndim,
        steps=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        grad_clip=grad_clip,
        backend=backend,
        check=check,
    )
