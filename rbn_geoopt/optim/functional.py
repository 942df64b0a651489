r"""Functional cores: one optimizer step over lists of tensors, in the style of ``torch.optim``.

``sgdg`` and ``adamg`` step manifold parameters on one of two paths
with the same results to float rounding:

* fused (``fused=True``, the optimizers' default): the float32/float64 ``Grassmann1``
  parameters are stepped in place together by :mod:`rbn_geoopt.kernels` (the multi-tensor
  path: one C call for all of them on CPU, pure torch elsewhere) -- a few dot products per
  point, then the new point and momentum written as linear combinations of ``y``, the
  momentum and ``g``, at the memory traffic of torch's momentum SGD;
* straightforward: every other manifold (and ``fused=False``) goes through the per-point
  kernels of :mod:`rbn_geoopt.optim.kernels`, which only call the manifold's operators.

Half-precision parameters take the straightforward path in float32 and are stored back;
their state is float32 and re-projected onto the tangent space of the rounded point that
was stored.

``euclidean_sgd`` and ``euclidean_adam`` are torch's own functional cores
(``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``) called exactly as ``torch.optim.SGD``
and ``torch.optim.Adam`` call them, so plain parameters follow torch bit for bit.
"""

from __future__ import annotations

import torch
from geoopt.manifolds.base import Manifold
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from ..kernels import adamg_foreach_, sgdg_foreach_
from ..manifold import Grassmann1
from .kernels import (
    adamg_point_step,
    clip_per_point,
    orthogonality_egrad,
    riemannian_grad,
    sgdg_point_step,
    working_dtype,
)

__all__ = ["adamg", "euclidean_adam", "euclidean_sgd", "sgdg"]


