#!/usr/bin/env bash
# Creates ./.venv and installs sharpguard with every extra and the test tools into it.
# Idempotent: a second run only checks what is there.
#
# torch: on a machine without an NVIDIA GPU we pin the CPU build of torch 2.13.0 (on the
# development machines it lies on disk, so pip takes it without a download). Elsewhere pass
# your own torch requirement, e.g. for a CUDA machine:
#     SHARPGUARD_TORCH="torch" bash scripts/setup.sh
# or install torch into .venv yourself first; a torch already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    if [ -n "${SHARPGUARD_TORCH:-}" ]; then
        spec="$SHARPGUARD_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        spec="torch"        # the default PyPI wheel is a CUDA build
    else
        spec="torch==2.13.0"
    fi
    echo "setup: installing $spec" >&2
    "$VPY" -m pip install -q "$spec"
fi
stamp=.venv/.sharpguard-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing sharpguard[test] (editable)" >&2
    "$VPY" -m pip install -q -e ".[test,bench]"
    # torchattacks (a test oracle) and PyHessian (a benchmark peer) pin torchvision and other packages
    # that break this torch build; their own code needs only torch, numpy, scipy and tqdm.
    "$VPY" -m pip install -q --no-deps "torchattacks==3.5.1" "pyhessian==0.1"
    touch "$stamp"
fi
