r"""SGD-G: momentum SGD on G(1, n) and on any geoopt manifold (Cho & Lee 2017, Algorithm 1).

One algorithm, one file, laid out as ``torch/optim/sgd.py``: the :class:`SGDG` optimizer
(validates and routes), the functional :func:`sgdg`, the single-tensor path
``_single_tensor_sgdg`` (the manifold's operators composed: reads like the paper, steps
every manifold, and is the reference of the tests) and the fused path ``_fused_sgdg`` (the
per-row kernel of ``_fused/``: C in ``_fused/_crows.c`` + ``_fused/_rows_impl.h``, its torch
twin in ``_fused/torch_twin.py``). The rule is derived in docs/design.md, "The optimizers
SGD-G and Adam-G".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from geoopt.manifolds.base import Manifold

from ..manifold import is_grassmann1
from . import _fused
from ._composed import clipped_rgrad, keep_norm, store, working
from ._distributed import local
from ._guard import Item
from ._validate import fused_kernel_steps
from .base import RiemannianOptimizer, sgd_momentum

__all__ = ["SGDG", "sgdg"]


class SGDG(RiemannianOptimizer):
    r"""SGD-G on manifold parameters, ``torch.optim.SGD`` (or Adam) on plain ones.

    Per point ``y`` of a manifold parameter, with Euclidean gradient ``g`` and momentum
    ``tau`` (a tangent vector, zero before the first step)::

        h   = egrad2rgrad(y, g + weight_decay * y + omega-term)
        h^  = h * min(1, grad_clip / |h|_y)       # per point, only when grad_clip is set
        d   = momentum * proju(y, tau) - lr * h^
        y, tau = retr_transp(y, d, d)             # tau <- d carried along the step

    On ``Grassmann1`` the retraction is the exact exponential map and the transport exact
    parallel transport, so this is the paper's SGD-G; the new point keeps the norm of the
    old one (a unit row stays unit; a trained, converted model keeps its outputs) and
    ``tau`` is stored as its lift there, re-projected onto the horizontal space at every
    step. This is the paper's heavy-ball form: ``tau`` holds the last step ``d``, so after
    an LR drop the old rate lives on in ``tau``, and ``lr = 0`` does not freeze a point
    whose ``tau`` is non-zero (unlike ``torch.optim.SGD``): it keeps moving by
    ``momentum^k * tau``. A step with ``d = 0`` leaves the point bit-identical.
    ``nesterov`` and ``dampening`` act on Euclidean parameters only. The first step with
    momentum is ``-lr * h^`` (unlike geoopt's RiemannianSGD, whose buffer starts as the raw
    Euclidean gradient).

    A parameter's manifold is ``p.manifold`` (geoopt ``ManifoldParameter``), else the group
    key ``"manifold"``, else ``geoopt.Euclidean``. Euclidean parameters follow the group's
    ``euclidean`` rule exactly: ``"sgd"`` (default) is ``torch.optim.SGD`` with ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``; ``"adam"`` is ``torch.optim.Adam`` with
    ``betas``, ``eps``, ``weight_decay``. One optimizer with several groups therefore runs
    the paper's recipe and is driven by one LR scheduler. Under a momentum-cycling scheduler
    (``OneCycleLR``, ``CyclicLR(cycle_momentum=True)``), which writes ``betas[0]``, every
    rule of the group steps with the scheduled momentum.

    Args:
        params: parameters, named parameters or param groups (dicts).
        lr: learning rate (required).
        momentum: ``gamma`` in ``[0, 1)`` (default 0).
        dampening: torch's SGD dampening, Euclidean parameters only (default 0).
        weight_decay: L2 added to the Euclidean gradient (``g + wd * y``) on Euclidean and
            non-Grassmann1 manifold parameters; refused (ValueError) in a group that holds a
            Grassmann1 parameter, where it is projected away.
        nesterov: torch's Nesterov momentum, Euclidean parameters only.
        betas, eps: used by ``euclidean="adam"`` groups (default ``(0.9, 0.99)``, 1e-8;
            ``eps > 0``).
        grad_clip: ``nu`` > 0, per-point clipping in the manifold norm (None: off); does
            not touch Euclidean parameters.
        omega: orthogonality weight: adds the gradient of ``omega/2 ||Yh Yh^T - I||_F^2``
            (rows of ``Yh`` the unit points of one weight, :mod:`rbn_geoopt.orthogonality`)
            before projection. Grassmann1 parameters only: a group with ``omega > 0``
            holding any other parameter is refused (ValueError).
        euclidean: ``"sgd"`` (default) or ``"adam"``: the rule for Euclidean parameters.
        foreach: torch's switch for Euclidean parameters (None: torch's default);
            ``False`` also selects the single-tensor path for manifold parameters.
        fused: the fused kernel for float32/float64 ``Grassmann1`` parameters (C on CPU,
            its torch twin elsewhere): None (default) uses it unless ``foreach=False``;
            ``True`` insists (ValueError for a parameter it cannot step); ``False`` steps
            every manifold parameter by the single-tensor path. The results agree to float
            rounding.
        stabilize: every ``stabilize`` steps, ``projx`` the points of manifolds other than
            G(1,n) and ``proju`` the momentum (geoopt's convention; None: never).

    State: ``momentum_buffer`` (``tau`` for manifold parameters, torch's buffer for plain
    ones). Half-precision manifold parameters are stepped in float32 and stored back; their
    state is float32 (also after ``load_state_dict``).

    Reliability (docs/design.md, "Reliability contract"): before anything changes, ``step``
    reads every point and gradient and raises
    :class:`~rbn_geoopt.optim.NonFiniteGradientError` (a ValueError) for a NaN/Inf or
    overflowing gradient, ValueError for a point that cannot be stepped, naming the
    parameter, the row and the cause; ``load_state_dict`` checks the whole state first;
    ``torch.compile(opt.step)`` is refused. DistributedDataParallel needs nothing special;
    under FSDP2 ``fully_shard`` give the manifold per param group
    (``{"params": ..., "manifold": Grassmann1(ndim=3)}``).

    Example:
        >>> import geoopt, torch
        >>> from rbn_geoopt import Grassmann1
        >>> w = geoopt.ManifoldParameter(torch.randn(4, 8), manifold=Grassmann1())
        >>> b = torch.nn.Parameter(torch.zeros(4))
        >>> norms = w.norm(dim=1)
        >>> opt = SGDG([{"params": [w], "lr": 0.2, "grad_clip": 0.1},
        ...             {"params": [b], "weight_decay": 5e-4, "nesterov": True}],
        ...            lr=0.01, momentum=0.9)
        >>> ((w @ torch.randn(8)).sum() + b.sum()).backward(); opt.step()
        >>> torch.allclose(w.norm(dim=1), norms)
        True
    """

    state_spec = {"momentum_buffer": "param"}

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        grad_clip: float | None = None,
        omega: float = 0.0,
        euclidean: str = "sgd",
        foreach: bool | None = None,
        fused: bool | None = None,
        stabilize: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            grad_clip=grad_clip,
            omega=omega,
            euclidean=euclidean,
            foreach=foreach,
            fused=fused,
            stabilize=stabilize,
        )
        super().__init__(params, defaults)

    def _step_manifold(self, group: dict[str, Any], items: list[Item], choice: str) -> None:
        momentum = sgd_momentum(group)
        params, manifolds, buffers = [], [], [] if momentum != 0 else None
        for item in items:
            params.append(item.point)
            manifolds.append(item.manifold)
            if buffers is not None:
                state = self.state[item.param]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = self._init_state(item.param, item.manifold)["momentum_buffer"]
                # a DTensor parameter's buffer is a DTensor sharded like it: its local shard
                buffers.append(local(buffer) if item.sharded else buffer)
        sgdg(
            params,
            self._gradients(group, items),
            buffers,
            manifolds,
            lr=group["lr"],
            momentum=momentum,
            weight_decay=group["weight_decay"],
            grad_clip=group["grad_clip"],
            fused=self._fused(group),
            choice=choice,
        )


def sgdg(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    manifolds: list[Manifold],
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    fused: bool = True,
    choice: str = "auto",
) -> None:
    """SGD-G on manifold parameters, in place (the functional core of :class:`SGDG`).

    ``momentum_buffers[i]``: the momentum ``tau`` of ``params[i]`` (zeros before its first
    step), or None for the whole list when ``momentum == 0``. With ``fused``, float32/
    float64 ``Grassmann1`` parameters take the fused kernel (``choice``: its backend,
    ``"auto"``, ``"c"`` or ``"torch"``); everything else the single-tensor path. Inputs
    are trusted: :class:`SGDG` has validated them.
    """
    taus = momentum_buffers if momentum_buffers is not None else [None] * len(params)
    ys, gs, fused_taus, ns = [], [], [], []  # the fused kernel's: one call for all of them
    for param, grad, tau, manifold in zip(params, grads, taus, manifolds, strict=True):
        if fused and fused_kernel_steps(param, manifold):
            ys.append(param)
            gs.append(grad if grad.dtype == param.dtype else grad.to(param.dtype))
            fused_taus.append(tau)
            ns.append(manifold.point_size(param.shape))  # row length of point_view
        else:
            _single_tensor_sgdg(
                param,
                grad,
                tau,
                manifold,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                grad_clip=grad_clip,
            )
    if ys:
        _fused_sgdg(
            ys, gs, fused_taus, ns, lr=lr, momentum=momentum, grad_clip=grad_clip, choice=choice
        )


def _single_tensor_sgdg(
    param: torch.Tensor,
    grad: torch.Tensor,
    tau: torch.Tensor | None,
    manifold: Manifold,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    grad_clip: float | None,
) -> None:
    """The paper's SGD-G step composed from ``manifold``'s operators (see :class:`SGDG`)."""
    y = working(param)
    h = clipped_rgrad(manifold, y, grad, weight_decay, grad_clip)
    if tau is None:
        d = h * -lr
        new_y, new_tau = manifold.retr(y, d), None
    else:
        if is_grassmann1(manifold):
            tau.copy_(manifold.proju(y, tau))
        d = torch.add(tau * momentum, h, alpha=-lr)
        new_y, new_tau = manifold.retr_transp(y, d, d)
    new_y, new_tau = keep_norm(manifold, y, d, new_y, new_tau, param.dtype)
    new_tau = store(manifold, param, new_y, new_tau)
    if tau is not None:
        tau.copy_(new_tau)


def _fused_sgdg(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    taus: list[torch.Tensor | None],
    sizes: list[int],
    *,
    lr: float,
    momentum: float,
    grad_clip: float | None,
    choice: str,
) -> None:
    """Every parameter (points of G(1, sizes[i]) in rows) in one call of the fused per-row
    kernel (module docstring)."""
    nu = math.inf if grad_clip is None else grad_clip
    _fused.sgdg_(params, grads, taus, sizes, lr=lr, momentum=momentum, nu=nu, choice=choice)
