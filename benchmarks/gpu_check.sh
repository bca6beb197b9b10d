#!/usr/bin/env bash
# The GPU check (issue 16), as one command:
#
#     bash benchmarks/gpu_check.sh                    # one CUDA GPU: < 8 min, writes the "GPU check" section
#                                                     # of benchmarks/RESULTS.md
#     bash benchmarks/gpu_check.sh --cpu --out F.md   # the dry run: tiny sizes on CPU, into F.md
#
# Extra arguments go to benchmarks/gpu_check.py (--json PATH, --davda54 PATH/TO/sam.py, --only PART...).
# On a GPU it first runs the tests in tests/gpu (the correctness checks at full size) with pytest.
# Python: $PYTHON, else .venv/bin/python when it has torch, else python3. Where that Python cannot import
# sharpguard (a bare GPU image), the source tree is used through a shadow package in a temporary folder
# (sharpguard.integrations lives in the top-level folder integrations/); nothing is built or downloaded.
# Wheels carried in .whl/ (pytorch_optimizer, say, for a machine without it) are installed offline into
# that folder first. The run is stopped after $GPU_CHECK_TIMEOUT seconds (default 480); the script writes
# its section after every part, so a stopped run keeps what it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    PY=.venv/bin/python
else
    PY=python3
fi
site=$(mktemp -d "${TMPDIR:-/tmp}/sharpguard-gpu-check.XXXXXX")
trap 'rm -rf "$site"' EXIT
paths=""
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/wheels" .whl/*.whl
    paths="$site/wheels"
fi
if [ -n "${GPU_CHECK_SHADOW:-}" ] || ! PYTHONPATH="$paths${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import sharpguard.integrations" >/dev/null 2>&1; then
    mkdir -p "$site/src/sharpguard"
    for f in "$root"/sharpguard/*; do
        ln -s "$f" "$site/src/sharpguard/"
    done
    ln -s "$root/integrations" "$site/src/sharpguard/integrations"
    paths="$site/src${paths:+:$paths}"
    echo "gpu_check.sh: sharpguard from the source tree ($root)" >&2
fi
export PYTHONPATH="$paths${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
tests_rc=0
# On a GPU: the correctness checks first, as tests (tests/gpu, skipped only without CUDA), then the report.
if [[ " $* " != *" --cpu "* ]]; then
    if "$PY" -c "import pytest, hypothesis" >/dev/null 2>&1; then
        "$PY" -m pytest tests/gpu -m "not slow" -q -p no:cacheprovider
        tests_rc=$?
    else
        echo "gpu_check.sh: pytest (with hypothesis) is not importable here; the tests in tests/gpu did not run" >&2
    fi
fi
timeout --signal=INT --kill-after=30 "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
set -e
[ "$rc" -eq 124 ] && echo "gpu_check.sh: stopped after ${GPU_CHECK_TIMEOUT:-480} s; the section holds the parts that finished" >&2
[ "$rc" -eq 0 ] && [ "$tests_rc" -ne 0 ] && rc=$tests_rc
exit "$rc"
