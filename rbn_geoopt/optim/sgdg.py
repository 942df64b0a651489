r"""SGD-G: momentum SGD on any geoopt manifold (Cho & Lee 2017, Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from geoopt.manifolds.base import Manifold

from .base import RiemannianOptimizer
from .distributed import local, shard_like
from .functional import sgdg

__all__ = ["SGDG"]


class SGDG(RiemannianOptimizer):
    r"""SGD-G on manifold parameters, ``torch.optim.SGD`` (or Adam) on plain ones.

    Per point ``y`` of a manifold parameter, with Euclidean gradient ``g`` and momentum
    ``tau`` (a tangent vector, zero before the first step)::

        h   = egrad2rgrad(y, g + weight_decay * y + omega-term)
        h^  = h * min(1, grad_clip / |h|_y)       # per point, only when grad_clip is set
        d   = momentum * tau - lr * h^
        y, tau = retr_transp(y, d, d)             # tau <- d carried along the step

    On ``Grassmann1`` the retraction is the exact exponential map and the transport exact
    parallel transport, so this is the paper's SGD-G. This is the paper's heavy-ball form:
    ``tau`` holds the last step ``d`` (so it already contains the learning rate; after an LR
    drop the old rate lives on in ``tau``, as in the paper). ``nesterov`` and ``dampening``
    act on Euclidean parameters only. The first step with momentum is ``-lr * h^``: the
    buffer starts from the projected (Riemannian) gradient, unlike geoopt's RiemannianSGD,
    which stores the raw Euclidean gradient.

    A parameter's manifold is ``p.manifold`` (geoopt ``ManifoldParameter``), else the group
    key ``"manifold"``, else ``geoopt.Euclidean``. Euclidean parameters follow the group's
    ``euclidean`` rule exactly: ``"sgd"`` (default) is ``torch.optim.SGD`` with ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``; ``"adam"`` is ``torch.optim.Adam`` with
    ``betas``, ``eps``, ``weight_decay``. One optimizer, with different groups, therefore
    runs the paper's recipe and is driven by one LR scheduler.

    Args:
        params: parameters, named parameters or param groups (dicts).
        lr: learning rate (required).
        momentum: ``gamma`` in ``[0, 1)`` (default 0).
        dampening: torch's SGD dampening, Euclidean parameters only (default 0).
        weight_decay: L2 added to the Euclidean gradient (``g + wd * y``) on Euclidean and
            non-Grassmann1 manifold parameters; refused (ValueError) in a group that holds a
            Grassmann1 parameter, where it is projected away.
        nesterov: torch's Nesterov momentum, Euclidean parameters only.
        betas, eps: used by ``euclidean="adam"`` groups (default ``(0.9, 0.99)``, 1e-8).
        grad_clip: ``nu``, per-point clipping in the manifold norm (None: off); does not
            touch Euclidean parameters.
        omega: orthogonality weight: adds the gradient of
            ``omega/2 ||Yh Yh^T - I||_F^2`` (rows of ``Yh`` the unit points of one weight)
            before projection. Grassmann1 parameters only: a group with ``omega > 0``
            holding any other parameter is refused (ValueError).
        euclidean: ``"sgd"`` (default) or ``"adam"``: the rule for Euclidean parameters.
        foreach: passed to torch's core for Euclidean parameters (None: torch's default).
            For float32/float64 ``Grassmann1`` parameters, anything but ``False`` selects
            the fused kernels of :mod:`rbn_geoopt.kernels` (C on CPU, pure torch elsewhere;
            the same results to float rounding); ``False`` composes the manifold's
            operators one by one (the straightforward reference path).
        stabilize: every ``stabilize`` steps, ``projx`` the manifold points and ``proju``
            their momentum (geoopt's convention; None: never).

    State: ``momentum_buffer`` (``tau`` for manifold parameters, torch's buffer for plain
    ones). Half-precision manifold parameters are stepped in float32 and stored back; their
    state is float32 (also after ``load_state_dict``). Plain parameters behave as in torch.

    Reliability: ``step`` raises :class:`~rbn_geoopt.optim.NonFiniteGradientError` (a
    ValueError) when any gradient -- plain parameters included -- holds NaN/Inf or would
    overflow the step, and ValueError for a zero or non-finite point, naming the parameter
    and changing nothing (``torch.amp.GradScaler`` skips such steps before they get here).
    ``load_state_dict`` refuses, naming the parameter, a state of other shapes, keys or
    group layout, before loading any of it. ``lr = 0`` changes no bit of the points.
    DistributedDataParallel needs nothing special; under FSDP2 ``fully_shard`` give the
    manifold per param group (``{"params": ..., "manifold": Grassmann1(ndim=3)}``): each
    rank steps its rows, the ``omega`` term is computed on the all-gathered weight, and the
    state is sharded like the parameter (``torch.distributed.checkpoint`` saves it).

    Example:
        >>> import geoopt, torch
        >>> from rbn_geoopt import Grassmann1
        >>> w = geoopt.ManifoldParameter(torch.randn(4, 8), manifold=Grassmann1())
        >>> b = torch.nn.Parameter(torch.zeros(4))
        >>> opt = SGDG([{"params": [w], "lr": 0.2, "grad_clip": 0.1},
        ...             {"params": [b], "weight_decay": 5e-4, "nesterov": True}],
        ...            lr=0.01, momentum=0.9)
        >>> ((w @ torch.randn(8)).sum() + b.sum()).backward(); opt.step()
        >>> torch.allclose(w.norm(dim=1), torch.ones(4))
        True
    """

    _tangent_state = ("momentum_buffer",)

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
        stabilize: int | None = None,
    ) -> None:
        super().__init__(
            params,
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
            stabilize=stabilize,
        )

    def _manifold_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        manifolds: list[Manifold],
    ) -> None:
        momentum = group["momentum"]
        points, grads = self._local_inputs(group, params, grads, manifolds)
        states = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        buffers = [None if b is None else local(b) for b in states]
        sgdg(
            points,
            grads,
            buffers,
            manifolds,
            lr=group["lr"],
            momentum=momentum,
            weight_decay=group["weight_decay"],
            grad_clip=group["grad_clip"],
            omega=0.0,  # added by _local_inputs
            fused=group["foreach"] is not False,
        )
        if momentum != 0:
            for param, saved, buffer in zip(params, states, buffers, strict=True):
                if saved is None:  # a new buffer: sharded like the parameter
                    self.state[param]["momentum_buffer"] = shard_like(param, buffer)
