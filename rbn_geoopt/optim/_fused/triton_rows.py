r"""The fused SGD-G and Adam-G row steps, and the guard's row sweep, as Triton kernels.

The GPU twin of the C kernel ``_crows.c`` / ``_rows_impl.h``: the same per-row formulas
(docs/design.md, "Fused kernels"; the module docstring of :mod:`.torch_twin` lists them),
one program per tile of ``ROWS`` rows, one launch per tensor. With ``yy = <y, y>``,
``yg = <y, g>``, ``gg = <g, g>``, ``mm``, ``my``, ``mg`` (pass 1, accumulated in float64
as in C), the per-row scalars are float64: ``|h|_y^2 = max(yy gg - yg^2, 0)``,
``c = min(1, nu / |h|_y)``, the momentum's radial part ``my / yy`` removed, the step
angle ``t = |d| / |y|``, ``sinc`` by its series ``1 - t^2/6 (1 - t^2/20)`` below
``1e-2``, and a row with ``|yy - 1| <= snap`` that moves written at norm exactly 1. Pass 2
writes ``y <- k0 y + k1 mom + k2 g`` and ``mom <- k3 y + k4 mom + k5 g`` (coefficients
cast to the working dtype, as in C). A row of at most ``BLOCK`` elements is read once and
written once (kept in registers between the passes); longer rows are looped in blocks of
``BLOCK`` and read twice. float16/bfloat16 points are computed in float32 and stored
rounded; their float32 momentum is then re-projected at the stored point (a third sweep
for long rows), as :mod:`.torch_twin` does.

A row whose ``<y, y>`` is not positive and finite or whose gradient dot products are not
finite is left unchanged (``v`` included) and its index reported (the step guard refuses
such rows first, so a report means it was bypassed). Tensors are stepped in place and
their autograd version counters bumped; a strided tensor is stepped in a contiguous copy
that is written back.

Triton runs CUDA tensors; under ``TRITON_INTERPRET=1`` (read when this module is first
imported) its interpreter runs the same kernels on CPU tensors, which is how the test
suite proves them equal to the C kernel without a GPU.

>>> import torch
>>> from rbn_geoopt.optim._fused import triton_rows
>>> y = torch.tensor([[2.0, 0.0]], dtype=torch.float64, device=triton_rows.DEVICE)
>>> g = torch.tensor([[0.0, -0.125]], dtype=torch.float64, device=y.device)
>>> tau = torch.zeros_like(y)
>>> triton_rows.sgdg_([y], [g], [tau], [2], lr=0.5, momentum=0.9, nu=float("inf"))
[-1]
>>> y.cpu() / 2  # (cos 0.125, sin 0.125)
tensor([[0.9922, 0.1247]], dtype=torch.float64)
"""

import torch
import triton
import triton.language as tl

from .torch_twin import snap

__all__ = ["DEVICE", "INTERPRET", "adamg_", "check_rows", "sgdg_", "takes"]

#: whether Triton's interpreter runs the kernels (``TRITON_INTERPRET`` at import)
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
#: the device type the kernels run on here
DEVICE: str = "cpu" if INTERPRET else "cuda"
#: elements per program tile (ROWS x BLOCK); longer rows loop over blocks of this size
TILE = 4096
_HALF = (torch.float16, torch.bfloat16)
_NONE = torch.iinfo(torch.int64).max  # "no bad row" in the report buffers


@triton.jit
def _finite(x):
    return (x - x) == 0


@triton.jit
def _sinc(t):
    """sin(t)/t, the series 1 - t^2/6 (1 - t^2/20) below 1e-2 (t >= 0)."""
    small = t < 1e-2
    t2 = t * t
    return tl.where(small, 1.0 - t2 / 6.0 * (1.0 - t2 / 20.0), tl.sin(t) / tl.where(small, 1.0, t))


