"""rbn_geoopt: Riemannian batch normalization (Cho & Lee, NIPS 2017) for geoopt.

* :class:`Grassmann1`: the exact, scale-invariant G(1, n) manifold for geoopt;
* :class:`SGDG`, :class:`AdamG`: the paper's optimizers, stepping every geoopt manifold and
  plain parameters (with torch's SGD/Adam rules) in one optimizer;
* :mod:`rbn_geoopt.nn`: find the BatchNorm-fed weights of a model and move them onto G(1, n).
"""

from . import nn, optim
from .manifold import Grassmann1
from .optim import SGDG, AdamG

__all__ = ["AdamG", "Grassmann1", "SGDG", "nn", "optim"]
__version__ = "0.1.0"
