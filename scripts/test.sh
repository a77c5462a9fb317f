#!/usr/bin/env bash
# The README's second command: install everything (the local two-node Slurm cluster too) and run
# the tests.
#   scripts/test.sh            the quick tier: unit tests and one end-to-end test of each capability
#   scripts/test.sh --full     the full tier: every test (what CI runs)
# Other arguments go to pytest (scripts/test.sh -k resume, scripts/test.sh --full tests/test_fsdp.py).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=quick
args=()
for arg in "$@"; do
    if [ "$arg" = "--full" ]; then tier=full; else args+=("$arg"); fi
done
start=$(date +%s)
scripts/install.sh --dev
if scripts/slurm_cluster.sh status >/dev/null 2>&1; then
    :
elif [ "$(id -u)" -eq 0 ]; then
    scripts/slurm_cluster.sh start
else
    # The cluster's daemons need root; everything else runs. One line says what is left out.
    export GENPIPE_NO_SLURM="the local cluster needs root to start (sudo scripts/slurm_cluster.sh start, then run this again)"
    echo "test.sh: not root and no Slurm cluster up: the tests marked slurm are skipped; $GENPIPE_NO_SLURM"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
python3 -m pytest -q --tier "$tier" "${args[@]}" || status=$?
echo "test.sh: $tier tier, $(( $(date +%s) - start )) s with installs, exit status $status"
exit "$status"
