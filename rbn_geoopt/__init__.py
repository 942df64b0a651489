"""rbn_geoopt: Riemannian batch normalization (Cho & Lee, NIPS 2017) for geoopt."""

from .manifold import Grassmann1

__all__ = ["Grassmann1"]
__version__ = "0.1.0"
