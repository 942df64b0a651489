"""Beyond BatchNorm (``--study gn``): SGD-G/Adam-G on weights made scale invariant by
GroupNorm and by QK-norm, against SGD, SGDP, AdamW and AdamP, on Fashion-MNIST.

Study A's recipe (:func:`comparisons.study_a.run_study_a`, the same code): every method
trains the same network from the same initial weights (one per seed), on the same batches
in the same order, for the same epochs, every group's learning rate times 0.2 at 50% and
75% of the epochs, each method with its published learning rates and hyper-parameters
(``comparisons/methods.py``; no sweep). Two models (``comparisons/models.py``):

* ``gn_vgg``: study A's VGG net with ``GroupNorm(4, C)`` in place of every BatchNorm: each
  conv weight is scale invariant in 4 blocks of ``C/4`` consecutive rows (points of
  G(1, C/4 * fan_in)), no row on its own;
* ``qk_vit``: a tiny pre-LN transformer on 7x7 patches (16 tokens, width 32, 2 heads, 2
  layers) with QK-norm: each q/k projection weight is scale invariant per head (2 blocks
  of 16 rows); nothing else is.

SGD-G and Adam-G take whatever ``rbn_geoopt.nn.to_grassmann`` converts
(:func:`comparisons.methods.prepare`): these block-invariant weights go on
``Grassmann1Blocks`` (``gn_vgg``: 4 weights, 16 points; ``qk_vit``: 4 weights, 8 points),
each block made unit as one vector. Every method reports how many weights and points it
put on a manifold (``on_manifold``), and the summary says so in words when a manifold
method has none (a main without the block manifold, another model): then SGD-G and Adam-G
are both plain Nesterov SGD (lr 0.01) on every parameter, and the table is not the
comparison the study is for. geoopt's sphere methods (one sphere per ROW) and Adam are
not part of this study (:data:`METHOD_KEYS`).

Example::

    result = run_gn_study(BUDGETS["smoke"], data, default_methods(), [0])
    result["models"]["gn_vgg"]["methods"]["SGD-G"]["on_manifold"]  # {"weights": ..., ...}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .data import Split
from .methods import METHODS, Method
from .study_a import run_study_a

__all__ = ["BUDGETS", "METHOD_KEYS", "check_methods", "default_methods", "run_gn_study"]

#: the methods that make sense on block-invariant weights: the Euclidean baselines and
#: peers, and the two methods that take whatever ``to_grassmann`` converts
METHOD_KEYS = ("sgd", "sgdp", "adamw", "adamp", "sgdg", "adamg")

_GN_VGG = {"name": "gn_vgg", "widths": (16, 32, 64, 64), "groups": 4}
_QK_VIT = {"name": "qk_vit", "dim": 32, "heads": 2, "layers": 2, "patch": 7, "mlp": 64}

#: Sizes per mode. ``--full``: the six methods x seeds 0, 1 (``--seeds 0,1,2`` for the
#: README's table) on both models, 10,000 training / 5,000 test images, 5 epochs. Measured
#: (``python -m comparisons --full --study gn --seeds 0,1,2 --threads 1``, on the project's
#: 2-core machine at low priority beside another study): 917 s of CPU time on one thread
#: (2,655 s of wall time under that load). ``--quick`` is a tenth of the images, one seed;
#: ``--smoke`` a few batches of tiny models (CI).
BUDGETS = {
    "smoke": {
        "models": [
            {
                "key": "gn_vgg",
                "model": {"name": "gn_vgg", "widths": (4, 8, 8, 8), "groups": 2},
                "train": 512,
                "test": 256,
                "epochs": 2,
                "batch_size": 64,
                "max_batches": 2,
            },
            {
                "key": "qk_vit",
                "model": {"name": "qk_vit", "dim": 8, "heads": 2, "layers": 1, "mlp": 16},
                "train": 256,
                "test": 256,
                "epochs": 1,
                "batch_size": 64,
                "max_batches": 2,
            },
        ],
    },
    "quick": {
        "models": [
            {"key": "gn_vgg", "model": _GN_VGG, "train": 1000, "test": 500, "epochs": 2},
            {"key": "qk_vit", "model": _QK_VIT, "train": 1000, "test": 500, "epochs": 2},
        ],
    },
    "full": {
        "models": [
            {"key": "gn_vgg", "model": _GN_VGG, "train": 10000, "test": 5000, "epochs": 5},
            {"key": "qk_vit", "model": _QK_VIT, "train": 10000, "test": 5000, "epochs": 5},
        ],
    },
}


def default_methods() -> list[Method]:
    """The study's methods, in table order.

    >>> [m.label for m in default_methods()]
    ['SGD', 'SGDP', 'AdamW', 'AdamP', 'SGD-G', 'Adam-G']
    """
    return [METHODS[k] for k in METHOD_KEYS]


def check_methods(methods: Iterable[Method]) -> None:
    """Raise ValueError naming every method that is not part of this study.

    >>> check_methods(default_methods())
    >>> check_methods([METHODS["rsgd-sphere"]])
    Traceback (most recent call last):
    ...
    ValueError: method(s) 'rsgd-sphere' are not part of the gn study (geoopt's sphere methods put each row on a sphere, its weights are invariant only in blocks of rows; AdamW is its Adam); its methods: sgd, sgdp, adamw, adamp, sgdg, adamg
    """  # noqa: E501
    other = [m.key for m in methods if m.key not in METHOD_KEYS]
    if other:
        raise ValueError(
            f"method(s) {', '.join(map(repr, other))} are not part of the gn study (geoopt's "
            "sphere methods put each row on a sphere, its weights are invariant only in "
            f"blocks of rows; AdamW is its Adam); its methods: {', '.join(METHOD_KEYS)}"
        )


def run_gn_study(
    budget: dict,
    data: tuple[Split, Split],
    methods: list[Method],
    seeds: list[int],
    device: str = "cpu",
    progress: bool = True,
    on_method: Callable[[dict], None] | None = None,
) -> dict:
    """The study: :func:`comparisons.study_a.run_study_a` on this study's models, for
    ``methods`` (checked by :func:`check_methods` before anything runs)."""
    methods = list(methods)
    check_methods(methods)
    return run_study_a(
        budget, data, methods, seeds, device, progress, desc="study gn", on_method=on_method
    )
