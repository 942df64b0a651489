"""rbn_geoopt: Riemannian batch normalization (Cho & Lee, NIPS 2017) for geoopt.

* :class:`Grassmann1`: the exact, scale-invariant G(1, n) manifold for geoopt, and
  :class:`Grassmann1Blocks`, whose points are blocks of consecutive rows (GroupNorm,
  LayerNorm over the channels);
* :class:`SGDG`, :class:`AdamG`: the paper's optimizers, stepping every geoopt manifold and
  plain parameters (with torch's SGD/Adam rules) in one optimizer;
* :mod:`rbn_geoopt.nn`: find the BatchNorm-fed weights of a model and move them onto G(1, n);
* :class:`AngleMonitor` (:mod:`rbn_geoopt.diagnostics`): the angle each optimizer step turns
  each weight, per parameter and param group, from any training loop.
"""

from . import diagnostics, nn, optim
from .diagnostics import AngleMonitor
from .manifold import Grassmann1, Grassmann1Blocks
from .optim import SGDG, AdamG

__all__ = [
    "AdamG",
    "AngleMonitor",
    "Grassmann1",
    "Grassmann1Blocks",
    "SGDG",
    "diagnostics",
    "nn",
    "optim",
]
__version__ = "0.1.0"
