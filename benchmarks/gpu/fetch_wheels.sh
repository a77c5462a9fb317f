#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for its Python 3.12 on x86-64.
# That machine has torch + CUDA, accelerate, triton, numpy, Pillow, huggingface_hub, safetensors,
# einops, ninja, psutil, py-cpuinfo, msgpack, pyyaml and regex, and reaches no package registry;
# the benchmarks need DeepSpeed, WebDataset, pydantic and diffusers on top (W&B and submitit are
# imported only by runs that log or submit, which the benchmarks do not). DeepSpeed publishes only
# a source archive: it is built here into a pure-Python wheel (its CUDA ops compile on first use).
#   benchmarks/gpu/fetch_wheels.sh        # then carry .whl (see benchmarks/gpu/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
download() {
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$@"
}
download pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing_extensions==4.16.0 hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 \
    diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python3 -m pip wheel --quiet --disable-pip-version-check --no-deps \
        --no-build-isolation -w .whl deepspeed==0.19.8
fi
ls -la .whl
du -sh .whl
