"""The methods of study A: method key -> how to build its optimizer for a model.

Every method trains the same network; they differ only in how the scale-invariant weights
(the names that ``rbn_geoopt.nn.to_grassmann`` returns, "G-weights" below) and the other
parameters are stepped:

=============================  =============================================================
``sgd``    SGD                 torch SGD, Nesterov momentum 0.9, weight decay 5e-4, lr 0.1
``sgdg``   SGD-G               the paper's recipe, ``rbn_geoopt.nn.paper_optimizer``:
                               G-weights on ``Grassmann1`` with SGD-G (lr_g 0.2, momentum
                               0.9, clip nu 0.1, orthogonality 0.1); the rest Nesterov SGD
                               (lr 0.01, wd 5e-4, BN parameters and biases included) in the
                               same optimizer
``adamg``  Adam-G              as SGD-G with Adam-G (lr_g 0.05, betas (0.9, 0.99), eps 1e-8)
``rsgd-sphere``                geoopt ``RiemannianSGD`` with the G-weights' rows on ``Sphere``
``rsgd-sphereexact``           ... on ``SphereExact``
``radam-sphere``               geoopt ``RiemannianAdam`` on ``Sphere`` (betas, eps as Adam-G)
``radam-sphereexact``          ... on ``SphereExact``
``adam``   Adam                torch Adam, lr 1e-3, no weight decay
``sgdp``   SGDP                ``adamp.SGDP`` (the authors' package ``adamp`` 0.3.0) as a
                               drop-in for ``sgd``: lr 0.1, Nesterov momentum 0.9, weight
                               decay 5e-4, its published delta 0.1, wd_ratio 0.1, eps 1e-8
``adamp``  AdamP               ``adamp.AdamP``, its published usage: lr 1e-3, betas
                               (0.9, 0.999), eps 1e-8, decoupled weight decay 1e-2, delta
                               0.1, wd_ratio 0.1, no Nesterov
``adamw``  AdamW               torch AdamW (decoupled weight decay), its defaults: lr 1e-3,
                               betas (0.9, 0.999), eps 1e-8, weight decay 1e-2
=============================  =============================================================

The three peers (and ``sgd``, ``adam``) step every parameter of the model in one group, BN
parameters and biases included: SGDP/AdamP decide per step and per weight whether it looks
scale invariant (cosine of gradient and weight below ``delta / sqrt(n)``) and then remove
the radial part of its update and scale its weight decay by ``wd_ratio``. SGDP's weight
decay ``p *= 1 - lr wd / (1 - momentum)`` matches torch SGD's coupled decay at steady state,
so ``sgdp`` differs from ``sgd`` only by the projection.

Every manifold method starts from the same unit rows (:func:`normalise_rows_`: geoopt's
spheres need them, and ``to_grassmann`` itself keeps rows as they are; SGD-G/Adam-G make
each point unit, :func:`normalise_points_`, which is each row when the points are rows --
for a weight invariant only in blocks of rows, a block). The geoopt sphere methods put
each ROW on a sphere: they assume points are rows and are left out of the study beyond
BatchNorm (``comparisons/study_gn.py``), as is Adam (AdamW is its Adam-type baseline).
:func:`on_manifold` says how many weights and points a prepared method has on a manifold.
The four geoopt
methods use the same learning rates, the same per-row gradient clipping and the same
orthogonality term as SGD-G/Adam-G (applied by :class:`SphereHook` before the step), and
the same Nesterov SGD for the other parameters, so that the only difference is the
geometry of the update: geoopt's projection transport and (for ``Sphere``) its
normalizing retraction, its ``eps`` outside the square root.

Example::

    prepared = prepare(METHODS["sgdg"], VGGNet())
    prepared.optimizer.step()
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import geoopt
import torch
from torch import nn
from torch.nn.utils import parametrize

from rbn_geoopt.optim import orthogonality_egrad

__all__ = [
    "METHODS",
    "Method",
    "Prepared",
    "grassmann_names",
    "hyperparameters",
    "implementation",
    "missing_packages",
    "manifold_points",
    "normalise_points_",
    "normalise_rows_",
    "on_manifold",
    "parse_methods",
    "prepare",
    "stored_parameter",
]

#: the paper's fixed hyper-parameters (Cho & Lee 2017, section 5)
PAPER = {
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "grad_clip": 0.1,
    "omega": 0.1,
    "betas": (0.9, 0.99),
    "eps": 1e-8,
}


@dataclass(frozen=True)
class Method:
    """One optimizer configuration of study A.

    ``rule`` is ``"sgd"`` or ``"adam"`` (the update of the G-weights), ``geometry`` is
    ``"euclidean"`` (nothing on a manifold), ``"grassmann"``, ``"Sphere"`` or
    ``"SphereExact"``; ``lrs`` are the published learning rates (``lr`` for the plain
    parameters, ``lr_g`` for the G-weights) and ``grid`` the learning rates of the sweep.
    A Euclidean method is built as ``optimizer(model.parameters(), lr=lr, **hyper)``, where
    ``optimizer`` is ``"module.Class"`` and ``package`` the distribution that provides it
    (None: torch).
    """

    key: str
    label: str
    rule: str
    geometry: str
    lrs: dict[str, float]
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    optimizer: str | None = None
    hyper: dict[str, Any] = field(default_factory=dict)
    package: str | None = None


_SGDG_GRID = {"lr_g": (0.05, 0.2, 0.8), "lr": (0.01, 0.1)}
_ADAMG_GRID = {"lr_g": (0.0125, 0.05, 0.2), "lr": (0.01, 0.1)}
_SGD_GRID = {"lr": (0.03, 0.1, 0.3)}
_ADAM_GRID = {"lr": (3e-4, 1e-3, 3e-3)}
#: study A's SGD baseline; SGDP takes the same values (it is meant as a drop-in)
_SGD_HYPER = {
    "momentum": PAPER["momentum"],
    "nesterov": True,
    "weight_decay": PAPER["weight_decay"],
}
#: ``adamp``'s published defaults (its constructor; AdamP's weight decay from its README)
_P_HYPER = {"delta": 0.1, "wd_ratio": 0.1, "eps": 1e-8}
_ADAM_BETAS = (0.9, 0.999)

METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method(
            "sgd",
            "SGD",
            "sgd",
            "euclidean",
            {"lr": 0.1},
            _SGD_GRID,
            "torch.optim.SGD",
            _SGD_HYPER,
        ),
        Method("sgdg", "SGD-G", "sgd", "grassmann", {"lr_g": 0.2, "lr": 0.01}, _SGDG_GRID),
        Method("adamg", "Adam-G", "adam", "grassmann", {"lr_g": 0.05, "lr": 0.01}, _ADAMG_GRID),
        Method(
            "rsgd-sphere",
            "RiemannianSGD (Sphere)",
            "sgd",
            "Sphere",
            {"lr_g": 0.2, "lr": 0.01},
            _SGDG_GRID,
        ),
        Method(
            "rsgd-sphereexact",
            "RiemannianSGD (SphereExact)",
            "sgd",
            "SphereExact",
            {"lr_g": 0.2, "lr": 0.01},
            _SGDG_GRID,
        ),
        Method(
            "radam-sphere",
            "RiemannianAdam (Sphere)",
            "adam",
            "Sphere",
            {"lr_g": 0.05, "lr": 0.01},
            _ADAMG_GRID,
        ),
        Method(
            "radam-sphereexact",
            "RiemannianAdam (SphereExact)",
            "adam",
            "SphereExact",
            {"lr_g": 0.05, "lr": 0.01},
            _ADAMG_GRID,
        ),
        Method(
            "adam",
            "Adam",
            "adam",
            "euclidean",
            {"lr": 1e-3},
            _ADAM_GRID,
            "torch.optim.Adam",
            {"betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 0.0},
        ),
        Method(
            "sgdp",
            "SGDP",
            "sgd",
            "euclidean",
            {"lr": 0.1},
            _SGD_GRID,
            "adamp.SGDP",
            {**_SGD_HYPER, "dampening": 0.0, **_P_HYPER},
            "adamp",
        ),
        Method(
            "adamp",
            "AdamP",
            "adam",
            "euclidean",
            {"lr": 1e-3},
            _ADAM_GRID,
            "adamp.AdamP",
            {"betas": _ADAM_BETAS, "weight_decay": 1e-2, "nesterov": False, **_P_HYPER},
            "adamp",
        ),
        Method(
            "adamw",
            "AdamW",
            "adam",
            "euclidean",
            {"lr": 1e-3},
            _ADAM_GRID,
            "torch.optim.AdamW",
            {"betas": _ADAM_BETAS, "eps": 1e-8, "weight_decay": 1e-2},
        ),
    )
}


def parse_methods(text: str | Iterable[str] | None) -> list[Method]:
    """``"sgd,sgdg"`` (or a list of keys, or None for all) -> methods, in the given order."""
    if text is None:
        return list(METHODS.values())
    keys = [k.strip() for k in (text.split(",") if isinstance(text, str) else text)]
    keys = [k for k in keys if k]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise ValueError(
            f"unknown method name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"known: {', '.join(METHODS)}"
        )
    return [METHODS[k] for k in dict.fromkeys(keys)]


def missing_packages(methods: Iterable[Method]) -> dict[str, list[str]]:
    """Package -> keys of the methods that need it, for the packages not installed.

    >>> missing_packages([METHODS["sgd"], METHODS["sgdg"]])
    {}
    """
    missing: dict[str, list[str]] = {}
    for m in methods:
        if m.package is not None and importlib.util.find_spec(m.package) is None:
            missing.setdefault(m.package, []).append(m.key)
    return missing


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def implementation(method: Method) -> str:
    """Which code steps the method, with the version of the package that provides it.

    >>> implementation(METHODS["sgdg"])
    'rbn_geoopt.nn.paper_optimizer (SGDG)'
    >>> implementation(METHODS["adamw"]).startswith("torch.optim.AdamW (torch ")
    True
    """
    if method.geometry == "grassmann":
        return f"rbn_geoopt.nn.paper_optimizer ({'SGDG' if method.rule == 'sgd' else 'AdamG'})"
    if method.geometry != "euclidean":
        opt = "RiemannianSGD" if method.rule == "sgd" else "RiemannianAdam"
        return (
            f"geoopt.optim.{opt} on geoopt.{method.geometry} (geoopt {_version('geoopt')}) "
            "+ torch.optim.SGD"
        )
    package = method.package or "torch"
    return f"{method.optimizer} ({package} {_version(package)})"


def hyperparameters(method: Method) -> dict[str, Any]:
    """Every fixed hyper-parameter of ``method`` other than its learning rates (these are
    in ``Method.lrs`` or the sweep's chosen point). The manifold methods' values are
    :data:`PAPER`'s: the G-weights' rule, then ``plain_*`` for the other parameters.

    >>> hyperparameters(METHODS["adamw"])
    {'betas': (0.9, 0.999), 'eps': 1e-08, 'weight_decay': 0.01}
    >>> hyperparameters(METHODS["sgdg"])["grad_clip"]
    0.1
    """
    if method.geometry == "euclidean":
        return dict(method.hyper)
    if method.rule == "sgd":
        rule = {"momentum": PAPER["momentum"]}
    else:
        rule = {"betas": PAPER["betas"], "eps": PAPER["eps"]}
    return {
        **rule,
        "grad_clip": PAPER["grad_clip"],
        "omega": PAPER["omega"],
        "plain_momentum": PAPER["momentum"],
        "plain_nesterov": True,
        "plain_weight_decay": PAPER["weight_decay"],
    }


def _build_euclidean(method: Method, params: list, lr: float) -> torch.optim.Optimizer:
    module, _, name = method.optimizer.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(params, lr=lr, **method.hyper)


class OptimizerChain:
    """Several optimizers stepped as one (``param_groups`` is their concatenation)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class SphereHook:
    """What SGD-G/Adam-G do to the G-weights' gradient, for geoopt's sphere optimizers.

    Before each step, for every sphere weight ``y`` (unit rows) with gradient ``g``:
    ``h = proju(y, g + orthogonality_egrad(y, 1, omega))``, then ``h *= min(1, nu / |h|)``
    per row, written back to ``y.grad``. geoopt then applies its own update to this tangent
    vector.
    """

    def __init__(self, params: list[torch.Tensor], grad_clip: float, omega: float) -> None:
        self.params, self.grad_clip, self.omega = params, grad_clip, omega

    @torch.no_grad()
    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad
            if self.omega:
                g = g + orthogonality_egrad(p, 1, self.omega)  # rows: ndim 1
            h = p.manifold.proju(p, g)
            norm = torch.linalg.vector_norm(h, dim=1, keepdim=True)
            scale = torch.where(norm > self.grad_clip, self.grad_clip / norm, 1.0)
            p.grad.copy_(h * scale)


class _Rows(nn.Module):
    """Parametrization: the stored ``(out, n)`` matrix of rows -> the layer's weight shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return _rows_of(weight)


def _split_name(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def current_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor the forward pass uses for parameter ``name`` (parametrizations applied)."""
    module, attr = _split_name(name)
    return getattr(model.get_submodule(module), attr)


@torch.no_grad()
def normalise_rows_(model: nn.Module, names: list[str]) -> None:
    """Divide every row of each named weight by its norm, in place.

    Every manifold method of study A starts from these unit rows, so that they start from
    the same model and differ only in their steps: geoopt's ``Sphere``/``SphereExact`` need
    unit vectors, and ``to_grassmann`` keeps rows as they are (``Grassmann1`` takes any
    non-zero representative, SGD-G/Adam-G keep each row's norm), so SGD-G/Adam-G get the
    same explicit normalisation -- the paper's unit rows, as study A has always had them.
    The weights feed BatchNorm, so this changes the outputs only through BatchNorm's ``eps``.
    """
    for name in names:
        weight = current_weight(model, name)
        _unit_points_(weight, weight.shape[0])


def _unit_points_(weight: torch.Tensor, points: int) -> None:
    """Each block ``weight.reshape(points, -1)[k]`` divided by its norm, in place."""
    flat = weight.reshape(points, -1)
    flat.div_(torch.linalg.vector_norm(flat, dim=1, keepdim=True))
    if flat.data_ptr() != weight.data_ptr():  # a non-contiguous weight: write back
        weight.copy_(flat.reshape(weight.shape))


def to_sphere(model: nn.Module, names: list[str], manifold: geoopt.Manifold) -> list[nn.Parameter]:
    """Store each named weight as a ``(out, n)`` ``ManifoldParameter`` on ``manifold``,
    reshaped back in the forward pass. geoopt's spheres need unit vectors: the rows are
    normalised here explicitly, by the code of :func:`normalise_rows_`."""
    params = []
    for name in names:
        module_name, attr = _split_name(name)
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        parametrize.register_parametrization(module, attr, _Rows(weight.shape))
        holder = module.parametrizations[attr]
        # geoopt's spheres need unit vectors: normalise explicitly, as normalise_rows_ does
        rows = holder.original.detach().clone()
        _unit_points_(rows, rows.shape[0])
        holder.original = geoopt.ManifoldParameter(rows, manifold=manifold)
        params.append(holder.original)
    return params


def grassmann_names(model: nn.Module, example_inputs: Any = None) -> list[str]:
    """The names of the scale-invariant weights, as ``rbn_geoopt.nn.to_grassmann`` picks
    them (found on a copy: ``model`` is not changed; ``example_inputs`` as there)."""
    from rbn_geoopt.nn import to_grassmann

    return list(to_grassmann(copy.deepcopy(model), example_inputs=example_inputs))


def manifold_points(param: torch.Tensor) -> int:
    """How many points the manifold of ``param`` sees in it: the number of distances its
    ``dist(x, x)`` returns (one per point, geoopt's convention), 0 for a plain tensor.

    A point is a block of consecutive rows of the contiguous weight, ``W.reshape(points,
    -1)[k]``: one row per point for ``Grassmann1(ndim=W.dim() - 1)`` and geoopt's spheres on
    the rows, several rows per point for a weight that is scale invariant only in blocks.

    >>> from rbn_geoopt import Grassmann1
    >>> w = geoopt.ManifoldParameter(torch.randn(6, 4, 3), manifold=Grassmann1(ndim=2))
    >>> manifold_points(w), manifold_points(torch.randn(6, 12))
    (6, 0)
    """
    manifold = getattr(param, "manifold", None)
    if manifold is None or isinstance(manifold, geoopt.Euclidean):
        return 0
    with torch.no_grad():
        return int(manifold.dist(param, param).numel())


def stored_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter the optimizer steps for weight ``name`` (a sphere method's rows: the
    ``original`` of its parametrization)."""
    module_name, attr = _split_name(name)
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


@torch.no_grad()
def normalise_points_(model: nn.Module, names: list[str]) -> None:
    """Divide every point of each named manifold parameter by its norm, in place.

    The point structure is the parameter's own (:func:`manifold_points`): each block
    ``W.reshape(points, -1)[k]`` becomes a unit vector, the rows of a block keeping their
    ratios. For weights whose points are rows this is :func:`normalise_rows_`; for a weight
    that is scale invariant only in blocks (GroupNorm, QK-norm), normalising each row
    instead would change the model's function.
    """
    for name in names:
        param = stored_parameter(model, name)
        points = manifold_points(param)
        if points == 0:
            raise ValueError(f"normalise_points_: {name!r} is not on a manifold")
        _unit_points_(param, points)


def on_manifold(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """``{"weights": how many, "points": how many in all, "per_weight": {name: points}}``
    of the named parameters that are on a manifold (a method's G-weights after
    :func:`prepare`; the Euclidean methods have none)."""
    per_weight = {n: manifold_points(stored_parameter(model, n)) for n in names}
    per_weight = {n: k for n, k in per_weight.items() if k}
    return {
        "weights": len(per_weight),
        "points": sum(per_weight.values()),
        "per_weight": per_weight,
    }


@dataclass
class Prepared:
    """A model ready to train: its optimizer, the hook to call between ``backward`` and
    ``step`` (or None), and the names of its G-weights (for the angular-update log)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | OptimizerChain
    before_step: Callable[[], None] | None
    g_names: list[str]

    def set_lr_factor(self, factor: float) -> None:
        """Multiply every group's learning rate by ``factor`` relative to its initial one."""
        if not hasattr(self, "_base"):
            self._base = [g["lr"] for g in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self._base, strict=True):
            group["lr"] = base * factor


def _euclidean_sgd_group(params: list, lr: float) -> dict:
    return {
        "params": params,
        "lr": lr,
        "momentum": PAPER["momentum"],
        "nesterov": True,
        "weight_decay": PAPER["weight_decay"],
    }


def _recipe_overrides(rule: str, lrs: dict[str, float]) -> dict:
    """Keywords of ``rbn_geoopt.nn.paper_optimizer`` that pin every value to :data:`PAPER`
    (which the sphere methods use too) and to the method's learning rates.

    ``norm_bias_weight_decay`` is set to the same 5e-4 as every other non-G weight: the
    library's recipe defaults to 0 there (the paper code's ``--bnDecay``), study A has always
    decayed BatchNorm parameters and biases like the other plain weights.
    """
    overrides = {
        "lr_g": lrs["lr_g"],
        "lr": lrs["lr"],
        "grad_clip": PAPER["grad_clip"],
        "omega": PAPER["omega"],
        "momentum": PAPER["momentum"],
        "nesterov": True,
        "weight_decay": PAPER["weight_decay"],
        "norm_bias_weight_decay": PAPER["weight_decay"],
    }
    if rule == "sgd":
        overrides["momentum_g"] = PAPER["momentum"]
    else:
        overrides.update(betas=PAPER["betas"], eps=PAPER["eps"])
    return overrides


def prepare(
    method: Method,
    model: nn.Module,
    lrs: dict[str, float] | None = None,
    example_inputs: Any = None,
) -> Prepared:
    """Build ``method``'s optimizer for ``model`` (changed in place for the manifold
    methods: their G-weights get the same unit points, :func:`normalise_points_` /
    :func:`to_sphere`); ``lrs`` overrides the published learning rates (the sweep);
    ``example_inputs`` go to the scale-invariance analysis (models whose layout it cannot
    check without real shapes)."""
    lrs = {**method.lrs, **(lrs or {})}
    g_names = grassmann_names(model, example_inputs)
    if method.geometry == "euclidean":
        opt = _build_euclidean(method, list(model.parameters()), lrs["lr"])
        return Prepared(model, opt, None, g_names)

    if method.geometry == "grassmann":
        from rbn_geoopt.nn import paper_optimizer, to_grassmann

        # to_grassmann keeps the values; then every point is made unit, as the sphere
        # methods' rows are (to_sphere): a row when the points are rows (normalise_rows_)
        g_names = list(to_grassmann(model, example_inputs=example_inputs))
        normalise_points_(model, g_names)
        name = "sgdg" if method.rule == "sgd" else "adamg"
        opt = paper_optimizer(model, name, **_recipe_overrides(method.rule, lrs))
        return Prepared(model, opt, None, g_names)

    manifold = geoopt.Sphere() if method.geometry == "Sphere" else geoopt.SphereExact()
    rest_before = [p for n, p in model.named_parameters() if n not in g_names]
    g_params = to_sphere(model, g_names, manifold)
    rest = torch.optim.SGD(**_euclidean_sgd_group(rest_before, lrs["lr"]))
    if method.rule == "sgd":
        sphere = geoopt.optim.RiemannianSGD(g_params, lr=lrs["lr_g"], momentum=PAPER["momentum"])
    else:
        sphere = geoopt.optim.RiemannianAdam(
            g_params, lr=lrs["lr_g"], betas=PAPER["betas"], eps=PAPER["eps"]
        )
    hook = SphereHook(g_params, PAPER["grad_clip"], PAPER["omega"])
    return Prepared(model, OptimizerChain(sphere, rest), hook, g_names)
