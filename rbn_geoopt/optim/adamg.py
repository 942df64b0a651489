r"""Adam-G: Adam on any geoopt manifold with one second moment per point (Cho & Lee 2017)."""

from __future__ import annotations

from typing import Any

import torch
from geoopt.manifolds.base import Manifold

from .base import RiemannianOptimizer, scalar_step
from .distributed import local, shard_like
from .functional import adamg
from .kernels import point_shape, working_dtype

__all__ = ["AdamG"]


class AdamG(RiemannianOptimizer):
    r"""Adam-G on manifold parameters, ``torch.optim.Adam`` (or SGD) on plain ones.

    Per point ``y`` of a manifold parameter at step ``t``, with ``m`` a tangent vector and
    ``v`` ONE scalar per point (not per coordinate), both zero before the first step::

        h   = egrad2rgrad(y, g + weight_decay * y + omega-term)
        h^  = h * min(1, grad_clip / |h|_y)       # per point, only when grad_clip is set
        m   = beta1 * m + (1 - beta1) * h^
        v   = beta2 * v + (1 - beta2) * |h^|_y^2
        d   = -lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / sqrt(v + eps)
        y, m = retr_transp(y, d, m)               # m carried along the step

    This is the paper's Adam-G: bias correction and ``eps`` sit inside the square root as
    written above (unlike ``torch.optim.Adam``, whose ``eps`` is added after it). On
    ``Grassmann1`` the retraction is the exact exponential map and the transport exact
    parallel transport.

    A parameter's manifold is ``p.manifold`` (geoopt ``ManifoldParameter``), else the group
    key ``"manifold"``, else ``geoopt.Euclidean``. Euclidean parameters follow the group's
    ``euclidean`` rule exactly: ``"adam"`` (default) is ``torch.optim.Adam`` with ``betas``,
    ``eps``, ``weight_decay``; ``"sgd"`` is ``torch.optim.SGD`` with ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``. The paper's recipe (Adam-G on G(1,n),
    Nesterov SGD with weight decay on the rest) is one optimizer and one LR scheduler.

    Args:
        params: parameters, named parameters or param groups (dicts).
        lr: learning rate (required).
        betas: ``(beta1, beta2)``, each in ``[0, 1)`` (default: the paper's ``(0.9, 0.99)``).
        eps: inside the square root on manifolds, torch's on plain parameters (default 1e-8).
        weight_decay: L2 added to the Euclidean gradient (``g + wd * y``) on Euclidean and
            non-Grassmann1 manifold parameters; refused (ValueError) in a group that holds a
            Grassmann1 parameter, where it is projected away.
        momentum, dampening, nesterov: torch's SGD, for ``euclidean="sgd"`` groups.
        grad_clip: ``nu``, per-point clipping in the manifold norm (None: off); does not
            touch Euclidean parameters.
        omega: orthogonality weight: adds the gradient of
            ``omega/2 ||Yh Yh^T - I||_F^2`` (rows of ``Yh`` the unit points of one weight)
            before projection. Grassmann1 parameters only: a group with ``omega > 0``
            holding any other parameter is refused (ValueError).
        euclidean: ``"adam"`` (default) or ``"sgd"``: the rule for Euclidean parameters.
        foreach: passed to torch's core for Euclidean parameters (None: torch's default).
            For float32/float64 ``Grassmann1`` parameters, anything but ``False`` selects
            the fused kernels of :mod:`rbn_geoopt.kernels` (C on CPU, pure torch elsewhere;
            the same results to float rounding); ``False`` composes the manifold's
            operators one by one (the straightforward reference path).
        stabilize: every ``stabilize`` steps, ``projx`` the manifold points and ``proju``
            their first moment (geoopt's convention; None: never).

    State of a manifold parameter: ``step`` (scalar tensor, as torch), ``exp_avg`` (``m``,
    the parameter's shape), ``exp_avg_sq`` (``v``, shape ``(*batch, 1, ..., 1)``: one
    scalar per point). Half-precision manifold parameters are stepped in float32 and stored
    back; their state is float32 (also after ``load_state_dict``). Plain parameters behave
    as in torch.

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
        >>> opt = AdamG([{"params": [w], "lr": 0.05, "grad_clip": 0.1, "omega": 0.1},
        ...              {"params": [b], "lr": 0.01, "euclidean": "sgd", "momentum": 0.9,
        ...               "nesterov": True, "weight_decay": 5e-4}], lr=0.05)
        >>> ((w @ torch.randn(8)).sum() + b.sum()).backward(); opt.step()
        >>> opt.state[w]["exp_avg_sq"].shape
        torch.Size([4, 1])
    """

    _tangent_state = ("exp_avg",)

    def __init__(
        self,
        params: Any,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        grad_clip: float | None = None,
        omega: float = 0.0,
        euclidean: str = "adam",
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
        points, grads = self._local_inputs(group, params, grads, manifolds)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param, point, manifold in zip(params, points, manifolds, strict=True):
            state = self.state[param]
            if "exp_avg" not in state:
                dtype = working_dtype(param.dtype)
                state["step"] = scalar_step()
                state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
                zeros = torch.zeros(
                    point_shape(point.shape, manifold), dtype=dtype, device=point.device
                )
                state["exp_avg_sq"] = shard_like(param, zeros, point_shape(param.shape, manifold))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamg(
            points,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            manifolds,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            grad_clip=group["grad_clip"],
            omega=0.0,  # added by _local_inputs
            fused=group["foreach"] is not False,
        )