@triton.jit
def _step_coefficients(yy, a, p, q, r, mm2, snap_tol):
    """k0..k5 of a step along d = a mom', mom' = p y + q mom + r g, |mom'|^2 = mm2."""
    t = tl.sqrt(a * a * mm2 / yy)
    co = tl.cos(t)
    si = _sinc(t)
    s = tl.where((t > 0) & (tl.abs(yy - 1.0) <= snap_tol), 1.0 / tl.sqrt(yy), 1.0)
    k0 = (co + a * p * si) * s
    k1 = a * q * si * s
    k2 = a * r * si * s
    k3 = (p * co - a * mm2 * si / yy) * s
    k4 = q * co * s
    k5 = r * co * s
    return k0, k1, k2, k3, k4, k5


@triton.jit
def _dots(y, g, m, MOM: tl.constexpr):
    """Row sums of a (ROWS, BLOCK) tile, accumulated in float64 (as the C kernel does):
    yy, yg, gg, mm, my, mg."""
    y = y.to(tl.float64)
    g = g.to(tl.float64)
    yy = tl.sum(y * y, axis=1)
    yg = tl.sum(y * g, axis=1)
    gg = tl.sum(g * g, axis=1)
    if MOM:
        m = m.to(tl.float64)
        mm = tl.sum(m * m, axis=1)
        my = tl.sum(m * y, axis=1)
        mg = tl.sum(m * g, axis=1)
    else:
        mm = tl.zeros_like(yy)
        my = tl.zeros_like(yy)
        mg = tl.zeros_like(yy)
    return yy, yg, gg, mm, my, mg


