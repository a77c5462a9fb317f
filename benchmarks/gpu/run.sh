#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, made on the lent NVIDIA GPU (an H200 in this project) through the device tool, one part
# per call (each well under its 10-minute limit; 30 device minutes a session in all):
#   here, once:        benchmarks/gpu/fetch_wheels.sh
#   device run:        command="benchmarks/gpu/run.sh PART[:SECONDS] ...", carry=[".whl"]
# Several parts run one after the other in one call (a lease's start costs minutes); PART:SECONDS
# stops that part after SECONDS (GNU timeout) and goes on with the next, so one slow part cannot
# eat the call: every benchmark appends its JSON lines row by row, and what was written comes back.
# Logs and results land in $OUT (default /tmp/gpu-out); copy them into docs/benchmarks/.
# Parts, in the order to spend a session's device time on them (times seen on the H200, 2026-11-30:
# each compiled row costs 80-120 s of cold Inductor compiling, the machine's start 1-2 minutes):
#   check          Inductor's fused kernels; trainer on CUDA: tiny DDPM, compiled, 2 NaN steps skipped (~2 min)
#   train-256      the 256 net, batch 16, then ours compiled in NHWC (--channels-last) (~7 min;
#                  train-256-b32: batch 32)
#   train-cifar32  benchmarks/train_step.py, DDPM CIFAR-10 net, batches 128 and 512 (CIFAR32_BATCHES),
#                  bf16 loss check (LOSS_CHECK_STEPS, default 400), then ours compiled NHWC (~9 min)
#   deepspeed      benchmarks/deepspeed_memory.py: ddpm_256 and pixelcnn_cifar32, DDP vs ZeRO-2
#   sampling       benchmarks/sampling.py: DDIM-50 and DDPM-1000, both nets (SAMPLING_NETWORKS)
#   loader         benchmarks/loader.py: 1-16 workers, ours vs ImageFolder
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "usage: benchmarks/gpu/run.sh PART[:SECONDS] ... (PART: check|train-cifar32|train-256|train-256-b32|deepspeed|sampling|loader)" >&2; exit 2; }
for spec in "$@"; do
    case "${spec%%:*}" in
    check|train-cifar32|train-256|train-256-b32|deepspeed|sampling|loader) ;;
    *) echo "run.sh: unknown part '${spec%%:*}' (check|train-cifar32|train-256|train-256-b32|deepspeed|sampling|loader)" >&2; exit 2 ;;
    esac
done
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
# the card in the result files' names: "NVIDIA H200" -> h200
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^NVIDIA //; s/ .*//' | tr 'A-Z' 'a-z')
python3 -c "import torch, diffusers, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"
run_part() {
    local part=$1
    case "$part" in
    check)
        python3 benchmarks/fusion_check.py --channels 256 | tee "$out/fusion_check.txt"
        python3 -m data_prep.cli digits /tmp/digits
        GENPIPE_FAULTS="nan_at_steps=30,31" python3 -m launch.cli local configs/tiny/ddpm.yaml run_dir=/tmp/check \
            data.shards=/tmp/digits/train data.eval_shards=/tmp/digits/test wandb.mode=disabled \
            train.max_steps=120 train.log_every_steps=10 train.compile=true train.mixed_precision=bf16 \
            2>&1 | tail -40
        cp /tmp/check/metrics.jsonl "$out/check_metrics.jsonl"
        ;;
    train-cifar32)
        python3 benchmarks/train_step.py --networks cifar32 --batches "${CIFAR32_BATCHES:-128,512}" \
            --loss-check "${LOSS_CHECK_STEPS:-400}" \
            --out "$out/train_step_${gpu}.jsonl" --profile "$out/train_step_profile.txt"
        python3 benchmarks/train_step.py --networks cifar32 --batches "${CIFAR32_BATCHES:-128,512}" \
            --modes compiled --channels-last --out "$out/train_step_${gpu}.jsonl"
        ;;
    train-256|train-256-b32)
        batch=16; [ "$part" = train-256-b32 ] && batch=32
        python3 benchmarks/train_step.py --networks 256 --batches "$batch" --steps 30 --warmup 5 \
            --out "$out/train_step_${gpu}.jsonl" --profile "$out/train_step_profile.txt"
        # cuDNN's bf16 kernels on Hopper are NHWC: in NCHW a quarter of the step is transposes
        python3 benchmarks/train_step.py --networks 256 --batches "$batch" --steps 30 --warmup 5 \
            --modes compiled --channels-last --out "$out/train_step_${gpu}.jsonl"
        ;;
    deepspeed)
        python3 benchmarks/deepspeed_memory.py --steps 200 --nproc 1 --synthetic-images 1024 \
            --out "$out/deepspeed_memory_${gpu}.jsonl"
        ;;
    sampling)
        python3 benchmarks/sampling.py --networks "${SAMPLING_NETWORKS:-cifar32,256}" --batch cifar32=256 --batch 256=4 \
            --out "$out/sampling_${gpu}.jsonl"
        ;;
    loader)
        python3 benchmarks/loader.py --images 4000 --workers 1,2,4,8,16 --batch 64 \
            --out "$out/loader_${gpu}.jsonl"
        ;;
    esac
}

status=0
for spec in "$@"; do
    part=${spec%%:*} seconds=
    [ "$spec" != "$part" ] && seconds=${spec#*:}
    echo "=== $part ${seconds:+(at most ${seconds} s) }$(date -u +%H:%M:%S)" | tee -a "$out/parts.txt"
    start=$SECONDS
    if [ -n "$seconds" ]; then
        export -f run_part; export out gpu
        rc=0; timeout --signal=TERM --kill-after=10 "$seconds" bash -c "set -euo pipefail; run_part $part" || rc=$?
    else
        rc=0; (set -euo pipefail; run_part "$part") || rc=$?
    fi
    echo "=== $part: exit $rc after $((SECONDS - start)) s" | tee -a "$out/parts.txt"
    [ $rc -eq 0 ] || status=$rc
done
exit $status

