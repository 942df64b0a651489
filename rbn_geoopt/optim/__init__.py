"""SGD-G and Adam-G (Cho & Lee 2017) for geoopt manifolds, and optimizers by name.

``SGDG`` and ``AdamG`` step any geoopt manifold parameter with the paper's algorithms and
every plain parameter exactly as ``torch.optim.SGD`` / ``torch.optim.Adam`` do;
``OPTIMIZERS`` / ``create`` select optimizers (ours, geoopt's, torch's) by name. A step with
a NaN/Inf gradient raises ``NonFiniteGradientError`` before changing anything.
``orthogonality_egrad`` is the gradient that ``omega`` adds, for other optimizers to reuse.
"""

from ..orthogonality import orthogonality_egrad
from ._guard import NonFiniteGradientError
from .adamg import AdamG
from .registry import OPTIMIZERS, create
from .sgdg import SGDG

NonFiniteGradientError.__module__ = __name__

__all__ = [
    "OPTIMIZERS",
    "AdamG",
    "NonFiniteGradientError",
    "SGDG",
    "create",
    "orthogonality_egrad",
]
