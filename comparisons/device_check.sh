#!/usr/bin/env bash
# The GPU check, prepared for a session that is lent a GPU machine (the device tool of this
# workplace): the measures of the GPU step (README, "Speed") that a CPU cannot take.
#
#   here, once (pip reaches PyPI):  bash comparisons/device_check.sh prepare
#       downloads the one package the GPU image lacks (geoopt, a pure-Python wheel) into
#       .whl/ (ignored by git); the image has torch, triton, pytest and hypothesis
#   there (carry .whl):             bash comparisons/device_check.sh
#       builds the C extension, then `python3 -m comparisons.bench --device cuda`: SGDG /
#       AdamG steps against torch's fused/foreach SGD and Adam and geoopt on ResNet-18's
#       conv weights, one ResNet-18 training step with the paper recipe against torch's,
#       and the CUDA test subset (tests/test_triton_kernel.py, compiled kernels); the log
#       goes to $OUT/device_check.log. About 3-5 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl geoopt==0.5.1
    exit
fi
out=${OUT:-/tmp/device_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1 || echo "C extension not built (see build.log)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m comparisons.bench --device cuda 2>&1 | tee "$out/device_check.log"
