r"""Fused SGD-G / Adam-G steps for Grassmann1 parameters: picks the C kernel or pure torch.

``sgdg_step_`` and ``adamg_step_`` step one parameter tensor in place, every point (the
trailing ``ndim`` dimensions) at once, with the per-row formulas of
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
from typing import Literal

import torch
from torch.autograd.graph import increment_version

from . import torch_rows

try:  # imported after torch, so that it shares torch's OpenMP runtime (libgomp)
    from . import _crows
except ImportError:  # not built (no compiler): everything runs in torch
    _crows = None

__all__ = [
    "ENV_VAR",
    "adamg_step_",
    "c_available",
    "c_eligible",
    "sgdg_step_",
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


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes that ``t`` can touch (for the aliasing check)."""
    start, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():
        return start, start + t.numel() * size
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (span + 1) * size


def _check_no_overlap(named: dict[str, torch.Tensor | None]) -> None:
    ranges = [(k, *_byte_range(t)) for k, t in named.items() if t is not None and t.numel()]
    for i, (a, lo_a, hi_a) in enumerate(ranges):
        for b, lo_b, hi_b in ranges[i + 1 :]:
            if lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{a} and {b} share memory: the step needs separate tensors")


def c_eligible(*tensors: torch.Tensor | None) -> str | None:
    """None when the C kernel can step these tensors, else the reason why not."""
    if _crows is None:
        return "the C extension rbn_geoopt.kernels._crows is not built"
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    for t in ts:
        if t.device.type != "cpu":
            return f"tensor on {t.device}, the C kernel runs on CPU only"
        if t.dtype != dtype or t.dtype not in _C_DTYPES:
            return f"dtypes {[t.dtype for t in ts]}: the C kernel needs one of float32/float64"
        if not t.is_contiguous():
            return "a tensor is not C-contiguous"
    return None


def _backend(backend: Backend) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto").lower() or "auto"
        if env not in _BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {_BACKENDS}, got {env!r}")
        backend = env
    return backend


def _use_c(backend: Backend, *tensors: torch.Tensor | None) -> bool:
    choice = _backend(backend)
    if choice == "torch":
        return False
    reason = c_eligible(*tensors)
    if reason is not None and choice == "c":
        raise ValueError(f"backend='c' cannot be used: {reason}")
    return reason is None


def _nthreads(numel: int, rows: int) -> int:
    if numel < PARALLEL_MIN_NUMEL:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def _point_size(y: torch.Tensor, ndim: int) -> int:
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim must be an int >= 1, got {ndim!r}")
    if y.dim() < ndim:
        raise ValueError(f"y has shape {tuple(y.shape)}: fewer than ndim={ndim} dimensions")
    return math.prod(y.shape[y.dim() - ndim :])


def _check_tensors(y: torch.Tensor, ndim: int, **others: torch.Tensor | None) -> int:
    """Validate shapes, devices and dtypes; return the point size ``n``."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {type(y).__name__}")
    n = _point_size(y, ndim)
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.device != y.device:
            raise ValueError(f"{name} is on {t.device}, y on {y.device}")
    return n


def _check_scalar(name: str, value: float, lo: float | None = None, hi: float | None = None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value >= hi):
        raise ValueError(f"{name} must lie in [{lo}, {hi}), got {value!r}")


def _nu(grad_clip: float | None) -> float:
    """The clipping threshold: ``None`` and ``inf`` both mean no clipping."""
    if grad_clip is None or grad_clip == math.inf:
        return math.inf
    _check_scalar("grad_clip", grad_clip)
    if grad_clip <= 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    return float(grad_clip)


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


def _raise_bad(first_bad: int, y: torch.Tensor, n: int) -> None:
    raise ValueError(
        f"point {first_bad} of y (shape {tuple(y.shape)}, rows of {n}) is a zero or "
        "non-finite vector, not a point of G(1,n): it was left unchanged, the other rows "
        "were stepped"
    )


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
    n = _check_tensors(y, ndim, g=g, tau=tau)
    if g.shape != y.shape or (tau is not None and tau.shape != y.shape):
        shapes = (tuple(y.shape), tuple(g.shape), None if tau is None else tuple(tau.shape))
        raise ValueError(f"y, g, tau must have one shape, got {shapes}")
    _check_scalar("lr", lr)
    _check_scalar("momentum", momentum, 0.0)
    if tau is None and momentum != 0:
        raise ValueError("momentum != 0 needs a momentum buffer tau (zeros at the start)")
    nu = _nu(grad_clip)
    _check_no_overlap({"y": y, "g": g, "tau": tau})
    if y.numel() == 0:
        return
    if _use_c(backend, y, g, tau):
        rows = y.numel() // n
        bad = _crows.sgdg(
            y.data_ptr(),
            g.data_ptr(),
            0 if tau is None else tau.data_ptr(),
            rows,
            n,
            _C_DTYPES[y.dtype],
            float(lr),
            float(momentum),
            nu,
            _nthreads(y.numel(), rows),
        )
        _written(y, tau)
        if check and bad >= 0:
            _raise_bad(bad, y, n)
        return
    with torch.no_grad():
        yr, gr = _Rows(y, n), _Rows(g, n)
        tr = None if tau is None else _Rows(tau, n)
        mask = torch_rows.sgdg_rows_(
            yr.rows, gr.rows, None if tr is None else tr.rows, lr=lr, momentum=momentum, nu=nu
        )
        yr.done()
        if tr is not None:
            tr.done()
    if check and bool(mask.any()):
        _raise_bad(int(mask.view(-1).nonzero()[0, 0]), y, n)


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
    n = _check_tensors(y, ndim, g=g, m=m, v=v)
    if g.shape != y.shape or m.shape != y.shape:
        shapes = (tuple(y.shape), tuple(g.shape), tuple(m.shape))
        raise ValueError(f"y, g, m must have one shape, got {shapes}")
    rows = y.numel() // n if n else 0
    if v.numel() != rows:
        raise ValueError(f"v has {v.numel()} elements, expected one per point ({rows})")
    _check_scalar("lr", lr)
    _check_scalar("beta1", beta1, 0.0, 1.0)
    _check_scalar("beta2", beta2, 0.0, 1.0)
    _check_scalar("eps", eps, 0.0)
    _check_scalar("step", step, 1.0)
    nu = _nu(grad_clip)
    _check_no_overlap({"y": y, "g": g, "m": m, "v": v})
    if y.numel() == 0:
        return
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    if _use_c(backend, y, g, m, v):
        bad = _crows.adamg(
            y.data_ptr(),
            g.data_ptr(),
            m.data_ptr(),
            v.data_ptr(),
            rows,
            n,
            _C_DTYPES[y.dtype],
            float(step_size),
            float(beta1),
            float(beta2),
            float(eps),
            nu,
            _nthreads(y.numel(), rows),
        )
        _written(y, m, v)
        if check and bad >= 0:
            _raise_bad(bad, y, n)
        return
    with torch.no_grad():
        yr, gr, mr, vr = _Rows(y, n), _Rows(g, n), _Rows(m, n), _Rows(v, 1)
        mask = torch_rows.adamg_rows_(
            yr.rows,
            gr.rows,
            mr.rows,
            vr.rows,
            step_size=step_size,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            nu=nu,
        )
        yr.done()
        mr.done()
        vr.done()
    if check and bool(mask.any()):
        _raise_bad(int(mask.view(-1).nonzero()[0, 0]), y, n)
