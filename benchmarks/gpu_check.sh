#!/usr/bin/env bash
# The GPU check: install from the package registries, run the GPU tests, check
# CuPy's gradients against NumPy's, time gradients and whole training runs (CuPy
# vs NumPy, dense vs factored updates), and print a short table last.
#
#   bash benchmarks/gpu_check.sh                 # full size; a few minutes on one H200
#   FTPS_GPU_QUICK=1 bash benchmarks/gpu_check.sh    # small sizes (CI runs this)
#   FTPS_GPU_INSTALL=0 bash benchmarks/gpu_check.sh  # use the active environment
#
# Results: $FTPS_GPU_OUT/gpu.json (default bench-results/). Without CuPy or a
# CUDA device the GPU tests skip and only the NumPy half is measured.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${FTPS_GPU_OUT:-bench-results}
started=$SECONDS

if [[ ${FTPS_GPU_INSTALL:-1} == 1 ]]; then
    venv=${FTPS_GPU_VENV:-.venv-gpu}
    python3 -m venv "$venv"
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    python -m pip install -q --upgrade pip
    extras=test
    if command -v nvidia-smi >/dev/null 2>&1; then
        extras=test,gpu  # cupy-cuda12x: CUDA 12 wheels, no toolkit needed
    fi
    python -m pip install -q -e ".[$extras]"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "no nvidia-smi: no GPU here; the GPU tests skip, NumPy is measured alone"
fi
python - <<'PY'
from benchmarks.gpu import cupy_or_none
cp = cupy_or_none()
print("CuPy", "absent or no CUDA device" if cp is None else f"{cp.__version__} sees a GPU")
PY

echo "== GPU tests (pytest -m gpu)"
python -m pytest -m gpu -q -p no:cacheprovider -p no:logging -rs tests

echo "== agreement and timings (python -m benchmarks.gpu)"
quick=()
if [[ -n ${FTPS_GPU_QUICK:-} ]]; then
    quick=(--quick)
fi
echo "(setup and tests took $((SECONDS - started)) s; results go to $out/gpu.json)"
python -m benchmarks.gpu "${quick[@]}" --out "$out"  # its table is the last output
