r"""Adam-G: Adam on G(1, n) and on any geoopt manifold, with ONE second moment per point
(Cho & Lee 2017).

One algorithm, one file, laid out as ``torch/optim/adam.py``: the :class:`AdamG` optimizer
(validates and routes), the functional :func:`adamg`, the single-tensor path
``_single_tensor_adamg`` (the manifold's operators composed: reads like the paper, steps
every manifold, and is the reference of the tests) and the fused path ``_fused_adamg`` (the
per-row kernel of ``_fused/``: C in ``_fused/_crows.c`` + ``_fused/_rows_impl.h``, its torch
twin in ``_fused/torch_twin.py``). The rule is derived in docs/design.md, "The optimizers
SGD-G and Adam-G".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from geoopt.manifolds.base import Manifold

from ..manifold import grassmann1_of, is_grassmann1
from . import _fused
from ._composed import clipped_rgrad, keep_norm, store, working
from ._distributed import local
from ._guard import Item
from ._validate import fused_kernel_steps
from .base import RiemannianOptimizer

__all__ = ["AdamG", "adamg"]


class AdamG(RiemannianOptimizer):
    r"""Adam-G on manifold parameters, ``torch.optim.Adam`` (or SGD) on plain ones.

    Per point ``y`` of a manifold parameter at step ``t``, with ``m`` a tangent vector and
    ``v`` ONE scalar per point (not per coordinate), both zero before the first step::

        h   = egrad2rgrad(y, g + weight_decay * y + omega-term)
        h^  = h * min(1, grad_clip / |h|_y)       # per point, only when grad_clip is set
        m   = beta1 * proju(y, m) + (1 - beta1) * h^
        v   = beta2 * v + (1 - beta2) * |h^|_y^2
        d   = -lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / sqrt(v + eps)
        y, m = retr_transp(y, d, m)               # m carried along the step

    This is the paper's Adam-G: bias correction and ``eps`` sit inside the square root as
    written above (unlike ``torch.optim.Adam``, whose ``eps`` is added after it). On
    ``Grassmann1`` the retraction is the exact exponential map and the transport exact
    parallel transport; the new point keeps the norm of the old one (a unit row stays
    unit; a trained, converted model keeps its outputs) and ``m`` is stored as its lift
    there. ``lr = 0`` leaves the points bit-identical (the moments still update).

    A parameter's manifold is ``p.manifold`` (geoopt ``ManifoldParameter``), else the group
    key ``"manifold"``, else ``geoopt.Euclidean``. Euclidean parameters follow the group's
    ``euclidean`` rule exactly: ``"adam"`` (default) is ``torch.optim.Adam`` with ``betas``,
    ``eps``, ``weight_decay``; ``"sgd"`` is ``torch.optim.SGD`` with ``momentum``,
    ``dampening``, ``nesterov``, ``weight_decay``. The paper's recipe (Adam-G on G(1,n),
    Nesterov SGD with weight decay on the rest) is one optimizer and one LR scheduler.
    Under a momentum-cycling scheduler (``OneCycleLR``, ``CyclicLR(cycle_momentum=True)``),
    which writes ``betas[0]``, every rule of the group steps with the scheduled momentum
    (Adam-G's and Adam's ``beta1``, SGD's ``momentum``).

    Args:
        params: parameters, named parameters or param groups (dicts).
        lr: learning rate (required).
        betas: ``(beta1, beta2)``, each in ``[0, 1)`` (default: the paper's ``(0.9, 0.99)``).
        eps: ``> 0``, inside the square root on manifolds, torch's on plain parameters
            (default 1e-8).
        weight_decay: L2 added to the Euclidean gradient (``g + wd * y``) on Euclidean and
            non-Grassmann1 manifold parameters; refused (ValueError) in a group that holds a
            Grassmann1 parameter, where it is projected away.
        momentum, dampening, nesterov: torch's SGD, for ``euclidean="sgd"`` groups.
        grad_clip: ``nu`` > 0, per-point clipping in the manifold norm (None: off); does
            not touch Euclidean parameters.
        omega: orthogonality weight (as in :class:`~rbn_geoopt.optim.SGDG`).
        euclidean: ``"adam"`` (default) or ``"sgd"``: the rule for Euclidean parameters.
        foreach, fused: as in :class:`~rbn_geoopt.optim.SGDG`.
        stabilize: every ``stabilize`` steps, ``projx`` the points of manifolds other than
            G(1,n) and ``proju`` the first moment (geoopt's convention; None: never).

    State of a manifold parameter: ``step`` (scalar tensor, as torch), ``exp_avg`` (``m``,
    the parameter's shape), ``exp_avg_sq`` (``v``, shape ``(*batch, 1, ..., 1)``: one
    scalar per point). Half-precision manifold parameters are stepped in float32 and stored
    back; their state is float32 (also after ``load_state_dict``). Reliability: as
    :class:`~rbn_geoopt.optim.SGDG`.

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

    state_spec = {"step": "scalar", "exp_avg": "param", "exp_avg_sq": "point"}

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
        params, manifolds, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for item in items:
            state = self.state[item.param]
            if "exp_avg" not in state:
                state = self._init_state(item.param, item.manifold)
            params.append(item.point)
            manifolds.append(item.manifold)
            if item.sharded:  # a DTensor parameter's state is sharded like it: its shards
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
            else:
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamg(
            params,
            self._gradients(group, items),
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
            fused=self._fused(group),
            choice=choice,
        )


def adamg(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    manifolds: list[Manifold],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    fused: bool = True,
    choice: str = "auto",
) -> None:
    """Adam-G on manifold parameters, in place (the functional core of :class:`AdamG`).

    ``exp_avgs[i]``: the tangent first moment of ``params[i]``; ``exp_avg_sqs[i]``: one
    second moment per point (keepdim shape); ``state_steps[i]``: a scalar tensor step
    counter, incremented here. With ``fused``, float32/float64 ``Grassmann1`` parameters
    take the fused kernel (``choice``: its backend); everything else the single-tensor
    path. Inputs are trusted: :class:`AdamG` has validated them.
    """
    ys, gs, ms, vs, ns, step_sizes = [], [], [], [], [], []  # the fused kernel's: one call
    for param, grad, exp_avg, exp_avg_sq, step_t, manifold in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, manifolds, strict=True
    ):
        step_t += 1
        step = step_t.item()
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        if fused and fused_kernel_steps(param, manifold):
            ys.append(param)
            gs.append(grad if grad.dtype == param.dtype else grad.to(param.dtype))
            ms.append(exp_avg)
            vs.append(exp_avg_sq)
            ns.append(manifold.point_size(param.shape))  # row length of point_view
            step_sizes.append(step_size)
        else:
            _single_tensor_adamg(
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                manifold,
                step_size=step_size,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                grad_clip=grad_clip,
            )
    if ys:
        _fused_adamg(
            ys,
            gs,
            ms,
            vs,
            ns,
            step_sizes,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            grad_clip=grad_clip,
            choice=choice,
        )


def _single_tensor_adamg(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    manifold: Manifold,
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip: float | None,
) -> None:
    """The paper's Adam-G step composed from ``manifold``'s operators (see :class:`AdamG`);
    ``step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t)``."""
    y = working(param)
    h = clipped_rgrad(manifold, y, grad, weight_decay, grad_clip)
    if is_grassmann1(manifold):
        exp_avg.copy_(manifold.proju(y, exp_avg))
    exp_avg.mul_(beta1).add_(h, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(manifold.inner(y, h, keepdim=True), alpha=1 - beta2)
    denom = (exp_avg_sq + eps).sqrt()
    base = grassmann1_of(manifold)
    d = exp_avg * (-step_size) / (denom if base is None else base.per_entry(denom, y.shape))
    new_y, new_m = manifold.retr_transp(y, d, exp_avg)
    new_y, new_m = keep_norm(manifold, y, d, new_y, new_m, param.dtype)
    exp_avg.copy_(store(manifold, param, new_y, new_m))


def _fused_adamg(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    sizes: list[int],
    step_sizes: list[float],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    grad_clip: float | None,
    choice: str,
) -> None:
    """Every parameter (points of G(1, sizes[i]) in rows) in one call of the fused per-row
    kernel (module docstring)."""
    _fused.adamg_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        sizes,
        step_sizes,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        nu=math.inf if grad_clip is None else grad_clip,
        choice=choice,
    )
