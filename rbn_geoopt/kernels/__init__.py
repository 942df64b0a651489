"""Fused per-point SGD-G and Adam-G steps for ``Grassmann1`` parameters (the fast path).

* :func:`sgdg_step_`, :func:`adamg_step_` (in :mod:`.dispatch`): step one parameter tensor
  in place, with the C kernel when eligible, else pure torch; :func:`sgdg_foreach_`,
  :func:`adamg_foreach_`: the same on a list of tensors, one C call for all of them
  (the optimizers' multi-tensor path);
* :mod:`.arguments`: their argument checks (shapes, scalars, aliasing between tensors);
* :mod:`.torch_rows`: the same fused math in pure torch on ``(rows, n)`` matrices (the
  fallback on every device and the reference of the C kernel);
* ``_crows``: the optional C99 + OpenMP extension built by ``setup.py``;
* ``python -m rbn_geoopt.kernels.bench``: timing against torch's SGD/Adam and against the
  straightforward composition of ``Grassmann1`` operators.
"""

from .dispatch import (
    ENV_VAR,
    adamg_foreach_,
    adamg_step_,
    c_available,
    c_eligible,
    sgdg_foreach_,
    sgdg_step_,
)

__all__ = [
    "ENV_VAR",
    "adamg_foreach_",
    "adamg_step_",
    "c_available",
    "c_eligible",
    "sgdg_foreach_",
    "sgdg_step_",
]
