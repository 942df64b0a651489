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

All divisions by ``|u|`` are written through ``sinc`` so that ``u = 0`` is exact and finite.
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

__all__ = ["Grassmann1", "is_grassmann1", "sinc"]

_HALF = (torch.float16, torch.bfloat16)


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
    Any non-zero vector is a valid representative; the metric is the paper's
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

    # ----------------------------------------------------------------- helpers
    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``<a, b>`` over the point dimensions, kept as size-1 dims for broadcasting."""
        return (a * b).sum(dim=self._dims, keepdim=True)

    def _norm(self, a: torch.Tensor) -> torch.Tensor:
        """Euclidean ``|a|`` over the point dimensions, kept as size-1 dims."""
        return torch.linalg.vector_norm(a, dim=self._dims, keepdim=True)

    def _squeeze(self, t: torch.Tensor, keepdim: bool) -> torch.Tensor:
        return t if keepdim else t.squeeze(self._dims) if t.dim() >= self.ndim else t

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
        norm = self._norm(x).squeeze(self._dims)
        bad = ~(torch.isfinite(norm) & (norm > 0))
        if bad.any():
            index = tuple(int(i) for i in bad.nonzero()[0])
            what = "zero vector" if norm[index] == 0 else "non-finite vector"
            return False, (
                f"`x` holds a {what} at batch index {index}: "
                "a point of G(1,n) must be a non-zero finite vector"
            )
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        # <x, u> / |x| is the component of u along the line, in the units of u
        along = (self._dot(x, u) / self._norm(x)).abs()
        limit = atol + rtol * self._norm(u)
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
        """``g_x(u, v) = <u, v> / <x, x>``; ``v = None`` means ``v = u``."""
        if v is None:
            v = u
        inner = self._dot(u, v) / self._dot(x, x)
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
        """``|u|_x = |u| / |x|``."""
        n = self._norm(u) / self._norm(x)
        target = torch.broadcast_shapes(x.shape[: x.dim() - self.ndim] + (1,) * self.ndim, n.shape)
        return self._squeeze(n.expand(target), keepdim)

    # ------------------------------------------------------------ projections
    @_in_float32
    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """The canonical unit representative ``x / |x|``."""
        return x / self._norm(x)

    @_in_float32
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Horizontal projection ``u - <x, u> / <x, x> * x``."""
        return u - (self._dot(x, u) / self._dot(x, x)) * x

    @_in_float32
    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient ``<x, x> u - <x, u> x`` (at unit ``x``: ``u - <x, u> x``)."""
        return self._dot(x, x) * u - self._dot(x, u) * x

    # ------------------------------------------------------- exponential map
    def _expmap_parts(self, x: torch.Tensor, u: torch.Tensor):
        r = self._norm(x)
        xh = x / r
        t = self._norm(u) / r
        return r, xh, t

    @_in_float32
    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``xh cos(t) + u sin(t) / |u|`` with ``t = |u| / |x|``: a unit representative."""
        r, xh, t = self._expmap_parts(x, u)
        return xh * torch.cos(t) + u * (sinc(t) / r)

    retr = expmap

    def _transport(self, r, xh, t, u, v):
        # (v + <e,v>((cos t - 1) e - sin t xh)) / r with e = u/|u|, |u| = t r:
        # <e,v>(cos t - 1) e = -<u,v> u sinc(t/2)^2 / (2 r^2);  <e,v> sin t = <u,v> sinc(t) / r
        uv = self._dot(u, v)
        half = sinc(t / 2)
        return (v - uv * (u * (half * half / (2 * r * r)) + xh * (sinc(t) / r))) / r

    @_in_float32
    def transp_follow_expmap(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Exact parallel transport of ``v`` along ``s -> expmap(x, s u)``, ``s in [0, 1]``.

        Expressed at the unit point ``expmap(x, u)``:
        ``(v + <e, v> ((cos t - 1) e - sin t xh)) / |x|``, ``e = u / |u|``, ``t = |u| / |x|``.
        """
        r, xh, t = self._expmap_parts(x, u)
        return self._transport(r, xh, t, u, v)

    transp_follow_retr = transp_follow_expmap

    @_in_float32
    def expmap_transp(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expmap(x, u), transp_follow_expmap(x, u, v))`` sharing the work."""
        r, xh, t = self._expmap_parts(x, u)
        y = xh * torch.cos(t) + u * (sinc(t) / r)
        return y, self._transport(r, xh, t, u, v)

    retr_transp = expmap_transp

    # -------------------------------------------------- distance and logmap
    def _angle_parts(self, x: torch.Tensor, y: torch.Tensor):
        """``(xh, s, theta, w)`` for the pair ``[x], [y]``, with ``|w| = |x| sin(theta)``.

        ``s = sign(<x, y>)`` (``+1`` at 0) picks the nearer representative; ``z = s k y``
        with ``k = |x| / |y|`` is that representative at the scale of ``x`` (the rounding
        error of ``k y`` is carried exactly by ``_two_prod``; an error in ``k`` itself is
        radial and drops out of ``w``), ``d = z - x`` is exact by Sterbenz for nearby points,
        and ``w = d - <d, xh> xh`` is the part of ``z`` orthogonal to ``x``.
        ``theta = atan2(|w|, <z, xh>)`` is the same angle as ``2 atan2(|xh - s yh|,
        |xh + s yh|)`` but keeps full relative precision for nearby points, where both forms
        beat ``acos`` of a clamped cosine. Representatives must have norms within float
        range: ``|y|`` above ~1e154 (float64) or ~1e19 (float32) overflows the norm.
        """
        rx = self._norm(x)
        xh = x / rx
        k = rx / self._norm(y)
        k = torch.where(self._dot(x, y) < 0, -k, k)
        z, z_err = _two_prod(k, y)
        d = (z - x) + z_err
        w = d - self._dot(d, xh) * xh
        theta = torch.atan2(self._norm(w), self._dot(z, xh).clamp_min(0))
        return xh, torch.sign(k), theta, w

    @_in_float32
    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Angle between the lines ``[x]`` and ``[y]``, in ``[0, pi/2]``.

        Equal to ``2 atan2(|xh - s yh|, |xh + s yh|)`` with ``s = sign(<x, y>)`` (``+1`` at
        0); computed from the exact difference ``s y - x`` (see ``_angle_parts``), so it stays
        exact to a few ulps for distances near 0, unlike ``acos`` of a clamped cosine.
        """
        theta = self._angle_parts(x, y)[2]
        return self._squeeze(theta, keepdim)

    @_in_float32
    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Horizontal vector at ``x`` of metric length ``dist(x, y)`` towards ``s yh``.

        ``|x| theta w / |w|`` with ``w`` the part of ``s y`` (rescaled to ``|x|``) orthogonal
        to ``x``; written as ``w / sinc(theta)`` so that it is exact at ``theta = 0``. At the
        cut locus (``<x, y> = 0``) ``s = +1`` picks one of the two minimizing geodesics.
        """
        _, _, theta, w = self._angle_parts(x, y)
        return w / sinc(theta)

    @_in_float32
    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Parallel transport of ``v`` (at ``x``) along the minimizing geodesic to ``[y]``.

        Expressed at the representative ``y`` as given: the horizontal lift at ``a y`` is
        ``a`` times the lift at ``y``, so the metric norm is preserved for any ``a != 0``.
        Computed as ``s |y| transp_follow_expmap(xh, logmap(xh, y), v / |x|)``.
        """
        rx, ry = self._norm(x), self._norm(y)
        xh, s, theta, w = self._angle_parts(x, y)
        u = w / (rx * sinc(theta))  # logmap at the unit representative xh
        moved = self._transport(torch.ones_like(rx), xh, theta, u, v / rx)
        return moved * (s * ry)

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


def is_grassmann1(obj: Manifold | torch.Tensor) -> bool:
    """True for ``Grassmann1``, ``geoopt.Scaled(Grassmann1(...))`` (any depth), and a
    ``ManifoldParameter`` / ``ManifoldTensor`` on one of them.

    The one test of "is this G(1, n)" that the optimizers, the model conversion and the
    orthogonality term share.

    >>> from geoopt import Sphere
    >>> is_grassmann1(Scaled(Grassmann1(), 2.0)), is_grassmann1(Sphere())
    (True, False)
    """
    if isinstance(obj, torch.Tensor):
        obj = getattr(obj, "manifold", None)
    while isinstance(obj, Scaled):
        obj = obj.base
    return isinstance(obj, Grassmann1)
