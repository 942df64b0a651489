"""The machinery SGDG and AdamG share: param groups, the step loop, state, stabilize.

A step walks the param groups; in each, the parameters whose manifold is
``geoopt.Euclidean`` follow torch's own rule named by the group key ``euclidean``
(``"sgd"`` -> ``torch.optim.SGD``, ``"adam"`` -> ``torch.optim.Adam``, bit for bit), and the
others follow the subclass's Riemannian rule (``_manifold_step``). State layout per
parameter uses torch's keys: ``momentum_buffer`` (SGD, SGD-G), ``step`` / ``exp_avg`` /
``exp_avg_sq`` (Adam, Adam-G).

Reliability (see :mod:`.checks`, :mod:`.checkpoint`, :mod:`.distributed`): a step first
checks every gradient and point and raises before changing anything when one would give a
NaN parameter; ``load_state_dict`` checks the whole state (group sizes, hyper-parameters,
keys, shapes, finiteness) before loading any of it; DTensor (FSDP2) parameters are stepped
on their local shards, with state sharded alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from geoopt.manifolds.base import Manifold
from geoopt.optim.mixin import OptimMixin

from .checkpoint import validate_state_dict
from .checks import StepItem, check_step_inputs
from .distributed import gathered, is_dtensor, local, replicated_rows
from .functional import euclidean_adam, euclidean_sgd
from .groups import manifold_of, param_label, validate_group
from .kernels import (
    LOW_PRECISION,
    is_euclidean,
    is_grassmann1,
    orthogonality_egrad,
    working_dtype,
)

__all__ = ["RiemannianOptimizer", "scalar_step"]


Stepped = dict[int, tuple[torch.Tensor, tuple[int, int]]]


def _write_mark(param: torch.Tensor) -> tuple[int, int]:
    """What an in-place write or a ``.data`` replacement changes: version, data pointer."""
    return param._version, param.data_ptr()


def _record_stepped(stepped: Stepped, items: list[StepItem]) -> None:
    """Remember the G(1,n) parameters a step has just written (see ``_collect``)."""
    for item in items:
        param = item.param
        if is_grassmann1(item.manifold) and not is_dtensor(param):
            stepped[id(param)] = (param, _write_mark(param))


def scalar_step() -> torch.Tensor:
    """A zero step counter laid out as ``torch.optim.Adam`` lays it out (CPU scalar)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype, device="cpu")


