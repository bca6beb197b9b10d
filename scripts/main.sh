#!/usr/bin/env bash
# The main job: `sharpguard study` on the bundled digits data (sets up .venv first).
# Extra arguments go to `sharpguard study` (try --help, or --quick for a one-minute run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MPLBACKEND=Agg
exec .venv/bin/sharpguard study "$@"
