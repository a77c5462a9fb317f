#!/usr/bin/env bash
# Install the project and its dependencies into the current Python environment.
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh --dev    plus the test and benchmark tools
# Where no torch is installed yet, torch 2.13.0 is installed first: on this project's CPU
# machines pip takes the CPU build from the local wheel store. On a GPU machine, install the
# torch build matching its CUDA first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "install: no torch found; installing torch==2.13.0"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
"$PYTHON" -c "import torch, accelerate, deepspeed, webdataset, wandb, submitit; print(f'install: torch {torch.__version__}, accelerate {accelerate.__version__}, deepspeed {deepspeed.__version__}, wandb {wandb.__version__}')" 2>&1 | grep -v -i warn || true
if [ -n "$extra" ] && ! "$PYTHON" -m pip show torchvision >/dev/null 2>&1; then
    # benchmarks/loader.py's baseline (ImageFolder); the release built for the installed torch
    # (torch 2.M pairs with torchvision 0.M+15), without letting pip replace torch.
    version=$("$PYTHON" -c "import torch; print('0.%d.0' % (int(torch.__version__.split('.')[1]) + 15))")
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "torchvision==$version"
fi