class RiemannianOptimizer(OptimMixin, torch.optim.Optimizer):
    """Base of :class:`~rbn_geoopt.optim.SGDG` and :class:`~rbn_geoopt.optim.AdamG`.

    Subclasses implement ``_manifold_step(group, params, grads, manifolds)`` and name the
    state keys that hold tangent vectors in ``_tangent_state`` (re-projected by stabilize).
    """

    _tangent_state: tuple[str, ...] = ()

    def __init__(
        self,
        params: Any,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        betas: tuple[float, float],
        eps: float,
        grad_clip: float | None,
        omega: float,
        euclidean: str,
        foreach: bool | None,
        stabilize: int | None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "betas": betas,
            "eps": eps,
            "grad_clip": grad_clip,
            "omega": omega,
            "euclidean": euclidean,
            "foreach": foreach,
        }
        super().__init__(params, defaults, stabilize=stabilize)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then validation (a refused group is not added)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            validate_group(self.param_groups[index], index, type(self).__name__)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_stabilize", None)
        for group in self.param_groups:
            group.setdefault("stabilize", self._stabilize)
            for key, value in self.defaults.items():
                # torch's __setstate__ adds defaults["differentiable"]: not a key of ours,
                # kept out of the groups so a resumed state_dict equals the original's
                if key != "differentiable":
                    group.setdefault(key, value)

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` without the groups' ``manifold`` objects.

        A manifold is structure, like ``params``: it is not saved (so that
        ``torch.load(..., weights_only=True)`` works) and ``load_state_dict`` keeps the
        optimizer's own.
        """
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group.pop("manifold", None)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping the groups' ``manifold`` keys and float32 state.

        The whole ``state_dict`` is checked first (:func:`.checkpoint.validate_state_dict`:
        group sizes, hyper-parameters, state keys and shapes per parameter, finite values);
        on a mismatch a ValueError names the parameter and nothing is loaded. torch casts
        floating state to the parameter's dtype; the float32 state of a half-precision
        manifold parameter is restored from ``state_dict`` unrounded.
        """
        validate_state_dict(self, state_dict)
        manifolds = [group.get("manifold") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for index, (group, manifold) in enumerate(zip(self.param_groups, manifolds, strict=True)):
            group.pop("manifold", None)
            if manifold is not None:
                group["manifold"] = manifold
            validate_group(group, index, type(self).__name__)
        self._restore_full_precision_state(state_dict)

    def _restore_full_precision_state(self, state_dict: dict[str, Any]) -> None:
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for param, saved_id in zip(group["params"], saved["params"], strict=True):
                if param.dtype not in LOW_PRECISION or saved_id not in saved_state:
                    continue
                if is_euclidean(manifold_of(param, group)):
                    continue
                for key, value in saved_state[saved_id].items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        self.state[param][key] = value.to(
                            device=param.device, dtype=working_dtype(param.dtype), copy=True
                        )

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter that has a gradient.

        ``closure`` (optional) re-evaluates the model under ``torch.enable_grad()`` and
        returns the loss, which ``step`` returns. Before anything changes, every gradient
        and point is checked (:mod:`.checks`): a NaN/Inf gradient raises
        :class:`~rbn_geoopt.optim.NonFiniteGradientError`, a zero or non-finite point of
        G(1,n) a ValueError, both naming the parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._collect(index, group) for index, group in enumerate(self.param_groups)]
        check_step_inputs(type(self).__name__, [item for items in work for item in items])
        stepped: Stepped = {}
        for group, items in zip(self.param_groups, work, strict=True):
            plain, curved = [], []
            for item in items:
                (plain if is_euclidean(item.manifold) else curved).append(item)
            if plain:
                self._euclidean_step(
                    group, [item.param for item in plain], [item.grad for item in plain]
                )
            if curved:
                self._manifold_step(
                    group,
                    [item.param for item in curved],
                    [item.grad for item in curved],
                    [item.manifold for item in curved],
                )
                if group["lr"] != 0:  # (lr = 0 leaves the points as they were)
                    _record_stepped(stepped, curved)
            group["step"] = group.get("step", 0) + 1
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)
        self._stepped_versions = stepped
        return loss

    def _collect(self, index: int, group: dict[str, Any]) -> list[StepItem]:
        """The group's parameters that have a gradient, with their manifolds.

        ``trusted``: the parameter holds the unit points that the last step of this
        optimizer wrote -- it was stepped then (``_stepped_versions`` maps ``id(param)`` to
        the parameter, its autograd version and its data pointer right after that step)
        and nobody has modified it in place or replaced its ``.data`` since. The step guard
        then reads only its gradient (:mod:`.checks`). Writes through ``param.data`` are not
        counted by autograd: a zero or non-finite row they leave is still caught by the
        kernel, which leaves that row untouched and raises. DTensor parameters are never
        recorded (their local shards are written, not the DTensor itself), nor are steps
        with ``lr = 0``, which write nothing.
        """
        stepped = getattr(self, "_stepped_versions", {})
        items = []
        for j, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__}: {param_label(group, index, j)} has a sparse "
                    "gradient; sparse gradients are not supported"
                )
            manifold = manifold_of(param, group)
            last = stepped.get(id(param))
            trusted = last is not None and last[0] is param and last[1] == _write_mark(param)
            items.append(StepItem(group, index, j, param, param.grad, manifold, trusted))
        return items

    def _local_inputs(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        manifolds: list[Manifold],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Rank-local views of the points, and the gradients to step them with.

        With ``omega > 0`` the gradient of the orthogonality term is added here (so the
        functional cores get ``omega=0``): computed on the whole weight, all-gathered for a
        DTensor parameter, and cut back to this rank's rows. For a plain tensor this is
        exactly what ``riemannian_grad`` computes.
        """
        points = [local(p) for p in params]
        omega = group["omega"]
        if omega == 0:
            return points, [local(g) for g in grads]
        out = []
        for param, grad, manifold in zip(params, grads, manifolds, strict=True):
            dtype = working_dtype(param.dtype)
            full = gathered(param).to(dtype)
            term = replicated_rows(param, orthogonality_egrad(full, manifold.ndim, omega))
            out.append(local(grad).to(dtype) + term)
        return points, out

    def _euclidean_step(
        self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """Plain parameters: ``torch.optim.SGD`` or ``torch.optim.Adam`` exactly."""
        if group["euclidean"] == "sgd":
            momentum = group["momentum"]
            buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
            euclidean_sgd(
                params,
                grads,
                buffers,
                lr=group["lr"],
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                foreach=group["foreach"],
            )
            for param, buffer in zip(params if momentum else [], buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer
            return
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in params:
            state = self.state[param]
            if "exp_avg" not in state:
                state["step"] = scalar_step()
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        euclidean_adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"],
        )

    def _manifold_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        manifolds: list[Manifold],
    ) -> None:
        raise NotImplementedError

    # --------------------------------------------------------------- stabilize
    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """geoopt's stabilize: ``projx`` the manifold points, ``proju`` their tangent state."""
        for param in group["params"]:
            manifold = manifold_of(param, group)
            if is_euclidean(manifold):
                continue
            point = local(param)
            y = manifold.projx(point.to(working_dtype(param.dtype)))
            point.copy_(y)
            state = self.state.get(param, {})
            for key in self._tangent_state:
                if key in state:
                    buffer = local(state[key])
                    buffer.copy_(manifold.proju(y, buffer))