@triton.jit
def _step_rows(
    y_ptr, g_ptr, m_ptr, v_ptr, bad_ptr, slot, rows, n,
    lr: tl.float64, gamma: tl.float64, step_size: tl.float64, beta1: tl.float64,
    beta2: tl.float64, eps: tl.float64, nu: tl.float64, snap_tol: tl.float64,
    ADAM: tl.constexpr, MOM: tl.constexpr, HALF: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    """One SGD-G (ADAM false) or Adam-G step of rows [pid ROWS, pid ROWS + ROWS)."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    base = row[:, None] * n
    cols = tl.arange(0, BLOCK)[None, :]
    # pass 1: the six dot products
    if ONE_BLOCK:
        mask = live[:, None] & (cols < n)
        y = tl.load(y_ptr + base + cols, mask=mask, other=0).to(ACC)
        g = tl.load(g_ptr + base + cols, mask=mask, other=0).to(ACC)
        if MOM:
            m = tl.load(m_ptr + base + cols, mask=mask, other=0).to(ACC)
        else:
            m = y
        yy, yg, gg, mm, my, mg = _dots(y, g, m, MOM)
    else:
        yy = tl.zeros([ROWS], tl.float64)
        yg = tl.zeros([ROWS], tl.float64)
        gg = tl.zeros([ROWS], tl.float64)
        mm = tl.zeros([ROWS], tl.float64)
        my = tl.zeros([ROWS], tl.float64)
        mg = tl.zeros([ROWS], tl.float64)
        for start in range(0, n, BLOCK):
            mask = live[:, None] & (cols + start < n)
            yb = tl.load(y_ptr + base + start + cols, mask=mask, other=0).to(ACC)
            gb = tl.load(g_ptr + base + start + cols, mask=mask, other=0).to(ACC)
            if MOM:
                mb = tl.load(m_ptr + base + start + cols, mask=mask, other=0).to(ACC)
            else:
                mb = yb
            a0, a1, a2, a3, a4, a5 = _dots(yb, gb, mb, MOM)
            yy += a0
            yg += a1
            gg += a2
            mm += a3
            my += a4
            mg += a5
    ok = live & (yy > 0) & _finite(yy) & _finite(yg) & _finite(gg)
    first = tl.min(tl.where(live & ~ok, row, 9223372036854775807), axis=0)
    tl.atomic_min(bad_ptr + slot, first, mask=first < 9223372036854775807)
    yy = tl.where(ok, yy, 1.0)
    # per-row coefficients (float64)
    hn2 = tl.maximum(yy * gg - yg * yg, 0.0)
    hn = tl.sqrt(hn2)
    c = tl.where(hn > nu, nu / tl.where(hn > nu, hn, 1.0), 1.0)
    pm = my / yy
    hz = mm - my * pm
    hz = tl.where(hz > 0, hz, 0.0)
    mh = yy * mg - yg * my  # <mom, h> = <mom_h, h>
    if ADAM:
        v_raw = tl.load(v_ptr + row, mask=ok, other=0)
        v_st = (beta2 * v_raw.to(tl.float64) + (1.0 - beta2) * c * c * hn2).to(v_raw.dtype)
        tl.store(v_ptr + row, v_st, mask=ok)
        w = (1.0 - beta1) * c
        mm2 = beta1 * beta1 * hz + w * w * yy * hn2 + 2.0 * beta1 * w * mh
        mm2 = tl.where(mm2 > 0, mm2, 0.0)
        a = tl.where(mm2 > 0, -step_size / tl.sqrt(v_st.to(tl.float64) + eps), 0.0)
        k0, k1, k2, k3, k4, k5 = _step_coefficients(
            yy, a, -w * yg - beta1 * pm, beta1 + tl.zeros_like(yy), w * yy, mm2, snap_tol
        )
    else:
        lc = lr * c
        dd = gamma * gamma * hz + lc * lc * yy * hn2 - 2.0 * gamma * lc * mh
        dd = tl.where(dd > 0, dd, 0.0)
        k0, k1, k2, k3, k4, k5 = _step_coefficients(
            yy, 1.0 + tl.zeros_like(yy), lc * yg - gamma * pm, gamma + tl.zeros_like(yy),
            -lc * yy, dd, snap_tol,
        )  # fmt: skip
    k0 = k0.to(ACC)[:, None]
    k1 = k1.to(ACC)[:, None]
    k2 = k2.to(ACC)[:, None]
    k3 = k3.to(ACC)[:, None]
    k4 = k4.to(ACC)[:, None]
    k5 = k5.to(ACC)[:, None]
    okc = ok[:, None]
    # pass 2: the writes (and, for a half-precision point, the re-projection's dots)
    if ONE_BLOCK:
        mask = okc & (cols < n)
        if MOM:
            new_y = k0 * y + k1 * m + k2 * g
            new_m = k3 * y + k4 * m + k5 * g
        else:
            new_y = k0 * y + k2 * g
        y_st = new_y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + base + cols, y_st, mask=mask)
        if MOM:
            if HALF:
                ys = y_st.to(ACC)
                coef = tl.sum(ys * new_m, axis=1).to(tl.float64) / tl.where(
                    ok, tl.sum(ys * ys, axis=1).to(tl.float64), 1.0
                )
                new_m = new_m - coef.to(ACC)[:, None] * ys
            tl.store(m_ptr + base + cols, new_m.to(m_ptr.dtype.element_ty), mask=mask)
    else:
        c1 = tl.zeros([ROWS], tl.float64)
        c2 = tl.zeros([ROWS], tl.float64)
        for start in range(0, n, BLOCK):
            mask = okc & (cols + start < n)
            yb = tl.load(y_ptr + base + start + cols, mask=mask, other=0).to(ACC)
            gb = tl.load(g_ptr + base + start + cols, mask=mask, other=0).to(ACC)
            if MOM:
                mb = tl.load(m_ptr + base + start + cols, mask=mask, other=0).to(ACC)
                new_y = k0 * yb + k1 * mb + k2 * gb
                new_m = k3 * yb + k4 * mb + k5 * gb
                tl.store(m_ptr + base + start + cols, new_m.to(m_ptr.dtype.element_ty), mask=mask)
            else:
                new_y = k0 * yb + k2 * gb
                new_m = new_y
            y_st = new_y.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + base + start + cols, y_st, mask=mask)
            if HALF and MOM:
                ys = y_st.to(ACC)
                c1 += tl.sum(ys * new_m, axis=1).to(tl.float64)
                c2 += tl.sum(ys * ys, axis=1).to(tl.float64)
        if HALF and MOM:  # pass 3: project the momentum at the stored point
            coef = (c1 / tl.where(ok, c2, 1.0)).to(ACC)[:, None]
            for start in range(0, n, BLOCK):
                mask = okc & (cols + start < n)
                ys = tl.load(y_ptr + base + start + cols, mask=mask, other=0).to(ACC)
                mb = tl.load(m_ptr + base + start + cols, mask=mask, other=0)
                tl.store(m_ptr + base + start + cols, mb - coef * ys, mask=mask)


@triton.jit
def _check_rows(
    y_ptr, g_ptr, out_ptr, slot, rows, n,
    lo2: tl.float64, hi2: tl.float64, glim2: tl.float64,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The guard's verdict on rows [pid ROWS, pid ROWS + ROWS): atomic minimum of the bad
    point rows into out[slot], of the bad gradient rows into out[slot + 1]."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    base = row[:, None] * n
    cols = tl.arange(0, BLOCK)[None, :]
    yy = tl.zeros([ROWS], tl.float64)
    gg = tl.zeros([ROWS], tl.float64)
    for start in range(0, n, BLOCK):
        mask = live[:, None] & (cols + start < n)
        yb = tl.load(y_ptr + base + start + cols, mask=mask, other=0).to(ACC)
        gb = tl.load(g_ptr + base + start + cols, mask=mask, other=0).to(ACC)
        yy += tl.sum(yb * yb, axis=1).to(tl.float64)
        gg += tl.sum(gb * gb, axis=1).to(tl.float64)
    bad_point = live & ~((yy >= lo2) & (yy <= hi2))
    bad_grad = live & ~((gg <= hi2) & (gg * yy * yy <= glim2))
    first_point = tl.min(tl.where(bad_point, row, 9223372036854775807), axis=0)
    first_grad = tl.min(tl.where(bad_grad, row, 9223372036854775807), axis=0)
    tl.atomic_min(out_ptr + slot, first_point, mask=first_point < 9223372036854775807)
    tl.atomic_min(out_ptr + slot + 1, first_grad, mask=first_grad < 9223372036854775807)


# ------------------------------------------------------------------------ host side
def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether these kernels can step ``tensors`` (point first, then gradient and state):
    on CUDA (any device type under the interpreter), the point float32/float64/float16/
    bfloat16, the gradient of the point's dtype, state of the working dtype (float32 for
    a half-precision point), all on one device."""
    y = tensors[0]
    if y.device.type != "cuda" and not INTERPRET:
        return False
    if y.dtype not in (torch.float32, torch.float64, *_HALF):
        return False
    work = torch.float32 if y.dtype in _HALF else y.dtype
    for k, t in enumerate(tensors[1:]):
        if t is None:
            continue
        if t.device != y.device or t.dtype != (y.dtype if k == 0 else work):
            return False
    return True


def _tile(n: int, rows: int) -> tuple[int, int, int]:
    """``(ROWS, BLOCK, num_warps)``: BLOCK covers a row up to TILE elements, ROWS fills the
    tile (at most the next power of two of ``rows``)."""
    block = min(triton.next_power_of_2(n), TILE)
    tile_rows = max(1, min(TILE // block, triton.next_power_of_2(rows)))
    return tile_rows, block, 4 if tile_rows * block <= 2048 else 8


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch(kernel, grid, *args, **meta) -> None:
    """Every kernel launch of this module (one place for profilers to wrap)."""
    kernel[grid](*args, **meta)


def _contiguous(ts):
    """Contiguous versions of ``ts`` (the same tensor when already contiguous)."""
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in ts]


class _Reports:
    """One int64 buffer per device, ``width`` slots per tensor, for the kernels' atomic
    minima; read once per device (one synchronization) by :meth:`read`."""

    def __init__(self, ys, width: int):
        self.where: list[tuple[torch.Tensor, int]] = []
        self.buffers: dict[torch.device, torch.Tensor] = {}
        counts: dict[torch.device, int] = {}
        for y in ys:
            k = counts.get(y.device, 0)
            counts[y.device] = k + 1
            self.where.append((y.device, k * width))
        for device, k in counts.items():
            self.buffers[device] = torch.full((k * width,), _NONE, dtype=torch.int64, device=device)
        self.where = [(self.buffers[d], slot) for d, slot in self.where]
        self.width = width

    def read(self) -> list[list[int]]:
        values = {d: b.tolist() for d, b in self.buffers.items()}
        return [
            [-1 if x == _NONE else x for x in values[buf.device][slot : slot + self.width]]
            for buf, slot in self.where
        ]


def _finish(originals, used, reports: _Reports) -> list[int]:
    """Write back the contiguous copies, bump version counters, read the reports."""
    for t, u in zip(originals, used, strict=True):
        if t is not None and u is not t:
            t.copy_(u)
    torch._C._increment_version([t for t in originals if t is not None])
    return [first for (first,) in reports.read()]


def sgdg_(ys, gs, taus, ns, *, lr: float, momentum: float, nu: float) -> list[int]:
    """One SGD-G step of every ``(ys[i], gs[i], taus[i])`` (points of G(1, ns[i]) in rows,
    ``taus[i]`` None without momentum), in place; returns per tensor the first row left
    unchanged (-1: none). One launch per tensor."""
    reports = _Reports(ys, 1)
    originals, used = [], []
    for (bad, slot), y, g, tau, n in zip(reports.where, ys, gs, taus, ns, strict=True):
        rows = y.numel() // n
        if rows == 0:
            continue
        yc, gc, tc = _contiguous((y, g, tau))
        originals += (y, tau)
        used += (yc, tc)
        tile_rows, block, warps = _tile(n, rows)
        _launch(
            _step_rows, (triton.cdiv(rows, tile_rows),),
            yc, gc, yc if tc is None else tc, yc, bad, slot, rows, n,
            lr, 0.0 if tc is None else momentum, 0.0, 0.0, 0.0, 0.0, nu, snap(y.dtype),
            ADAM=False, MOM=tc is not None, HALF=y.dtype in _HALF, ACC=_acc(y.dtype),
            ROWS=tile_rows, BLOCK=block, ONE_BLOCK=n <= block, num_warps=warps,
        )  # fmt: skip
    return _finish(originals, used, reports)


def adamg_(ys, gs, ms, vs, ns, step_sizes, *, beta1: float, beta2: float, eps: float,
           nu: float) -> list[int]:  # fmt: skip
    """One Adam-G step of every ``(ys[i], gs[i], ms[i], vs[i])`` (``vs[i]``: one second
    moment per row) with ``step_sizes[i] = lr sqrt(1 - beta2^k) / (1 - beta1^k)``, in
    place; returns per tensor the first row left unchanged (-1: none)."""
    reports = _Reports(ys, 1)
    originals, used = [], []
    items = zip(reports.where, ys, gs, ms, vs, ns, step_sizes, strict=True)
    for (bad, slot), y, g, m, v, n, size in items:
        rows = y.numel() // n
        if rows == 0:
            continue
        yc, gc, mc, vc = _contiguous((y, g, m, v))
        originals += (y, m, v)
        used += (yc, mc, vc)
        tile_rows, block, warps = _tile(n, rows)
        _launch(
            _step_rows, (triton.cdiv(rows, tile_rows),),
            yc, gc, mc, vc, bad, slot, rows, n,
            0.0, 0.0, size, beta1, beta2, eps, nu, snap(y.dtype),
            ADAM=True, MOM=True, HALF=y.dtype in _HALF, ACC=_acc(y.dtype),
            ROWS=tile_rows, BLOCK=block, ONE_BLOCK=n <= block, num_warps=warps,
        )  # fmt: skip
    return _finish(originals, used, reports)


def check_rows(ys, gs, ns, limits) -> list[tuple[int, int]]:
    """Per tensor ``(first bad point row, first bad gradient row)`` (-1: none) by the
    guard's rule, ``limits(dtype) = (lo2, hi2, glim2)``: one launch per tensor, one read
    of the verdicts for all of them."""
    reports = _Reports(ys, 2)
    for (out, slot), y, g, n in zip(reports.where, ys, gs, ns, strict=True):
        rows = y.numel() // n
        if rows == 0:
            continue
        yc, gc = _contiguous((y, g))
        tile_rows, block, warps = _tile(n, rows)
        _launch(
            _check_rows, (triton.cdiv(rows, tile_rows),),
            yc, gc, out, slot, rows, n, *limits(y.dtype),
            ACC=_acc(y.dtype), ROWS=tile_rows, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return [(point, grad) for point, grad in reports.read()]
