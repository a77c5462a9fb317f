#!/usr/bin/env bash
# The README's first command: install, prepare the embedded digits, train the tiny DDPM on CPU,
# and write a sample grid. Re-running it resumes/finishes the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
[ -f data/digits/train/manifest.json ] || data-prep digits data/digits
launch local configs/tiny/ddpm.yaml "$@"
launch sample runs/tiny_ddpm --n 64 --out runs/tiny_ddpm/grid.png --seed 0
echo "quickstart: samples in runs/tiny_ddpm/grid.png, metrics in runs/tiny_ddpm/metrics.jsonl"
