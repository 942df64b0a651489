"""Build of the optional C extension ``rbn_geoopt.optim._fused._crows``.

The project metadata lives in pyproject.toml; this file only declares the extension.
It is optional: without a C compiler (or without OpenMP) the package still installs and
``rbn_geoopt.optim._fused`` falls back to its pure-torch path with the same results.
"""

import os
import sys

from setuptools import Extension, setup

if sys.platform == "win32":  # untested: needs MSVC's OpenMP 3 mode for min-reductions
    compile_args, link_args = ["/O2", "/std:c11", "/openmp:llvm"], []
elif sys.platform == "darwin":
    # Apple clang needs libomp (brew install libomp); without it the build fails and the
    # optional extension is skipped
    compile_args, link_args = ["-O3", "-Xpreprocessor", "-fopenmp"], ["-lomp"]
else:
    compile_args, link_args = ["-O3", "-std=c99", "-fopenmp"], ["-fopenmp"]

# RBN_GEOOPT_NO_EXT=1 skips the extension entirely (pure-torch install)
ext_modules = []
if os.environ.get("RBN_GEOOPT_NO_EXT", "") in ("", "0"):
    ext_modules.append(
        Extension(
            "rbn_geoopt.optim._fused._crows",
            sources=["rbn_geoopt/optim/_fused/_crows.c"],
            depends=["rbn_geoopt/optim/_fused/_rows_impl.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            py_limited_api=True,
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
