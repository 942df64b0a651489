r"""What SGDG and AdamG share: param groups, the step loop, the declared state, stabilize.

A step (docs/design.md, "How a step flows"): refuse under ``torch.compile`` -> closure ->
collect the parameters with a gradient -> the step guard (:mod:`._guard`: one read of
every point and gradient; raises before anything changes) -> per group, plain parameters
by torch's own rule (the group key ``euclidean``: ``"sgd"`` -> ``torch.optim.SGD``,
``"adam"`` -> ``torch.optim.Adam``, through torch's functional cores, bit for bit) and
manifold parameters by the subclass's ``_step_manifold`` -> ``stabilize`` every
``stabilize`` steps.

Each optimizer DECLARES the state it keeps per manifold parameter in ``state_spec``
(key -> ``PARAM``: a tensor of the parameter's shape, a tangent vector; ``POINT``: one
scalar per point, shape ``(*batch, 1, ..., 1)``; ``SCALAR``: a step counter); plain
parameters keep torch's keys (``EUCLIDEAN_STATE``). :meth:`RiemannianOptimizer.expected_state`
reads the declaration for state initialisation and checkpoint validation alike, so a
subclass saves and reloads its own checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from geoopt import Euclidean, ManifoldTensor
from geoopt.manifolds.base import Manifold
from geoopt.optim.mixin import OptimMixin
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from ..manifold import Grassmann1, Grassmann1Blocks, grassmann1_of, is_grassmann1
from ..orthogonality import orthogonality_egrad
from . import _fused
from ._checkpoint import validate_state_dict
from ._distributed import DTensor as _DTensor
from ._distributed import gathered, local, replicated_rows, shard_like
from ._guard import GRASSMANN, OTHER, PLAIN, Item, check_step
from ._validate import manifold_of, param_label, validate_group

__all__ = [
    "EUCLIDEAN_STATE",
    "PARAM",
    "POINT",
    "SCALAR",
    "RiemannianOptimizer",
    "point_shape",
    "sgd_momentum",
    "working_dtype",
]

#: kinds of declared state: a tensor of the parameter's shape, one scalar per point, a step
PARAM, POINT, SCALAR = "param", "point", "scalar"
#: the state torch's SGD and Adam keep for a plain parameter, by the group key ``euclidean``
EUCLIDEAN_STATE = {
    "sgd": {"momentum_buffer": PARAM},
    "adam": {"step": SCALAR, "exp_avg": PARAM, "exp_avg_sq": PARAM},
}
#: parameter dtypes whose manifold math runs in float32 (and whose state is float32)
LOW_PRECISION = (torch.float16, torch.bfloat16)

#: the kind of a parameter by the exact type of its manifold (the common cases; others:
#: _kind, which also sees subclasses and geoopt.Scaled)
_KINDS = {Grassmann1: GRASSMANN, Grassmann1Blocks: GRASSMANN, Euclidean: PLAIN}


def _kind(manifold: Manifold) -> int:
    if is_grassmann1(manifold):
        return GRASSMANN
    return PLAIN if isinstance(manifold, Euclidean) else OTHER


_COMPILE_ERROR = (
    "{}.step() cannot be compiled: under torch.compile / dynamo the manifold parameters lose "
    "their geoopt class and would be stepped as plain tensors. Nothing was changed. Compile "
    "the model (torch.compile(model)) and call opt.step() eagerly, outside the compiled "
    "function (e.g. with torch.compiler.disable)."
)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the manifold math runs in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def point_shape(shape: torch.Size, manifold: Manifold) -> tuple[int, ...]:
    """Shape of a per-point scalar with the point dims kept: ``(*batch, 1, ..., 1)``
    (``Grassmann1Blocks``: ``(points, 1, ..., 1)``, :meth:`.Grassmann1.point_shape`).

    >>> from rbn_geoopt import Grassmann1
    >>> from rbn_geoopt.manifold import Grassmann1Blocks
    >>> point_shape(torch.Size([16, 3, 3, 3]), Grassmann1(ndim=3))
    (16, 1, 1, 1)
    >>> point_shape(torch.Size([16, 3, 3, 3]), Grassmann1Blocks(4))
    (4, 1, 1, 1)
    """
    base = grassmann1_of(manifold)
    if base is not None:
        return base.point_shape(tuple(shape))
    ndim = manifold.ndim or 0
    return tuple(shape[: len(shape) - ndim]) + (1,) * ndim


def sgd_momentum(group: dict[str, Any]) -> float:
    """The momentum of a group's SGD-type rules (SGD-G's ``gamma``, torch SGD's momentum).

    ``group["momentum"]``, unless a momentum-cycling LR scheduler drives the group
    (``OneCycleLR``, ``CyclicLR(cycle_momentum=True)``: they add ``max_momentum`` to it).
    Since SGDG and AdamG declare ``betas``, torch's schedulers write the scheduled momentum
    into ``betas[0]``; every rule of the group then steps with it, as ``torch.optim.SGD``
    and ``torch.optim.Adam`` would under the same scheduler.
    """
    return group["betas"][0] if "max_momentum" in group else group["momentum"]


def scalar_step() -> torch.Tensor:
    """A zero step counter laid out as ``torch.optim.Adam`` lays it out (CPU scalar)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype, device="cpu")


