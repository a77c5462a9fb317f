#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, made on the lent NVIDIA GPU (an H200 in this project) through the device tool, one part
# per call (each well under its 10-minute limit; 30 device minutes a session in all):
#   here, once:        benchmarks/gpu/fetch_wheels.sh
#   device run:        command="benchmarks/gpu/run.sh PART", carry=[".whl"]
# then copy the returned files into docs/benchmarks/ (JSON lines are appended per run).
# Parts, in the order to spend a session's device time on them:
#   check          Inductor's fused kernels; trainer on CUDA: tiny DDPM, compiled, 2 NaN steps skipped (~3 min)
#   train-cifar32  benchmarks/train_step.py, DDPM CIFAR-10 net, batches 128 and 512, bf16 loss check
#   train-256      the 256 net, batch 16 (batch 32: PART=train-256-b32)
#   deepspeed      benchmarks/deepspeed_memory.py: ddpm_256 and pixelcnn_cifar32, DDP vs ZeRO-2
#   sampling       benchmarks/sampling.py: DDIM-50 and DDPM-1000, both nets
#   loader         benchmarks/loader.py: 1-16 workers, ours vs ImageFolder
set -euo pipefail
cd "$(dirname "$0")/../.."
part=${1:?usage: benchmarks/gpu/run.sh check|train-cifar32|train-256|train-256-b32|deepspeed|sampling|loader}
out=${OUT:-/tmp/gpu-out}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "run.sh: no NVIDIA GPU here (nvidia-smi finds none); run it on the GPU machine (device tool)" >&2
    exit 2
fi
if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "run.sh: no wheels in .whl/; run benchmarks/gpu/fetch_wheels.sh first and carry .whl" >&2
    exit 2
fi
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/gpu.txt"
python3 -c "import torch, diffusers, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"
case "$part" in
check)
    python3 benchmarks/fusion_check.py --channels 256 | tee "$out/fusion_check.txt"
    python3 -m data_prep.cli digits /tmp/digits
    GENPIPE_FAULTS="nan_at_steps=30,31" python3 -m launch.cli local configs/tiny/ddpm.yaml run_dir=/tmp/check \
        data.shards=/tmp/digits/train data.eval_shards=/tmp/digits/test wandb.mode=disabled \
        train.max_steps=200 train.log_every_steps=10 train.compile=true train.mixed_precision=bf16 \
        2>&1 | tail -40
    cp /tmp/check/metrics.jsonl "$out/check_metrics.jsonl"
    ;;
train-cifar32)
    python3 benchmarks/train_step.py --networks cifar32 --loss-check 400 \
        --out "$out/train_step_h100.jsonl" --profile "$out/train_step_profile.txt"
    ;;
train-256|train-256-b32)
    batch=16; [ "$part" = train-256-b32 ] && batch=32
    python3 benchmarks/train_step.py --networks 256 --batches "$batch" --steps 30 --warmup 5 \
        --out "$out/train_step_h100.jsonl" --profile "$out/train_step_profile.txt"
    ;;
deepspeed)
    python3 benchmarks/deepspeed_memory.py --steps 200 --nproc 1 --synthetic-images 1024 \
        --out "$out/deepspeed_memory_h100.jsonl"
    ;;
sampling)
    python3 benchmarks/sampling.py --networks cifar32,256 --batch cifar32=256 --batch 256=4 \
        --out "$out/sampling_h100.jsonl"
    ;;
loader)
    python3 benchmarks/loader.py --images 4000 --workers 1,2,4,8,16 --batch 64 \
        --out "$out/loader_h100.jsonl"
    ;;
*)
    echo "run.sh: unknown part '$part'" >&2
    exit 2
    ;;
esac
