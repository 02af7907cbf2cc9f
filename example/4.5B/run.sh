#!/usr/bin/env bash
# MAGI-1 4.5B example, as the official example/4.5B/run.sh: one GPU, plain python, t2v "Good Boy".
#
#   python -m magi.download 4.5B_base --dir downloads/   # once; or point the config at your weights
#   bash example/4.5B/run.sh                             # from any directory
#
# Override with environment variables: CONFIG (e.g. example/4.5B/4.5B_distill_config.json), MODE,
# PROMPT, IMAGE_PATH (i2v), PREFIX_VIDEO_PATH (v2v), OUTPUT_PATH, GPUS_PER_NODE (> 1 or NNODES > 1
# launches torchrun; the config's pp_size * cp_size must equal the process count). Extra
# arguments are passed to `python -m magi.infer` (e.g. --seed 7 --num_frames 48).
set -euo pipefail

MAGI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL_NAME=4.5B
DEFAULT_CONFIG=example/4.5B/4.5B_base_config.json
DEFAULT_MODE=t2v
export GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
source "$MAGI_ROOT/example/launch.sh"
