"""Repository-wide pytest configuration (see also tests/conftest.py).

The Triton kernels (rbn_geoopt/optim/_fused/triton_rows.py) import triton at module level:
without it their module is not collected for doctests. Without CUDA, Triton's interpreter
runs them on CPU tensors (TRITON_INTERPRET must be set before triton is imported).
"""

import importlib.util
import os

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    collect_ignore.append("rbn_geoopt/optim/_fused/triton_rows.py")
else:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