def _working(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a float32 copy when it is half precision."""
    return t.to(working_dtype(t.dtype))


def _store(manifold: Manifold, param: torch.Tensor, new_y: torch.Tensor, tangent):
    """``param <- new_y``; returns ``tangent`` re-projected at the point actually stored.

    A half-precision parameter stores a rounded ``new_y`` (relative error ~4e-3 in
    bfloat16); the float32 state transported to the unrounded point would then be off the
    tangent space of the stored one by as much. Projecting it there (one inner product per
    point) keeps the state tangent to float32 precision at every step.
    """
    param.copy_(new_y)
    if tangent is None or param.dtype == new_y.dtype:
        return tangent
    return manifold.proju(_working(param), tangent)


def _fusable(fused: bool, manifold: Manifold, param: torch.Tensor, lr: float) -> bool:
    """Whether ``param`` takes the fused path: exactly ``Grassmann1`` (``Scaled`` changes
    the math), float32/float64, and a non-zero ``lr`` (``lr = 0`` keeps the straightforward
    path's promise that the points do not change by a bit)."""
    return (
        fused
        and type(manifold) is Grassmann1
        and param.dtype in (torch.float32, torch.float64)
        and lr != 0
    )


def _fused_grad(param: torch.Tensor, grad: torch.Tensor, ndim: int, omega: float):
    """The Euclidean gradient the fused kernel steps with (``grad`` is not modified)."""
    grad = grad.to(param.dtype)
    if omega != 0:
        grad = grad + orthogonality_egrad(param, ndim, omega)
    return grad


def _clipped_rgrad(
    manifold: Manifold,
    y: torch.Tensor,
    grad: torch.Tensor,
    *,
    weight_decay: float,
    grad_clip: float | None,
    omega: float,
) -> torch.Tensor:
    h = riemannian_grad(manifold, y, _working(grad), weight_decay=weight_decay, omega=omega)
    if grad_clip is not None:
        h = clip_per_point(manifold, y, h, grad_clip)
    return h


def sgdg(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    manifolds: list[Manifold],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    grad_clip: float | None,
    omega: float,
    fused: bool = False,
) -> None:
    """SGD-G on manifold parameters, in place.

    ``momentum_buffers[i]`` is the transported last step ``tau`` of ``params[i]`` (None
    before its first step: a new buffer is put in the list when ``momentum != 0``).
    ``fused`` selects the fused path for the parameters it applies to (module docstring).
    """
    batch: tuple[list, list, list, list] = ([], [], [], [])  # the fused path, one call
    for i, (param, grad, manifold) in enumerate(zip(params, grads, manifolds, strict=True)):
        if _fusable(fused, manifold, param, lr):
            tau = momentum_buffers[i] if momentum != 0 else None
            if momentum != 0 and tau is None:
                tau = torch.zeros_like(param, memory_format=torch.contiguous_format)
                momentum_buffers[i] = tau
            g = _fused_grad(param, grad, manifold.ndim, omega)
            for column, value in zip(batch, (param, g, tau, manifold.ndim), strict=True):
                column.append(value)
            continue
        y = _working(param)
        h = _clipped_rgrad(
            manifold, y, grad, weight_decay=weight_decay, grad_clip=grad_clip, omega=omega
        )
        tau = momentum_buffers[i] if momentum != 0 else None
        new_y, new_tau = sgdg_point_step(manifold, y, h, tau, lr=lr, momentum=momentum)
        new_tau = _store(manifold, param, new_y, new_tau)
        if new_tau is None:
            continue
        if tau is None:
            momentum_buffers[i] = new_tau.clone(memory_format=torch.contiguous_format)
        else:
            tau.copy_(new_tau)
    if batch[0]:
        ys, gs, taus, ndims = batch
        sgdg_foreach_(ys, gs, taus, ndims=ndims, lr=lr, momentum=momentum, grad_clip=grad_clip)


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
    weight_decay: float,
    grad_clip: float | None,
    omega: float,
    fused: bool = False,
) -> None:
    """Adam-G on manifold parameters, in place (state tensors initialized by the caller).

    ``exp_avgs[i]`` is the tangent first moment, ``exp_avg_sqs[i]`` one second-moment
    scalar per point (keepdim shape), ``state_steps[i]`` a scalar tensor step counter.
    ``fused`` selects the fused path for the parameters it applies to (module docstring).
    """
    batch: tuple[list, ...] = ([], [], [], [], [], [])  # the fused path, one call
    for param, grad, exp_avg, exp_avg_sq, step_t, manifold in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, manifolds, strict=True
    ):
        if _fusable(fused, manifold, param, lr):
            step_t += 1
            g = _fused_grad(param, grad, manifold.ndim, omega)
            values = (param, g, exp_avg, exp_avg_sq, manifold.ndim, step_t.item())
            for column, value in zip(batch, values, strict=True):
                column.append(value)
            continue
        y = _working(param)
        h = _clipped_rgrad(
            manifold, y, grad, weight_decay=weight_decay, grad_clip=grad_clip, omega=omega
        )
        step_t += 1
        new_y, new_m = adamg_point_step(
            manifold,
            y,
            h,
            exp_avg,
            exp_avg_sq,
            step=step_t.item(),
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
        )
        exp_avg.copy_(_store(manifold, param, new_y, new_m))
    if batch[0]:
        ys, gs, ms, vs, ndims, steps = batch
        adamg_foreach_(
            ys,
            gs,
            ms,
            vs,
            ndims=ndims,
            steps=steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            grad_clip=grad_clip,
        )


def euclidean_sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffer_list: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    foreach: bool | None,
) -> None:
    """``torch.optim.SGD``'s step, via torch's own functional core ``torch.optim.sgd.sgd``."""
    _torch_sgd(
        params,
        grads,
        momentum_buffer_list,
        has_sparse_grad=False,
        foreach=foreach,
        fused=None,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=False,
    )


def euclidean_adam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool | None,
) -> None:
    """``torch.optim.Adam``'s step, via torch's own functional core ``torch.optim.adam.adam``."""
    _torch_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        state_steps,
        foreach=foreach,
        capturable=False,
        differentiable=False,
        fused=None,
        has_complex=any(torch.is_complex(p) for p in params),
        decoupled_weight_decay=False,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )
