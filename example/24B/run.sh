#!/usr/bin/env bash
# MAGI-1 24B example, as the official example/24B/run.sh: torchrun with one process per visible GPU
# (the shipped 24B configs use cp_size 8, i.e. 8 GPUs), i2v of example/assets/image.jpeg, "Good Boy".
#
#   python -m magi.download 24B_distill_quant --dir downloads/   # once
#   CONFIG=example/24B/24B_distill_quant_config.json IMAGE_PATH=my.jpg bash example/24B/run.sh
#
# Override with environment variables: CONFIG, MODE, PROMPT, IMAGE_PATH (i2v, default
# example/assets/image.jpeg: put an image there or point IMAGE_PATH at one), PREFIX_VIDEO_PATH
# (v2v), OUTPUT_PATH, GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. On 8 x RTX 4090
# the official README recommends pp_size 2, cp_size 4. Extra arguments go to `python -m magi.infer`.
set -euo pipefail

MAGI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_NAME=24B
DEFAULT_CONFIG=example/24B/24B_base_config.json
DEFAULT_MODE=i2v
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi > /dev/null; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}
export GPUS_PER_NODE="${GPUS_PER_NODE:-$(count_gpus)}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_ALGO="${NCCL_ALGO:-^NVLS}"
source "$MAGI_ROOT/example/launch.sh"
