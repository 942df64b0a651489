r"""The fused SGD-G and Adam-G row steps in pure torch: the twin of the C kernel ``_crows.c``.

Used for every tensor the C kernel does not take (CUDA and other devices, half precision,
strided views, or no compiler at install) and as the reference the C kernel follows line
by line. Each row ``y`` of a tensor is one point of G(1, n) (any non-zero representative),
``g`` its Euclidean gradient, ``mom`` its momentum (SGD-G's ``tau``, Adam-G's ``m``). With
``yy = <y, y>``, ``yg = <y, g>``, ``gg = <g, g>``, ``my = <mom, y>``, ``r = sqrt(yy)``
(docs/design.md, "The optimizers SGD-G and Adam-G"):

* Riemannian gradient ``h = yy g - yg y``, ``|h|_y^2 = yy gg - yg^2`` (clamped at 0);
  clipping ``c = min(1, nu / |h|_y)`` (``nu = inf``: none);
* the momentum is made horizontal first: ``mom_h = mom - (my / yy) y``;
* SGD-G: ``d = gamma tau_h - lr c h``, ``t = |d| / r``,
  ``y <- y cos(t) + d sinc(t)``, ``tau <- d cos(t) - y t sin(t)``
  (the exact parallel transport of ``d`` along its own geodesic);
* Adam-G: ``m' = b1 m_h + (1 - b1) c h``, ``v <- b2 v + (1 - b2) c^2 |h|_y^2`` (one scalar
  per row), ``d = a m'`` with ``a = -step_size / sqrt(v + eps)``, ``t = |d| / r``,
  ``y <- y cos(t) + d sinc(t)``, ``m <- m' cos(t) - y a |m'|^2 sinc(t) / r^2``.

The new point keeps the norm of the old one, and the momentum is its lift there; a row
whose ``<y, y>`` is 1 to within ``snap(dtype)`` and that moves is written at norm exactly 1,
so that rounding does not accumulate on unit rows; a zero step leaves a row bit-identical.
Pass 1 computes the dot products; every norm above is expanded in them, so pass 2 writes
the new point and momentum as per-row linear combinations ``k0 y + k1 mom + k2 g`` and
``k3 y + k4 mom + k5 g``. The per-row scalars are float64 (float32 on MPS). Half-precision
tensors are computed in float32 and stored back; the float32 momentum is then re-projected
at the rounded point actually stored.

**Batched.** A step costs a fixed number of torch calls per *block*, not per tensor: the
tensors of one call that share device and dtypes form a *family* (Adam-G: and a step
size), and within it the tensors whose ``shape[1:]`` and row length ``n`` agree form a
block. One ``torch.cat`` along dim 0 lays a block's points, momenta and gradients out as
``X = [Y, M, G, Y]`` of shape ``(4, rows, n)`` (no view of any single tensor is needed),
one product of ``[Y, M, G]`` by the two overlapping windows ``[Y, M, G]`` and
``[M, G, Y]`` and one sum give all six dot products, the per-row scalars of the whole
family are computed once, the new rows are ``sum_i K[:, i] X[i]``, and one ``split`` per
block plus one ``torch._foreach_copy_`` per family write them back in place (strided
tensors included). On ResNet-18's 20 conv weights a step of SGDG / AdamG, guard included,
issues 10.8 / 13.9 top-level aten ops per tensor (was ~150); a block's temporaries are
about 10 times its size, so a block is closed before it exceeds :data:`BLOCK_CAP` elements
and a larger tensor is cut into views of consecutive rows that fit (docs/design.md, "The
fused kernels").

The optimizers' step guard has refused zero, non-finite and out-of-range rows before this
runs; a row whose ``<y, y>`` is not positive and finite or whose gradient is not finite is
still left unchanged and flagged, so that no NaN is ever written.

>>> y = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
>>> g = torch.tensor([[0.0, -0.125]], dtype=torch.float64)
>>> tau = torch.zeros_like(y)
>>> bad = sgdg_rows_(y, g, tau, lr=0.5, momentum=0.9)  # h = <y,y> g, d = (0, 0.25), t = 0.125
>>> torch.allclose(y, 2 * torch.tensor([[math.cos(0.125), math.sin(0.125)]], dtype=torch.float64))
True
>>> bool(bad.any())
False
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ...manifold import sinc

__all__ = ["adamg_many_", "adamg_rows_", "first_bad_rows", "sgdg_many_", "sgdg_rows_", "snap"]

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def snap(dtype: torch.dtype) -> float:
    """Tolerance on ``|<y, y> - 1|`` under which a row is written back at norm 1:
    ``sqrt(eps)`` of the parameter's dtype (float32: 3.5e-4, float64: 1.5e-8)."""
    return math.sqrt(torch.finfo(dtype).eps)