class RiemannianOptimizer(OptimMixin, torch.optim.Optimizer):
    """Base of :class:`~rbn_geoopt.optim.SGDG` and :class:`~rbn_geoopt.optim.AdamG`.

    Subclasses declare ``state_spec`` and implement ``_step_manifold(group, items, choice)``
    (the manifold parameters of one group that have a gradient; ``choice`` the kernel
    backend of this step).
    """

    state_spec: ClassVar[dict[str, str]] = {}

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults, stabilize=defaults["stabilize"])

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
        self._stabilize = self.defaults.get("stabilize")
        for group in self.param_groups:
            for key, value in self.defaults.items():
                # torch's __setstate__ adds defaults["differentiable"]: not a key of ours,
                # kept out of the groups so a resumed state_dict equals the original's
                if key != "differentiable":
                    group.setdefault(key, value)

    # ------------------------------------------------------------------- state
    def expected_state(
        self, param: torch.Tensor, manifold: Manifold, group: dict[str, Any]
    ) -> dict[str, tuple[int, ...]]:
        """State key -> shape that this optimizer keeps for ``param`` (module docstring)."""
        if isinstance(manifold, Euclidean):
            spec = EUCLIDEAN_STATE[group["euclidean"]]
        else:
            spec = self.state_spec
        shapes = {PARAM: tuple(param.shape), POINT: point_shape(param.shape, manifold)}
        return {key: shapes.get(kind, ()) for key, kind in spec.items()}

    def _init_state(self, param: torch.Tensor, manifold: Manifold) -> dict[str, Any]:
        """Zero state of a manifold parameter, as declared (float32 for half precision;
        a DTensor parameter's state is sharded like it)."""
        state = self.state[param]
        point = local(param)
        dtype = working_dtype(param.dtype)
        for key, kind in self.state_spec.items():
            if kind == SCALAR:
                state[key] = scalar_step()
                continue
            full = tuple(param.shape) if kind == PARAM else point_shape(param.shape, manifold)
            shape = point.shape if kind == PARAM else point_shape(point.shape, manifold)
            zeros = torch.zeros(shape, dtype=dtype, device=point.device)
            state[key] = shard_like(param, zeros, full)
        return state

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
        """torch's ``load_state_dict``, checked first, keeping the groups' ``manifold`` keys.

        The whole ``state_dict`` is checked before anything is loaded
        (:mod:`._checkpoint`: group sizes, hyper-parameters, the declared state keys and
        shapes per parameter, finite values); on a mismatch a ValueError names the
        parameter. A ``step`` saved as a number is loaded as a tensor. torch casts floating
        state to the parameter's dtype; the float32 state of a half-precision manifold
        parameter is restored unrounded.
        """
        validate_state_dict(self, state_dict)
        state_dict = {**state_dict, "state": _steps_as_tensors(state_dict["state"])}
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
                if isinstance(manifold_of(param, group), Euclidean):
                    continue
                for key, value in saved_state[saved_id].items():
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        self.state[param][key] = value.to(
                            device=param.device, dtype=working_dtype(param.dtype), copy=True
                        )

    # -------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter that has a gradient; returns ``closure()``'s loss.

        ``closure`` (optional) re-evaluates the model under ``torch.enable_grad()``. Before
        anything changes, every gradient and point is checked (:mod:`._guard`): a NaN/Inf
        gradient raises :class:`~rbn_geoopt.optim.NonFiniteGradientError`, a point that
        cannot be stepped a ValueError, both naming the parameter (and the row).
        """
        if torch.compiler.is_compiling():
            raise RuntimeError(_COMPILE_ERROR.format(type(self).__name__))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without its Python layers
        try:
            self._step(_fused.backend())
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _step(self, choice: str) -> None:
        alias = _fused.c_first(choice)
        work = [self._collect(i, group, alias) for i, group in enumerate(self.param_groups)]
        check_step(type(self).__name__, work, choice)
        for _, group, plain, curved in work:
            if plain:
                self._step_euclidean(group, plain)
            if curved:
                self._step_manifold(group, curved, choice)
            group["step"] = group.get("step", 0) + 1
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self.stabilize_group(group)

    def _collect(self, index: int, group: dict[str, Any], alias: bool):
        """``(index, group, plain items, manifold items)``: the group's parameters that
        have a gradient (see :class:`._guard.Item`).

        With ``alias`` (the C kernel may read the points: :func:`._fused.c_first`), a CPU
        geoopt ``ManifoldTensor`` is read and written through ``param.detach()``: same
        storage and version counter, but every attribute read of geoopt's subclass looks
        up ``__torch_function__`` through five classes, and a step reads each point's
        attributes about fifteen times. Elsewhere the alias would only add an aten op per
        tensor (the twin's op budget)."""
        plain, curved = [], []
        for j, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise TypeError(
                    f"{type(self).__name__}: {param_label(group, index, j)} has a sparse "
                    "gradient; sparse gradients are not supported"
                )
            manifold = manifold_of(param, group)
            kind = _KINDS.get(type(manifold))
            if kind is None:
                kind = _kind(manifold)
            if _DTensor is not None and isinstance(param, _DTensor):
                item = Item(param, param.to_local(), grad.to_local(), manifold, kind, j, True)
            elif alias and kind != PLAIN and isinstance(param, ManifoldTensor) and param.is_cpu:
                item = Item(param, param.detach(), grad, manifold, kind, j, False)
            else:
                item = Item(param, param, grad, manifold, kind, j, False)
            (plain if kind == PLAIN else curved).append(item)
        return index, group, plain, curved

    def _step_manifold(self, group: dict[str, Any], items: list[Item], choice: str) -> None:
        """Step the group's manifold parameters that have a gradient (subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _step_manifold")

    def _gradients(self, group: dict[str, Any], items: list[Item]) -> list[torch.Tensor]:
        """The rank-local gradients a manifold step uses: with ``omega > 0`` plus the
        orthogonality term, computed on the whole weight (all-gathered for a DTensor) in
        the working dtype and cut back to this rank's rows."""
        omega = group["omega"]
        if omega == 0:
            return [item.grad for item in items]
        out = []
        for item in items:
            dtype = working_dtype(item.param.dtype)
            full = gathered(item.param).to(dtype)
            rows = grassmann1_of(item.manifold).point_view(full)
            term = orthogonality_egrad(rows, 1, omega).reshape(full.shape)
            out.append(item.grad.to(dtype) + replicated_rows(item.param, term))
        return out

    def _fused(self, group: dict[str, Any]) -> bool:
        """Whether the group's float32/float64 Grassmann1 parameters take the fused kernels:
        ``fused=True``, or neither switch set to False (torch's ``foreach=False`` is its
        single-tensor path)."""
        return group["fused"] is not False and (group["fused"] or group["foreach"] is not False)

    def _step_euclidean(self, group: dict[str, Any], items: list[Item]) -> None:
        """Plain parameters: ``torch.optim.SGD`` or ``torch.optim.Adam`` exactly."""
        params, grads = [], []
        for item in items:  # whole (DTensor) parameters: torch's rules handle them
            params.append(item.param)
            grads.append(item.param.grad)
        if group["euclidean"] == "sgd":
            momentum = sgd_momentum(group)
            buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
            _torch_sgd(
                params,
                grads,
                buffers,
                has_sparse_grad=False,
                foreach=group["foreach"],
                fused=None,
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=False,
            )
            for param, buffer in zip(params if momentum else [], buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer
            return
        states = [self.state[p] for p in params]
        for param, state in zip(params, states, strict=True):
            if "exp_avg" not in state:
                state["step"] = scalar_step()
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        _torch_adam(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=None,
            has_complex=any(torch.is_complex(p) for p in params),
            decoupled_weight_decay=False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    # --------------------------------------------------------------- stabilize
    @torch.no_grad()
    def stabilize_group(self, group: dict[str, Any]) -> None:
        """geoopt's stabilize: ``projx`` the manifold points (not on G(1,n), where every
        non-zero vector is a point and the steps keep each point's norm) and ``proju`` the
        declared tangent state at them."""
        tangent = [key for key, kind in self.state_spec.items() if kind == PARAM]
        for param in group["params"]:
            manifold = manifold_of(param, group)
            if isinstance(manifold, Euclidean):
                continue
            point = local(param)
            y = point.to(working_dtype(param.dtype))
            if not is_grassmann1(manifold):
                y = manifold.projx(y)
                point.copy_(y)
            state = self.state.get(param, {})
            for key in tangent:
                if key in state:
                    buffer = local(state[key])
                    buffer.copy_(manifold.proju(y, buffer))


def _steps_as_tensors(state: dict[Any, Any]) -> dict[Any, Any]:
    """``state`` with every ``step`` saved as a number turned into a tensor (older torch
    checkpoints), as ``torch.optim.Adam`` loads it."""
    out = {}
    for key, entry in state.items():
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is not None and not torch.is_tensor(step):
            entry = {**entry, "step": scalar_step().fill_(float(step))}
        out[key] = entry
    return out
