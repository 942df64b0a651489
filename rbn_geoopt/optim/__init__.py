"""SGD-G and Adam-G (Cho & Lee 2017) for geoopt manifolds, and optimizers by name.

``SGDG`` and ``AdamG`` step any geoopt manifold parameter with the paper's algorithms and
every plain parameter exactly as ``torch.optim.SGD`` / ``torch.optim.Adam`` do;
``OPTIMIZERS`` / ``create`` select optimizers (ours, geoopt's, torch's) by name. A step with
a NaN/Inf gradient raises ``NonFiniteGradientError`` before changing anything.
"""

from .adamg import AdamG
from .checks import NonFiniteGradientError
from .registry import OPTIMIZERS, create
from .sgdg import SGDG

__all__ = ["OPTIMIZERS", "AdamG", "NonFiniteGradientError", "SGDG", "create"]
