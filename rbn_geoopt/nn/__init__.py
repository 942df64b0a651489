"""Model integration: put a model's BatchNorm-fed weights on G(1, n) and train them.

* :func:`find_scale_invariant` -- which conv/linear weights have scale-invariant rows, and
  why (torch.fx dataflow analysis; nothing is changed);
* :func:`to_grassmann` -- move them onto ``Grassmann1`` in place, keeping the outputs;
* :func:`paper_param_groups`, :func:`paper_optimizer`, :func:`paper_scheduler` -- Cho & Lee's
  recipe (SGD-G / Adam-G on G(1, n), Nesterov SGD elsewhere, x0.2 at 30/60/80 %);
* :func:`orthogonality_penalty` -- ``omega / 2 * ||Yh Yh^T - I||_F^2`` as a loss term.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
>>> to_grassmann(net)
['1.weight']
"""

from ._trace import UntraceableModelError
from .convert import to_grassmann
from .dataflow import Finding, find_scale_invariant
from .penalty import orthogonality_penalty
from .recipe import paper_optimizer, paper_param_groups, paper_scheduler

__all__ = [
    "Finding",
    "UntraceableModelError",
    "find_scale_invariant",
    "orthogonality_penalty",
    "paper_optimizer",
    "paper_param_groups",
    "paper_scheduler",
    "to_grassmann",
]
