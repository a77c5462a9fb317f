#!/usr/bin/env bash
# The README's second command: install everything (Slurm test cluster included) and run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
if [ -x scripts/slurm_cluster.sh ]; then
    scripts/slurm_cluster.sh start
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q "$@"
