"""rbn_geoopt: Riemannian batch normalization (Cho & Lee, NIPS 2017) for geoopt.

* :class:`Grassmann1`: the exact, scale-invariant G(1, n) manifold for geoopt;
* :class:`SGDG`, :class:`AdamG`: the paper's optimizers, stepping every geoopt manifold and
  plain parameters (with torch's SGD/Adam rules) in one optimizer;
"""

from . import optim
from .manifold import Grassmann1
from .optim import AdamG, SGDG

__all__ = ["AdamG", "Grassmann1", "SGDG", "optim"]
__version__ = "0.1.0"