def _scalar_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ------------------------------------------------------------------ layout
#: The most elements one block lays out, per device type (others: ``"cuda"``'s). A block's
#: temporaries are about 10 times its size: on CPU a cap of 2^20 elements keeps every one
#: of them under glibc's 32 MB threshold above which each allocation is mapped afresh (and
#: page-faulted) every step; on a GPU 2^23 bounds them to about 10 x 32 MiB in float32.
#: A tensor larger than the cap is cut into pieces of whole rows (:func:`_pieces`).
BLOCK_CAP = {"cpu": 1 << 20, "cuda": 1 << 23}


def _cap(t: torch.Tensor) -> int:
    return BLOCK_CAP.get(t.device.type, BLOCK_CAP["cuda"])


def _piece_slices(y: torch.Tensor, n: int, per_row: Sequence[torch.Tensor]) -> int | None:
    """Slices along dim 0 per piece when ``y`` (rows of ``n`` elements) is larger than
    :data:`BLOCK_CAP` and can be cut into views of whole rows of at most that size (at
    least one row each), or None. A piece is ``step`` dim-0 slices, a multiple of
    ``n / gcd(inner, n)`` (``inner`` elements per slice) so that it holds whole rows; every
    tensor of ``per_row`` (one value per row) must be viewable as a vector to be cut."""
    cap = _cap(y)
    if y.numel() <= cap or y.dim() == 0 or n <= 0:
        return None
    inner = y.numel() // y.shape[0]
    unit = n // math.gcd(inner, n)
    step = max(unit, cap // inner // unit * unit)
    if step >= y.shape[0] or any(v is not None and not v.is_contiguous() for v in per_row):
        return None
    return step


def _pieces(ys, ns, alike=(), per_row=(), repeat=()):
    """The inputs of a batched call with every tensor larger than :data:`BLOCK_CAP` replaced
    by views of its consecutive rows (:func:`_piece_slices`), so that no block outgrows the
    cap: ``ys`` and each list of ``alike`` are cut along dim 0, each list of ``per_row``
    (one value per row) as a vector, each list of ``repeat`` repeats its entry. Returns
    ``(ys, ns, alike, per_row, repeat, origin)``, ``origin[k] = (i, first row)`` of piece
    ``k``. A step writes into the views, so nothing is copied back."""
    out_y, out_n, origin = [], [], []
    out_alike = [[] for _ in alike]
    out_rows = [[] for _ in per_row]
    out_rep = [[] for _ in repeat]
    sources, targets = (*alike, *per_row, *repeat), (*out_alike, *out_rows, *out_rep)
    for i, (y, n) in enumerate(zip(ys, ns, strict=True)):
        step = _piece_slices(y, n, [lst[i] for lst in per_row])
        if step is None:
            out_y.append(y)
            out_n.append(n)
            origin.append((i, 0))
            for src, dst in zip(sources, targets, strict=True):
                dst.append(src[i])
            continue
        pieces = y.split(step)
        rows_per_piece = step * (y.numel() // y.shape[0]) // n
        out_y += pieces
        out_n += [n] * len(pieces)
        origin += [(i, k * rows_per_piece) for k in range(len(pieces))]
        for src, dst in zip(alike, out_alike, strict=True):
            dst += [None] * len(pieces) if src[i] is None else src[i].split(step)
        for src, dst in zip(per_row, out_rows, strict=True):
            dst += src[i].view(-1).split(rows_per_piece)
        for src, dst in zip(repeat, out_rep, strict=True):
            dst += [src[i]] * len(pieces)
    return out_y, out_n, out_alike, out_rows, out_rep, origin


def _families(ys, ns, family, block) -> dict[tuple, dict[tuple, list[int]]]:
    """Indices of the non-empty tensors, by family key ``family(i)`` then block key
    ``(shape[1:], n, *block(i), chunk)``: tensors keep their order, and a block is closed
    (``chunk + 1``) before it would exceed :data:`BLOCK_CAP` elements."""
    out: dict[tuple, dict[tuple, list[int]]] = {}
    filled: dict[tuple, tuple[int, int]] = {}  # (family, key) -> (chunk, elements in it)
    for i, (y, n) in enumerate(zip(ys, ns, strict=True)):
        if n == 0 or y.numel() // n == 0:
            continue
        fam, key = family(i), (y.shape[1:], n, *block(i))
        cap = _cap(y)
        chunk, size = filled.get((fam, key), (0, 0))
        if size and size + y.numel() > cap:
            chunk, size = chunk + 1, 0
        filled[(fam, key)] = (chunk, size + y.numel())
        out.setdefault(fam, {}).setdefault((*key, chunk), []).append(i)
    return out


class _Block:
    """One block of a family: ``X = cat(parts)`` viewed as ``(len(parts), rows, n)`` in the
    working dtype, and what is needed to cut results back into the tensors."""

    def __init__(self, parts: Sequence[Sequence[torch.Tensor]], n: int) -> None:
        self.first = [t.shape[0] for t in parts[0]]
        self.trail = parts[0][0].shape[1:]
        x = torch.cat([t for part in parts for t in part])
        self.rows = x.numel() // (len(parts) * n)
        # reshape, not view: cat keeps a shared memory format (channels_last in, out)
        x = x.reshape(len(parts), self.rows, n)
        self.x = x.float() if x.dtype in _HALF else x

    def dots(self) -> torch.Tensor:
        """``(2, c, rows)`` with ``c = len(parts) - 1``: ``<X[i], X[i]>`` and
        ``<X[i], X[i + 1]>`` per row, summed in the working dtype (the guard keeps every
        such sum finite)."""
        c, rows, n = self.x.shape[0] - 1, self.rows, self.x.shape[2]
        self.win = self.x.as_strided((2, c, rows, n), (rows * n, rows * n, n, 1))
        self.head = self.win[:1]
        return (self.head * self.win).sum(-1)

    def combine(self, k: torch.Tensor) -> torch.Tensor:
        """``sum_i k[j, i] X[i]`` for every output ``j`` of ``k`` (``(outputs, c, rows, 1)``),
        summed in the order of ``X`` (point, momentum, gradient), as the C kernel."""
        return (k * self.head).sum(1)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(outputs, rows, n)`` results cut into per-tensor chunks, outputs one after
        the other, each chunk shaped like its tensor."""
        outputs = rows.shape[0]
        return rows.view(outputs * sum(self.first), *self.trail).split(self.first * outputs)


# ---------------------------------------------------------- per-row scalars
def _bad(yy, yg, gg) -> torch.Tensor:
    """Rows the kernel leaves unchanged: ``<y, y>`` not positive and finite, or a
    non-finite gradient."""
    return ~((yy > 0) & torch.isfinite(yy) & torch.isfinite(yg) & torch.isfinite(gg))


def _clip(yy, yg, gg, nu: float):
    """``(|h|_y^2, c)``: ``max(yy gg - yg^2, 0)`` and ``min(1, nu / |h|_y)`` (a Python 1.0
    without clipping)."""
    hn2 = (yy * gg - yg * yg).clamp_min(0)
    if math.isinf(nu):
        return hn2, 1.0
    hn = hn2.sqrt()
    return hn2, torch.where(hn > nu, nu / torch.where(hn > nu, hn, 1), 1)


def _step_coefficients(yy, a, p, q, r, mm2, tol: float, with_mom: bool) -> torch.Tensor:
    """Pass-2 coefficients of a step along ``d = a mom'``, ``mom' = p y + q mom + r g``,
    ``mm2 = |mom'|^2``, in the order of the C kernel's expressions: ``(k0, k1, k2)`` of
    the new point, ``(k3, k4, k5)`` of ``mom'`` transported, as ``(2, 3, rows)`` (SGD-G:
    ``mom' = d``, ``a = 1``; without momentum only ``(k0, k2)``, as ``(1, 2, rows)``). ``a``
    and ``q`` may be Python floats."""
    unit = isinstance(a, float) and a == 1.0
    t = (mm2 / yy if unit else a * a * mm2 / yy).sqrt()
    co, si = torch.cos(t), sinc(t)
    s = torch.where((t > 0) & ((yy - 1).abs() <= tol), yy.rsqrt(), 1)
    ap, ar = (p, r) if unit else (a * p, a * r)
    k0 = (co + ap * si) * s
    k2 = ar * si * s
    if not with_mom:
        return torch.stack([k0, k2]).view(1, 2, -1)
    k1 = (q if unit else a * q) * si * s
    k3 = (p * co - (mm2 if unit else a * mm2) * si / yy) * s
    k = [k0, k1, k2, k3, q * co * s, r * co * s]
    return torch.stack(k).view(2, 3, -1)


def _horizontal2(mm, my, pm):
    """``|mom_h|^2 = mm - my (my / yy)``, clamped at 0."""
    return (mm - my * pm).clamp_min(0)


def _sgdg_coefficients(d, momentum, lr, nu, tol):
    """``(k, bad)`` from the dots ``d`` of :meth:`_Block.dots` (float64)."""
    if momentum is None:  # X = [Y, G, Y]: yy, gg; yg, gy
        yy, gg, yg, _ = d.unbind(0)
        mm = my = mg = None
    else:  # X = [Y, M, G, Y]: yy, mm, gg; my, mg, gy
        yy, mm, gg, my, mg, yg = d.unbind(0)
    bad = _bad(yy, yg, gg)
    hn2, c = _clip(yy, yg, gg, nu)
    lc = lr * c
    if momentum is None:
        dd = (lc * lc) * yy * hn2
        return _step_coefficients(yy, 1.0, lc * yg, 0.0, -lc * yy, dd.clamp_min(0), tol, False), bad
    gamma = momentum
    pm = my / yy  # radial part of tau, removed: tau_h = tau - pm y
    th = yy * mg - yg * my  # <tau, h> = <tau_h, h>
    dd = (gamma * gamma) * _horizontal2(mm, my, pm) + (lc * lc) * yy * hn2 - (2 * gamma * lc) * th
    p = lc * yg - gamma * pm
    return _step_coefficients(yy, 1.0, p, gamma, -lc * yy, dd.clamp_min(0), tol, True), bad


def _adamg_coefficients(d, v_old, v_dtype, beta1, beta2, eps, step_size, nu, tol):
    """``(k, bad, v_new)`` from the dots ``d`` (float64) and the old second moments; the
    new ``v`` is rounded to ``v_dtype`` and the stored value is the one the step uses."""
    yy, mm, gg, my, mg, yg = d.unbind(0)
    bad = _bad(yy, yg, gg)
    hn2, c = _clip(yy, yg, gg, nu)
    v_new = beta2 * v_old + (1 - beta2) * c * c * hn2
    if v_new.dtype != v_dtype:
        v_new = v_new.to(v_dtype)
    v_use = v_new if v_new.dtype == yy.dtype else v_new.to(yy.dtype)
    w = (1 - beta1) * c
    pm = my / yy  # radial part of m, removed
    mh = yy * mg - yg * my  # <m, h> = <m_h, h>
    mm2 = (beta1 * beta1) * _horizontal2(mm, my, pm) + (w * w) * yy * hn2 + (2 * beta1 * w) * mh
    mm2 = mm2.clamp_min(0)
    a = torch.where(mm2 > 0, -step_size / (v_use + eps).sqrt(), 0)
    k = _step_coefficients(yy, a, -w * yg - beta1 * pm, beta1, w * yy, mm2, tol, True)
    return k, bad, v_new


# ------------------------------------------------------------------ the steps
def _gather(blocks, tensor_lists, parts_of) -> list[tuple[list[int], _Block]]:
    return [
        (idx, _Block([[lst[i] for i in idx] for lst in parts_of(tensor_lists)], n))
        for (_, n, *_), idx in blocks.items()
    ]


def _dots(laid: list[tuple[list[int], _Block]]) -> torch.Tensor:
    """The dots of every block, rows one block after the other, as per-row scalars."""
    dots = [block.dots() for _, block in laid]
    d = dots[0] if len(dots) == 1 else torch.cat(dots, dim=2)
    if d.dtype != _scalar_dtype(d.device):
        d = d.to(_scalar_dtype(d.device))
    return d.view(d.shape[0] * d.shape[1], -1)


def _write(laid, k, bad, targets, extra=None) -> bool:
    """Write ``sum_i k[j, i] X[i]`` into ``targets[j][i]`` for every block (bad rows keep
    their values); ``extra``: ``(new, old, tensors)``, one more per-row quantity (Adam-G's
    ``v``, laid out by :func:`_cat_rows`). Returns whether a row was left unchanged."""
    keep = bool(bad.any())
    rows = [block.rows for _, block in laid]
    if k.dtype != laid[0][1].x.dtype:
        k = k.to(laid[0][1].x.dtype)
    ks = (k,) if len(laid) == 1 else k.split(rows, dim=2)
    bads = (bad,) if len(laid) == 1 else bad.split(rows)
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for (idx, block), kb, bb in zip(laid, ks, bads, strict=True):
        new = block.combine(kb.unsqueeze(-1))
        outputs = new.shape[0]
        if new.dtype != targets[0][idx[0]].dtype:  # half: store the rounded point
            new = _reproject(new, targets[0][idx[0]].dtype, bb)
        if keep:
            new = torch.where(bb.view(-1, 1), block.x[:outputs], new)
        src += block.split(new)
        for j in range(outputs):
            dst += [targets[j][i] for i in idx]
    if extra is not None:
        new, old, tensors = extra
        if keep:
            new = torch.where(bad, old, new)
        dst += tensors
        src += _cut_rows(new, tensors)
    torch._foreach_copy_(dst, src)
    return keep


def _reproject(new: torch.Tensor, dtype: torch.dtype, bad: torch.Tensor) -> torch.Tensor:
    """``[new point, new momentum]`` with the point rounded to ``dtype`` (as stored) and the
    float32 momentum projected onto its horizontal space there,
    ``mom - <ys, mom> / <ys, ys> ys``, so that it stays tangent."""
    if new.shape[0] == 1:
        return new
    ys = new[0].to(dtype).to(new.dtype)
    d = (ys * torch.stack([new[1], ys])).sum(-1).to(_scalar_dtype(new.device))
    coef = (d[0] / torch.where(bad, 1, d[1])).to(new.dtype)
    return torch.stack([ys, new[1] - coef.unsqueeze(-1) * ys])


def sgdg_many_(
    ys: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    taus: Sequence[torch.Tensor | None],
    ns: Sequence[int],
    *,
    lr: float,
    momentum: float,
    nu: float = math.inf,
) -> bool:
    """One SGD-G step of every ``(ys[i], gs[i], taus[i])`` (points of G(1, ns[i]) in rows,
    ``taus[i]`` None without momentum), in place, batched (module docstring); returns
    whether some row was left unchanged."""
    ys, ns, (gs, taus), _, _, _ = _pieces(ys, ns, alike=(gs, taus))
    fams = _families(
        ys, ns, lambda i: (ys[i].device, ys[i].dtype, gs[i].dtype, _dtype(taus[i])), _none
    )
    any_bad = False
    for (_, dtype, _, tau_dtype), blocks in fams.items():
        with_tau = tau_dtype is not None
        parts = _point_tau_grad if with_tau else _point_grad
        laid = _gather(blocks, (ys, gs, taus), parts)
        k, bad = _sgdg_coefficients(
            _dots(laid), momentum if with_tau else None, lr, nu, snap(dtype)
        )
        any_bad |= _write(laid, k, bad, (ys, taus))
    return any_bad


def adamg_many_(
    ys: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    ns: Sequence[int],
    step_sizes: Sequence[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    nu: float = math.inf,
) -> bool:
    """One Adam-G step of every ``(ys[i], gs[i], ms[i], vs[i])`` (``vs[i]``: one second
    moment per row, any shape) with ``step_sizes[i] = lr sqrt(1 - beta2^k) / (1 - beta1^k)``,
    in place, batched (module docstring); returns whether some row was left unchanged."""

    ys, ns, (gs, ms), (vs,), (step_sizes,), _ = _pieces(
        ys, ns, alike=(gs, ms), per_row=(vs,), repeat=(step_sizes,)
    )

    def family(i):
        t = (ys[i], gs[i], ms[i], vs[i])
        return (ys[i].device, *(x.dtype for x in t), step_sizes[i])

    fams = _families(ys, ns, family, _none)
    any_bad = False
    for (_, dtype, _, _, v_dtype, step_size), blocks in fams.items():
        laid = _gather(blocks, (ys, gs, ms), _point_tau_grad)
        v_list = [vs[i] for idx, _ in laid for i in idx]
        v_old = _cat_rows(v_list)
        d = _dots(laid)
        v_work = v_old if v_old.dtype == d.dtype else v_old.to(d.dtype)
        k, bad, v_new = _adamg_coefficients(
            d, v_work, v_dtype, beta1, beta2, eps, step_size, nu, snap(dtype)
        )
        any_bad |= _write(laid, k, bad, (ys, ms), (v_new, v_old, v_list))
    return any_bad


def _uniform(vs: list[torch.Tensor]) -> bool:
    """Whether ``torch.cat(vs)`` is defined and lays ``vs`` out one after the other."""
    trail = vs[0].shape[1:]
    return all(v.dim() > 0 and v.shape[1:] == trail for v in vs)


def _cat_rows(vs: list[torch.Tensor]) -> torch.Tensor:
    """The per-row second moments of ``vs``, one tensor after the other, as one vector."""
    if _uniform(vs):
        return torch.cat(vs).view(-1)
    return torch.cat([v.reshape(-1) for v in vs])


def _cut_rows(flat: torch.Tensor, vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of :func:`_cat_rows`: ``flat`` cut into chunks shaped like ``vs``."""
    if _uniform(vs):
        return flat.view(-1, *vs[0].shape[1:]).split([v.shape[0] for v in vs])
    chunks = flat.split([v.numel() for v in vs])
    return [c.view(v.shape) for c, v in zip(chunks, vs, strict=True)]


def _point_tau_grad(t):  # X = [Y, M, G, Y]
    return t[0], t[2], t[1], t[0]


def _point_grad(t):  # X = [Y, G, Y]
    return t[0], t[1], t[0]


def _none(i: int) -> tuple:
    return ()


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


# ------------------------------------------------------- one matrix at a time
def sgdg_rows_(y, g, tau, *, lr: float, momentum: float, nu: float = math.inf) -> torch.Tensor:
    """One SGD-G step on every row of the ``(rows, n)`` matrix ``y`` (and ``tau``, None
    without momentum), in place; returns the ``(rows, 1)`` mask of rows left unchanged."""
    unchanged = _unchanged(y, g)
    sgdg_many_([y], [g], [tau], [y.shape[-1]], lr=lr, momentum=momentum, nu=nu)
    return unchanged


def adamg_rows_(
    y, g, m, v, *, step_size: float, beta1: float, beta2: float, eps: float, nu: float = math.inf
) -> torch.Tensor:
    """One Adam-G step on every row of ``y``, ``m`` and ``v`` (one second moment per row,
    ``rows`` elements), in place; returns the mask of rows left unchanged.
    ``step_size = lr sqrt(1 - beta2^k) / (1 - beta1^k)`` at step ``k``. The new ``v`` is
    stored in ``v``'s dtype and the stored value is the one the step uses."""
    unchanged = _unchanged(y, g)
    adamg_many_(
        [y], [g], [m], [v], [y.shape[-1]], [step_size], beta1=beta1, beta2=beta2, eps=eps, nu=nu
    )
    return unchanged


def _unchanged(y, g) -> torch.Tensor:
    """The ``(rows, 1)`` mask of rows a step leaves unchanged (:func:`_bad`)."""
    yw = y.float() if y.dtype in _HALF else y
    gw = g.float() if g.dtype in _HALF else g
    yy, yg, gg = ((a * b).sum(-1, keepdim=True) for a, b in ((yw, yw), (yw, gw), (gw, gw)))
    return _bad(yy, yg, gg)


# ---------------------------------------------------------------- the guard
def first_bad_rows(
    ys: Sequence[torch.Tensor],
    gs: Sequence[torch.Tensor],
    ns: Sequence[int],
    limits: Callable[[torch.dtype], tuple[float, float, float]],
) -> list[tuple[int, int]]:
    """Per tensor, ``(first row with a bad point, first row with a bad gradient)`` (-1:
    none): a row is accepted when ``lo2 <= <y,y> <= hi2``, ``<g,g> <= hi2`` and
    ``<g,g> <y,y>^2 <= glim2`` with ``(lo2, hi2, glim2) = limits(dtype)``. Batched like the
    steps: one ``cat``, product and sum per block, one test and one synchronization per
    family; a family with a bad row is then searched tensor by tensor."""
    out = [(-1, -1)] * len(ys)
    ys, ns, (gs,), _, _, origin = _pieces(ys, ns, alike=(gs,))
    fams = _families(ys, ns, lambda i: (ys[i].device, ys[i].dtype, gs[i].dtype), _none)
    for (_, dtype, _), blocks in fams.items():
        laid = _gather(blocks, (ys, gs), lambda t: (t[0], t[1]))
        sq = [block.x.square_().sum(-1) for _, block in laid]  # x is a private copy
        d = sq[0] if len(sq) == 1 else torch.cat(sq, dim=1)
        if d.dtype != _scalar_dtype(d.device):
            d = d.to(_scalar_dtype(d.device))
        lo2, hi2, glim2 = limits(dtype)
        yy, gg = d.unbind(0)
        ok = (yy >= lo2) & (yy <= hi2) & (gg <= hi2) & (gg * yy * yy <= glim2)
        if bool(ok.all()):
            continue
        for idx, _ in laid:
            for k in idx:  # a piece: its tensor's first bad rows are the smallest found
                i, first = origin[k]
                found = _first_bad(ys[k], gs[k], ns[k], limits(dtype))
                out[i] = tuple(
                    (r + first if r >= 0 and (o < 0 or r + first < o) else o)
                    for r, o in zip(found, out[i], strict=True)
                )
    return out


def _first_bad(y, g, n, limits) -> tuple[int, int]:
    lo2, hi2, glim2 = limits
    yw, gw = (t.reshape(-1, n) for t in (y, g))
    yw, gw = (t.float() if t.dtype in _HALF else t for t in (yw, gw))
    yy = (yw * yw).sum(-1).to(_scalar_dtype(y.device))
    gg = (gw * gw).sum(-1).to(yy.dtype)
    bad_point = ~((yy >= lo2) & (yy <= hi2))
    bad_grad = ~((gg <= hi2) & (gg * yy * yy <= glim2))
    return tuple(int(m.nonzero()[0, 0]) if bool(m.any()) else -1 for m in (bad_point, bad_grad))
