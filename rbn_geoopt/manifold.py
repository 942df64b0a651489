r"""The Grassmann manifold G(1, n) of lines through the origin, for geoopt.

A point is the class ``[y] = {a * y : a != 0}`` of a non-zero vector ``y``; every operator
below accepts ANY non-zero representative and is invariant under ``y -> a * y``. With
``r = |y|``, ``yh = y / r`` and ``<a, b>`` the sum over the point dimensions:

==========================  ===========================================================
horizontal space at ``y``   ``{v : <y, v> = 0}``
``inner(y, u, v)``          ``<u, v> / <y, y>``
``proju(y, v)``             ``v - <y, v> / <y, y> * y``
``egrad2rgrad(y, g)``       ``<y, y> * proju(y, g)``
``projx(y)``                ``yh``
``expmap(y, u)``            ``yh cos(t) + u / |u| sin(t)``, ``t = |u| / r`` (unit result)
``transp_follow_expmap``    ``(v + <e, v> ((cos(t) - 1) e - sin(t) yh)) / r``, ``e = u / |u|``
``dist(x, y)``              ``2 atan2(|xh - s yh|, |xh + s yh|)``, ``s = sign(<x, y>)``
==========================  ===========================================================

Scale: each operator first brings every point, and every tangent vector whose length it
needs, to order 1 by a power of two per point (exact), so any finite non-zero
representative works, subnormal entries and entries near the largest float included, and
every operator is exactly scale covariant (bit-identical results for power-of-two scales).
Results are exact to a few ulps wherever they are floats themselves; a tangent vector whose
metric length ``|u| / r`` is beyond the float range gives ``norm = inf`` and NaN steps,
never a finite wrong value (docs/design.md, "The manifold Grassmann1", *Numerics*).
``u / |u|`` is taken as 0 at ``u = 0``, so zero steps and vectors are exact and finite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from geoopt import ManifoldTensor, Scaled
from geoopt.manifolds.base import Manifold
from geoopt.utils import size2shape

__all__ = ["Grassmann1", "Grassmann1Blocks", "grassmann1_of", "is_grassmann1", "sinc"]

_HALF = (torch.float16, torch.bfloat16)
# largest entries for which <a, a> is computed unscaled (no overflow for any point size below
# 2^48, no underflow of the largest square); outside, points are scaled by powers of two
_BAND = {torch.float32: (2.0**-40, 2.0**40), torch.float64: (2.0**-400, 2.0**400)}


def _mul(t: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    return t if k is None else t * k


def _div(t: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
    return t if k is None else t / k


def _in_float32(fn: Callable) -> Callable:
    """Compute ``fn`` in float32 when any tensor argument is half precision, cast back."""

    @functools.wraps(fn)
    def wrapper(self: Grassmann1, *args: Any, **kwargs: Any) -> Any:
        dtype = next(
            (a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in _HALF), None
        )
        if dtype is None:
            return fn(self, *args, **kwargs)
        args = tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
        out = fn(self, *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(dtype) for o in out)
        return out.to(dtype)

    return wrapper


def _two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)`` with ``p = fl(a * b)`` and ``p + e == a * b`` exactly (Dekker/Veltkamp split)."""
    p = a * b
    c = 134217729.0 if p.dtype == torch.float64 else 4097.0  # 2^27 + 1, 2^12 + 1

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ct = c * t
        hi = ct - (ct - t)
        return hi, t - hi

    (ah, al), (bh, bl) = split(a), split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, torch.where(torch.isfinite(e), e, torch.zeros_like(e))  # c * t overflowed


def sinc(t: torch.Tensor) -> torch.Tensor:
    """``sin(t) / t`` with the value 1 at ``t = 0``.

    ``sin(t) / t`` on the very ``t`` that ``cos(t)`` sees (``torch.sinc(t / pi)`` rounds
    ``t / pi``, which breaks ``cos^2 + (t sinc)^2 = 1`` in float32 at large ``t``), and the
    series ``1 - t^2/6 + t^4/120`` below ``|t| = 1e-2`` (error below ``t^6/5040``).
    """
    small = t.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(t), t)
    t2 = t * t
    return torch.where(small, 1 - t2 / 6 * (1 - t2 / 20), torch.sin(safe) / safe)


