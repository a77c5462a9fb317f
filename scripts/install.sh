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

# Already installed from this checkout (editable), every requirement met: nothing to download
# or build, so nothing is run (pip would take ~10 s to find that out).
if "$PYTHON" - "$PWD" "$extra" >/dev/null 2>&1 <<'CHECK'
import importlib.metadata as metadata, json, sys, tomllib
from pathlib import Path
from packaging.requirements import Requirement

root, extra = Path(sys.argv[1]), sys.argv[2]
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
here = {"url": root.resolve().as_uri(), "dir_info": {"editable": True}}
ours = next(d for d in metadata.distributions(name=project["name"])
            if json.loads(d.read_text("direct_url.json") or "{}") == here)
assert ours.version == project["version"] and {e.name for e in ours.entry_points} >= set(project["scripts"])
wanted = project["dependencies"] + (project["optional-dependencies"]["dev"] + ["torchvision"] if extra else [])
for text in wanted:
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate():
        assert requirement.specifier.contains(metadata.version(requirement.name), prereleases=True), text
CHECK
then
    echo "install: genpipe${extra} already installed from $PWD, every requirement met"
    exit 0
fi

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