class Grassmann1(Manifold):
    r"""G(1, n), the real projective space of lines ``[y]`` through the origin of R^n.

    The trailing ``ndim`` dimensions of a tensor form one point: a linear weight
    ``(out, in)`` is ``out`` points of G(1, in) with ``Grassmann1()``, a conv weight
    ``(out, in, kh, kw)`` is ``out`` points of G(1, in*kh*kw) with ``Grassmann1(ndim=3)``.
    Any finite non-zero vector is a valid representative, at any scale the dtype holds
    (float32 rows of norm 1e-30 or 1e20 work like unit rows); the metric is the paper's
    ``g_y(u, v) = <u, v> / <y, y>`` on the horizontal space ``<y, v> = 0``, which makes
    every operator invariant under ``y -> a y`` (``a != 0``). ``expmap`` is the retraction
    (exact, returns the unit representative) and ``transp_follow_expmap`` is exact parallel
    transport, so ``retr_transp(retr_transp(x, u, v), -u', v')`` walks back exactly
    (``reversible = True``).

    Parameters
    ----------
    ndim : int
        number of trailing dimensions that form one point (default 1).

    Examples
    --------
    >>> import torch, geoopt
    >>> from rbn_geoopt import Grassmann1
    >>> w = geoopt.ManifoldParameter(torch.randn(16, 3, 3, 3), manifold=Grassmann1(ndim=3))
    >>> Grassmann1(ndim=3).dist(w, -2.0 * w).abs().max().item()
    0.0
    >>> tiny = torch.tensor([[3e-30, 4e-30]])
    >>> Grassmann1().projx(tiny), Grassmann1().norm(tiny, torch.tensor([[-4e-30, 3e-30]]))
    (tensor([[0.6000, 0.8000]]), tensor([1.]))
    """

    name = "Grassmann1"
    reversible = True

    def __init__(self, ndim: int = 1) -> None:
        if isinstance(ndim, bool) or not isinstance(ndim, int):
            raise TypeError(f"Grassmann1: ndim must be an int, got {type(ndim).__name__}")
        if ndim < 1:
            raise ValueError(f"Grassmann1: ndim must be >= 1, got {ndim}")
        super().__init__()
        self.ndim = ndim
        self._dims = tuple(range(-ndim, 0))

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}"

    # ----------------------------------------------------------- point layout
    # The one description of where the points of a tensor lie, read by the optimizers, their
    # guard and kernels, the orthogonality term and the diagnostics: a tensor of ``shape`` is
    # ``point_view(t)``, a ``(points, n)`` matrix with one point per row.
    def point_size(self, shape: tuple[int, ...]) -> int:
        """``n``, the number of entries of one point of a tensor of ``shape``.

        >>> Grassmann1(ndim=3).point_size((16, 3, 3, 3))
        27
        """
        return math.prod(shape[len(shape) - self.ndim :])

    def point_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a ``(points, n)`` matrix, one point per row (a view when ``t`` is
        contiguous).

        >>> Grassmann1(ndim=3).point_view(torch.zeros(16, 3, 3, 3)).shape
        torch.Size([16, 27])
        """
        return t.reshape(-1, self.point_size(t.shape))

    def point_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one scalar per point with the point dims kept (``keepdim=True``):
        ``(*batch, 1, ..., 1)``.

        >>> Grassmann1(ndim=3).point_shape((16, 3, 3, 3))
        (16, 1, 1, 1)
        """
        return tuple(shape[: len(shape) - self.ndim]) + (1,) * self.ndim

    def per_entry(self, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A per-point ``value`` (shaped :meth:`point_shape`) made to broadcast against a
        tensor of ``shape`` (here: as it is)."""
        return value

    def point_label(self, index: int, shape: tuple[int, ...]) -> str:
        """How messages name point ``index`` (a row of :meth:`point_view`).

        >>> Grassmann1().point_label(3, (8, 4))
        'row 3'
        """
        return f"row {index}"

    # ----------------------------------------------------------------- helpers
    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``<a, b>`` over the point dimensions, kept as size-1 dims for broadcasting."""
        return (a * b).sum(dim=self._dims, keepdim=True)

    def _norm(self, a: torch.Tensor) -> torch.Tensor:
        """Euclidean ``|a|`` over the point dimensions, kept as size-1 dims (unscaled: only
        for tensors whose largest entry is of order 1)."""
        return torch.linalg.vector_norm(a, dim=self._dims, keepdim=True)

    def _squeeze(self, t: torch.Tensor, keepdim: bool) -> torch.Tensor:
        return t if keepdim else t.squeeze(self._dims) if t.dim() >= self.ndim else t

    def _pow2(self, a: torch.Tensor) -> torch.Tensor | None:
        """Per point, the power of two ``k`` with ``max |k a|`` in ``[1, 2)``, or None for
        ``k = 1`` when no point of a CPU tensor needs one.

        ``k`` is clamped to ``[tiny, 1 / tiny]`` (a normal number, so ``k a`` and ``b / k``
        are exact); a row whose largest entry is below ``tiny`` (subnormal) or zero gets
        ``k = 2^126`` (float32) and ``max |k a| < 1``. Either way ``<k a, k a>`` neither
        overflows nor underflows, which is what every operator needs. Scaling by a power of
        two commutes with rounding, so when every largest entry lies in ``_BAND`` (where
        ``<a, a>`` is safe unscaled) ``k = 1`` gives the same floats and saves the scaled
        copies; that test is only made on the CPU, where reading it back costs nothing.
        """
        a = a.detach()
        m = torch.maximum(
            a.amax(dim=self._dims, keepdim=True), a.amin(dim=self._dims, keepdim=True).neg_()
        )
        if a.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = _BAND[a.dtype]
            if m.numel() == 0:
                return None
            smallest, largest = torch.aminmax(m)
            if lo <= smallest.item() and largest.item() <= hi:  # False for NaN
                return None
        tiny = torch.finfo(a.dtype).tiny
        m = m.clamp_min(tiny)
        return (2 * torch.frexp(m).mantissa / m).clamp_min(tiny)  # 2^(1 - e), m = f 2^e

    def _scaled(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(k a, |k a|, k)`` with ``k`` from ``_pow2``: ``|a| = |k a| / k`` without forming
        ``|a|``, which may lie outside the float range."""
        k = self._pow2(a)
        scaled = _mul(a, k)
        return scaled, self._norm(scaled), k

    def _point(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(xh, rs, k)`` of a point: ``xh = x / |x|``, ``|x| = rs / k``. A zero row gives
        NaN (it is no point)."""
        xs, rs, k = self._scaled(x)
        return xs / rs, rs, k

    def _direction(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(e, ru, ku)`` of a tangent vector: ``e = u / |u|`` (0 where ``u = 0``),
        ``|u| = ru / ku``."""
        us, ru, ku = self._scaled(u)
        return us / torch.where(ru > 0, ru, 1), ru, ku

    @staticmethod
    def _times_ratio(
        a: torch.Tensor, num: torch.Tensor | None, den: torch.Tensor | None
    ) -> torch.Tensor:
        """``a * num / den`` for powers of two ``num``, ``den`` in the normal range (None:
        1), exact whenever the result is: ``num / den`` is formed first when it is
        representable (both on the same side of 1), else the two factors move ``a`` the same
        way in turn."""
        if num is None or den is None:
            return _div(_mul(a, num), den)
        same = (num >= 1) == (den >= 1)
        return torch.where(same, a * (num / den), a * num / den)

    def _metric_length(
        self, rs: torch.Tensor, k: torch.Tensor | None, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e, t)`` for a tangent ``u`` at the point ``(rs, k)``: ``e = u / |u|`` (0 where
        ``u = 0``) and ``t = |u| / |x|``, the metric length."""
        e, ru, ku = self._direction(u)
        return e, self._times_ratio(ru / rs, k, ku)

    def _follow(
        self,
        xh: torch.Tensor,
        e: torch.Tensor,
        t: torch.Tensor,
        sin: torch.Tensor,
        vt: torch.Tensor,
    ) -> torch.Tensor:
        """Parallel transport of ``vt`` (at the unit point ``xh``) along the great circle
        ``xh cos(s) + e sin(s)`` to ``s = t``: ``vt + <e, vt> ((cos t - 1) e - sin t xh)``,
        with ``cos t - 1 = -2 sin(t/2)^2`` (no cancellation)."""
        ev = self._dot(e, vt)
        half = torch.sin(t / 2)
        moved = torch.addcmul(vt, e, ev * (-2 * half * half))
        return torch.addcmul(moved, xh, ev * -sin)

    # ------------------------------------------------------------------ checks
    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        if len(shape) < self.ndim:
            return False, (
                f"`{name}` has {len(shape)} dimension(s) but Grassmann1(ndim={self.ndim}) "
                f"needs at least {self.ndim} (the trailing {self.ndim} form one point)"
            )
        size = math.prod(shape[len(shape) - self.ndim :])
        if size < 2:
            return False, (
                f"`{name}` has points of size {size}: G(1,{size}) is a single isolated point "
                "(Manifold only consists of isolated points when subspace is 1-dimensional)"
            )
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        # the largest entry, not the norm: |x| of a finite x may underflow or overflow
        largest = x.detach().abs().amax(dim=self._dims)
        bad = ~(torch.isfinite(largest) & (largest > 0))
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            what = "zero vector" if largest[index] == 0 else "non-finite vector"
            return False, (
                f"`x` holds a {what} at batch index {index}: "
                "a point of G(1,n) must be a non-zero finite vector"
            )
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        # <xh, u> is the component of u along the line, in the units of u
        xh = self._point(x)[0]
        along = self._dot(xh, u).abs()
        _, ru, ku = self._scaled(u)
        limit = atol + rtol * _div(ru, ku)
        if not bool((along <= limit).all()):
            return False, f"`<x, u> != 0` with atol={atol}, rtol={rtol}"
        return True, None

    # ---------------------------------------------------------------- metric
    @_in_float32
    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """``g_x(u, v) = <u, v> / <x, x>``; ``v = None`` means ``v = u`` (then ``|u|_x^2``).

        Computed as ``<k u, k v> / |k x|^2`` with ``k`` the power of two that brings ``x``
        to order 1, so any representative works. Exact to a few ulps while ``|u|_x``,
        ``|v|_x`` and the result are normal floats (else inf, or an absolute error below
        ``n`` times the smallest normal float); ``v = None`` is ``norm(x, u)^2``, exact
        whenever the result is a float.
        """
        if v is None:
            inner = self.norm(x, u, keepdim=True)
            inner = inner * inner
        else:
            _, rs, k = self._scaled(x)
            inner = self._dot(_mul(u, k), _mul(v, k)) / (rs * rs)
        target = torch.broadcast_shapes(
            x.shape[: x.dim() - self.ndim] + (1,) * self.ndim, inner.shape
        )
        return self._squeeze(inner.expand(target), keepdim)

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.inner(x, u, v, keepdim=True)

    @_in_float32
    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """``|u|_x = |u| / |x|``, both norms scaled (exact whenever the result is a float).

        >>> x, u = torch.tensor([1e-30, 0.0]), torch.tensor([0.0, 2e-30])
        >>> Grassmann1().norm(x, u)
        tensor(2.)
        """
        _, rs, k = self._scaled(x)
        _, ru, ku = self._scaled(u)
        n = self._times_ratio(ru / rs, k, ku)
        target = torch.broadcast_shapes(x.shape[: x.dim() - self.ndim] + (1,) * self.ndim, n.shape)
        return self._squeeze(n.expand(target), keepdim)

    # ------------------------------------------------------------ projections
    @_in_float32
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """The canonical unit representative ``x / |x|``, for any finite non-zero ``x``.

        >>> Grassmann1().projx(torch.tensor([3e-40, 4e-40]))  # subnormal entries
        tensor([0.6000, 0.8000])
        """
        return self._point(x)[0]

    @_in_float32
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Horizontal projection ``u - <x, u> / <x, x> * x = u - <xh, u> xh``."""
        xh = self._point(x)[0]
        return torch.addcmul(u, xh, self._dot(xh, u), value=-1)

    @_in_float32
    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient ``<x, x> u - <x, u> x`` (at unit ``x``: ``u - <x, u> x``).

        Computed as ``(|k x|^2 u - <k x, u> k x) / k / k`` with ``k`` the power of two that
        brings ``x`` to order 1: the result scales as ``|x|^2 |u|`` and is exact whenever it
        is a float and ``8 n max |u|`` is one (``n`` the point size).
        """
        xs, rs, k = self._scaled(x)
        core = torch.addcmul(u * (rs * rs), xs, self._dot(xs, u), value=-1)
        return _div(_div(core, k), k)

    # ------------------------------------------------------- exponential map
    def _step(self, x: torch.Tensor, u: torch.Tensor):
        """``(xh, rs, k, e, t, cos t, sin t, y)`` of the geodesic ``expmap(x, s u)``."""
        xh, rs, k = self._point(x)
        e, t = self._metric_length(rs, k, u)
        cos, sin = torch.cos(t), torch.sin(t)
        return xh, rs, k, e, t, cos, sin, torch.addcmul(xh * cos, e, sin)

    @_in_float32
    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``xh cos(t) + e sin(t)``, ``e = u / |u|``, ``t = |u| / |x|``: a unit representative.

        >>> y = Grassmann1().expmap(torch.tensor([1e20, 0.0]), torch.tensor([0.0, 1e20]))
        >>> torch.allclose(y, torch.tensor([math.cos(1.0), math.sin(1.0)]))
        True
        """
        return self._step(x, u)[-1]

    retr = expmap

    @_in_float32
    def transp_follow_expmap(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Exact parallel transport of ``v`` along ``s -> expmap(x, s u)``, ``s in [0, 1]``.

        Expressed at the unit point ``expmap(x, u)``:
        ``(v + <e, v> ((cos t - 1) e - sin t xh)) / |x|``, ``e = u / |u|``, ``t = |u| / |x|``.
        """
        xh, rs, k, e, t, cos, sin, _ = self._step(x, u)
        return self._follow(xh, e, t, sin, _mul(v, k) / rs)

    transp_follow_retr = transp_follow_expmap

    @_in_float32
    def expmap_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expmap(x, u), transp_follow_expmap(x, u, v))`` sharing the work."""
        xh, rs, k, e, t, cos, sin, y = self._step(x, u)
        return y, self._follow(xh, e, t, sin, _mul(v, k) / rs)

    retr_transp = expmap_transp

    # -------------------------------------------------- distance and logmap
    def _angle_parts(self, x: torch.Tensor, y: torch.Tensor):
        """``(xh, rs, k, s, theta, w, ry, ky)`` for the pair ``[x], [y]``: ``|x| = rs / k``,
        ``|y| = ry / ky``, and ``w``, of length ``rs sin(theta)``, is the part of ``s y``
        orthogonal to ``x`` at the scale of ``xs = k x``.

        Both points are first brought to order 1 by powers of two (``xs = k x``,
        ``ys = ky y``, exact). ``s = sign(<x, y>)`` (``+1`` at 0) picks the nearer
        representative; ``z = s c ys`` with ``c = |xs| / |ys|`` is that representative at the
        scale of ``xs`` (the rounding error of ``c ys`` is carried exactly by ``_two_prod``;
        an error in ``c`` itself is radial and drops out of ``w``), ``d = z - xs`` is exact by
        Sterbenz for nearby points, and ``w = d - <d, xh> xh``.
        ``theta = atan2(|w|, <z, xh>)`` is the same angle as ``2 atan2(|xh - s yh|,
        |xh + s yh|)`` but keeps full relative precision for nearby points, where both forms
        beat ``acos`` of a clamped cosine.
        """
        xs, rs, k = self._scaled(x)
        xh = xs / rs
        ys, ry, ky = self._scaled(y)
        c = rs / ry
        c = torch.where(self._dot(xh, ys) < 0, -c, c)
        z, z_err = _two_prod(c, ys)
        d = (z - xs) + z_err
        w = d - self._dot(d, xh) * xh
        theta = torch.atan2(self._norm(w), self._dot(z, xh).clamp_min(0))
        return xh, rs, k, torch.sign(c), theta, w, ry, ky

    @_in_float32
    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Angle between the lines ``[x]`` and ``[y]``, in ``[0, pi/2]``.

        Equal to ``2 atan2(|xh - s yh|, |xh + s yh|)`` with ``s = sign(<x, y>)`` (``+1`` at
        0); computed from the exact difference ``s y - x`` (see ``_angle_parts``), so it stays
        exact to a few ulps for distances near 0, unlike ``acos`` of a clamped cosine.
        """
        theta = self._angle_parts(x, y)[4]
        return self._squeeze(theta, keepdim)

    @_in_float32
    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Horizontal vector at ``x`` of metric length ``dist(x, y)`` towards ``s yh``.

        ``|x| theta w / |w|`` with ``w`` the part of ``s y`` (rescaled to ``|x|``) orthogonal
        to ``x``; written as ``w / sinc(theta)`` so that it is exact at ``theta = 0``. At the
        cut locus (``<x, y> = 0``) ``s = +1`` picks one of the two minimizing geodesics.
        Scales with ``x``: finite whenever ``pi/2 |x|`` is.
        """
        _, _, k, _, theta, w, _, _ = self._angle_parts(x, y)
        return _div(w / sinc(theta), k)

    @_in_float32
    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Parallel transport of ``v`` (at ``x``) along the minimizing geodesic to ``[y]``.

        Expressed at the representative ``y`` as given: the horizontal lift at ``a y`` is
        ``a`` times the lift at ``y``, so the metric norm is preserved for any ``a != 0``.
        Computed as ``s |y| transp_follow_expmap(xh, logmap(xh, y), v / |x|)``.
        """
        xh, rs, k, s, theta, w, ry, ky = self._angle_parts(x, y)
        rw = self._norm(w)
        e = w / torch.where(rw > 0, rw, 1)  # w = 0: no move, e unused
        moved = self._follow(xh, e, theta, torch.sin(theta), _mul(v, k) / rs)
        return _div(moved * (s * ry), ky)

    # --------------------------------------------------------------- sampling
    def random_uniform(
        self, *size: int | tuple[int, ...], dtype=None, device=None
    ) -> ManifoldTensor:
        """Uniformly distributed unit representatives (normalized Gaussian vectors)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.randn(*shape, dtype=dtype, device=device)
        return ManifoldTensor(self.projx(x), manifold=self)

    random = random_uniform

    def origin(
        self, *size: int | tuple[int, ...], dtype=None, device=None, seed: int | None = 42
    ) -> ManifoldTensor:
        """The first coordinate axis ``[e_1]`` for every point (``seed`` is ignored)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.zeros(*shape, dtype=dtype, device=device)
        flat = x.view(*shape[: len(shape) - self.ndim], -1)
        flat[..., 0] = 1
        return ManifoldTensor(x, manifold=self)


class Grassmann1Blocks(Grassmann1):
    r"""Points of G(1, n) made of blocks of consecutive rows: point ``k`` of a tensor ``W``
    is ``W.reshape(points, -1)[k]``, rows ``k b .. (k + 1) b - 1`` of dim 0 jointly
    (``b = W.shape[0] / points``), ``n = W.numel() / points``.

    The weights of a layer followed by ``GroupNorm(G, C)`` are ``G`` such points, those
    followed by a LayerNorm over all channels one point (docs/design.md, "Points made of
    blocks of rows"). ``points = W.shape[0]`` gives the points of
    ``Grassmann1(ndim=W.dim() - 1)`` and ``points = 1`` those of
    ``Grassmann1(ndim=W.dim())``. Every operator is Grassmann1's, applied to the
    ``(points, n)`` view (:meth:`point_view`) and shaped back: the same exact formulas,
    scale invariant per block (``x -> a_k x`` on block ``k``, any ``a_k != 0``). Tensor
    arguments of one call must have the same shape (no broadcasting); per-point results
    (``norm``, ``inner``, ``dist``) have shape ``(points,)``, or
    ``(points, 1, ..., 1)`` with ``keepdim=True`` (:meth:`point_shape`), and
    ``component_inner`` repeats each point's value over its block. ``ndim`` is None: the
    points are not trailing dimensions.

    Parameters
    ----------
    points : int
        number of blocks dim 0 is split into (it must divide ``W.shape[0]``).

    Examples
    --------
    >>> import torch, geoopt
    >>> m = Grassmann1Blocks(2)
    >>> w = geoopt.ManifoldParameter(torch.randn(4, 3), manifold=m)
    >>> scale = torch.tensor([[2.0], [2.0], [-0.5], [-0.5]])  # one factor per block
    >>> m.dist(w, scale * w).abs().max().item(), m.norm(w, m.proju(w, torch.ones(4, 3))).shape
    (0.0, torch.Size([2]))
    >>> m.projx(w).reshape(2, -1).norm(dim=1)
    tensor([1.0000, 1.0000], grad_fn=<LinalgVectorNormBackward0>)
    """

    name = "Grassmann1Blocks"

    def __init__(self, points: int) -> None:
        if isinstance(points, bool) or not isinstance(points, int):
            raise TypeError(f"Grassmann1Blocks: points must be an int, got {type(points).__name__}")
        if points < 1:
            raise ValueError(f"Grassmann1Blocks: points must be >= 1, got {points}")
        super().__init__()
        self.ndim = None  # type: ignore[assignment]  # points are not trailing dims
        self.points = points

    def extra_repr(self) -> str:
        return f"points={self.points}"

    # ----------------------------------------------------------- point layout
    def point_size(self, shape: tuple[int, ...]) -> int:
        """``n = prod(shape) / points``.

        >>> Grassmann1Blocks(4).point_size((32, 16, 3, 3))
        1152
        """
        return math.prod(shape) // self.points

    def point_view(self, t: torch.Tensor) -> torch.Tensor:
        """``t.reshape(points, -1)``: block ``k`` of rows is row ``k``."""
        return t.reshape(self.points, -1)

    def point_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(points, 1, ..., 1)`` with ``len(shape)`` dims.

        >>> Grassmann1Blocks(4).point_shape((32, 16, 3, 3))
        (4, 1, 1, 1)
        """
        return (self.points,) + (1,) * (len(shape) - 1)

    def per_entry(self, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A per-point ``value`` (``(points, 1, ..., 1)``) repeated over each block, shaped
        ``shape``."""
        flat = value.reshape(self.points, 1).expand(self.points, self.point_size(shape))
        return flat.reshape(shape)

    def point_label(self, index: int, shape: tuple[int, ...]) -> str:
        """``point k (rows a..b)``.

        >>> Grassmann1Blocks(4).point_label(1, (32, 16))
        'point 1 (rows 8..15)'
        """
        b = shape[0] // self.points
        return f"point {index} (rows {index * b}..{(index + 1) * b - 1})"

    # ----------------------------------------------------------------- views
    def _views(self, x: torch.Tensor, *others: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The ``(points, n)`` views of ``x`` and ``others`` (None kept), which must have
        ``x``'s shape."""
        for t in others:
            if t is not None and t.shape != x.shape:
                raise ValueError(
                    f"Grassmann1Blocks: arguments must have the shape of the point "
                    f"{tuple(x.shape)}, got {tuple(t.shape)} (no broadcasting over blocks)"
                )
        return [None if t is None else self.point_view(t) for t in (x, *others)]

    def _per_point(self, x: torch.Tensor, value: torch.Tensor, keepdim: bool) -> torch.Tensor:
        """A ``(points, 1)`` result as ``(points,)`` or, kept, :meth:`point_shape`."""
        return value.reshape(self.point_shape(x.shape) if keepdim else (self.points,))

    # ------------------------------------------------------------------ checks
    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        if len(shape) < 1 or shape[0] % self.points:
            return False, (
                f"`{name}` has shape {tuple(shape)}: Grassmann1Blocks(points={self.points}) "
                f"needs a dim 0 divisible by {self.points} (each point is a block of "
                "consecutive rows)"
            )
        size = self.point_size(shape)
        if size < 2:
            return False, (
                f"`{name}` has points of size {size}: G(1,{size}) is a single isolated point"
            )
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        largest = self.point_view(x.detach()).abs().amax(dim=1)
        bad = ~(torch.isfinite(largest) & (largest > 0))
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            what = "zero vector" if largest[k] == 0 else "non-finite vector"
            return False, (
                f"`x` holds a {what} at {self.point_label(k, tuple(x.shape))}: "
                "a point of G(1,n) must be a non-zero finite vector"
            )
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        return _ROWS._check_vector_on_tangent(*self._views(x, u), atol=atol, rtol=rtol)

    # --------------------------------------- operators: Grassmann1's on the views
    def inner(self, x, u, v=None, *, keepdim=False):
        """``g_x(u, v) = <u, v> / <x, x>`` per block (:meth:`Grassmann1.inner`)."""
        return self._per_point(x, _ROWS.inner(*self._views(x, u, v), keepdim=True), keepdim)

    def component_inner(self, x, u, v=None):
        """:meth:`inner` of each point repeated over its block (shape of ``x``)."""
        return self.per_entry(self.inner(x, u, v, keepdim=True), tuple(x.shape))

    def norm(self, x, u, *, keepdim=False):
        """``|u|_x = |u| / |x|`` per block (:meth:`Grassmann1.norm`)."""
        return self._per_point(x, _ROWS.norm(*self._views(x, u), keepdim=True), keepdim)

    def projx(self, x):
        """Each block at unit norm (:meth:`Grassmann1.projx`)."""
        return _ROWS.projx(self.point_view(x)).reshape(x.shape)

    def proju(self, x, u):
        """:meth:`Grassmann1.proju` per block."""
        return _ROWS.proju(*self._views(x, u)).reshape(x.shape)

    def egrad2rgrad(self, x, u):
        """:meth:`Grassmann1.egrad2rgrad` per block."""
        return _ROWS.egrad2rgrad(*self._views(x, u)).reshape(x.shape)

    def expmap(self, x, u):
        """:meth:`Grassmann1.expmap` per block (unit blocks)."""
        return _ROWS.expmap(*self._views(x, u)).reshape(x.shape)

    retr = expmap

    def transp_follow_expmap(self, x, u, v):
        """:meth:`Grassmann1.transp_follow_expmap` per block."""
        return _ROWS.transp_follow_expmap(*self._views(x, u, v)).reshape(x.shape)

    transp_follow_retr = transp_follow_expmap

    def expmap_transp(self, x, u, v):
        """:meth:`Grassmann1.expmap_transp` per block."""
        y, w = _ROWS.expmap_transp(*self._views(x, u, v))
        return y.reshape(x.shape), w.reshape(x.shape)

    retr_transp = expmap_transp

    def dist(self, x, y, *, keepdim=False):
        """:meth:`Grassmann1.dist` per block, in ``[0, pi/2]``."""
        return self._per_point(x, _ROWS.dist(*self._views(x, y), keepdim=True), keepdim)

    def logmap(self, x, y):
        """:meth:`Grassmann1.logmap` per block."""
        return _ROWS.logmap(*self._views(x, y)).reshape(x.shape)

    def transp(self, x, y, v):
        """:meth:`Grassmann1.transp` per block."""
        return _ROWS.transp(*self._views(x, y, v)).reshape(x.shape)

    # --------------------------------------------------------------- sampling
    def random_uniform(self, *size, dtype=None, device=None) -> ManifoldTensor:
        """Uniformly distributed unit blocks (normalized Gaussian vectors)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.randn(*shape, dtype=dtype, device=device)
        return ManifoldTensor(self.projx(x), manifold=self)

    random = random_uniform

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> ManifoldTensor:
        """The first coordinate axis of every block (``seed`` is ignored)."""
        shape = size2shape(*size)
        self._assert_check_shape(shape, "x")
        x = torch.zeros(*shape, dtype=dtype, device=device)
        self.point_view(x)[:, 0] = 1
        return ManifoldTensor(x, manifold=self)


#: the row operators that Grassmann1Blocks applies to its ``(points, n)`` views
_ROWS = Grassmann1()


def grassmann1_of(obj: Manifold | torch.Tensor | None) -> Grassmann1 | None:
    """The ``Grassmann1`` (or ``Grassmann1Blocks``) behind ``obj``, ``geoopt.Scaled``
    unwrapped (any depth), or None; ``obj`` may be a ``ManifoldParameter`` /
    ``ManifoldTensor``. Its point layout (:meth:`Grassmann1.point_view`) is the
    parameter's, since ``Scaled`` changes the metric only.

    >>> grassmann1_of(Scaled(Grassmann1Blocks(2), 2.0))
    Grassmann1Blocks(points=2) manifold
    """
    if isinstance(obj, torch.Tensor):
        obj = getattr(obj, "manifold", None)
    while isinstance(obj, Scaled):
        obj = obj.base
    return obj if isinstance(obj, Grassmann1) else None


def is_grassmann1(obj: Manifold | torch.Tensor) -> bool:
    """True for ``Grassmann1``, ``geoopt.Scaled(Grassmann1(...))`` (any depth), and a
    ``ManifoldParameter`` / ``ManifoldTensor`` on one of them.

    The one test of "is this G(1, n)" that the optimizers, the model conversion and the
    orthogonality term share.

    >>> from geoopt import Sphere
    >>> is_grassmann1(Scaled(Grassmann1(), 2.0)), is_grassmann1(Sphere())
    (True, False)
    >>> is_grassmann1(Grassmann1Blocks(4))  # a sibling: points made of blocks of rows
    True
    """
    return grassmann1_of(obj) is not None
