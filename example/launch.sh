# Shared body of example/4.5B/run.sh and example/24B/run.sh: sourced by them, not run directly.
# The caller sets MAGI_ROOT, DEFAULT_CONFIG, DEFAULT_MODE, MODEL_NAME and GPUS_PER_NODE's default,
# plus any model-specific environment, then sources this file with its own arguments ("$@"),
# which are passed on to `python -m magi.infer`.

# Paths given in CONFIG, IMAGE_PATH, PREFIX_VIDEO_PATH and OUTPUT_PATH are relative to where the
# script was called from when they exist there (OUTPUT_PATH: always), else to the repository root.
from_caller() {
    if [[ -n "$1" && "$1" != /* && ( -e "$PWD/$1" || "${2:-}" == always ) ]]; then
        echo "$PWD/$1"
    else
        echo "$1"
    fi
}
CONFIG="$(from_caller "${CONFIG:-}")"
IMAGE_PATH="$(from_caller "${IMAGE_PATH:-}")"
PREFIX_VIDEO_PATH="$(from_caller "${PREFIX_VIDEO_PATH:-}")"
OUTPUT_PATH="$(from_caller "${OUTPUT_PATH:-}" always)"
# Config paths (./downloads/...) are relative to the working directory, as officially.
cd "$MAGI_ROOT"

export MASTER_ADDR="${MASTER_ADDR:-localhost}"
export MASTER_PORT="${MASTER_PORT:-6009}"
export NNODES="${NNODES:-1}"
export NODE_RANK="${NODE_RANK:-0}"
export PAD_HQ="${PAD_HQ:-1}"
export PAD_DURATION="${PAD_DURATION:-1}"
# magi.download puts special_tokens.npz into downloads/ (the official place is example/assets/).
if [[ -z "${SPECIAL_TOKEN_PATH:-}" && ! -f example/assets/special_tokens.npz \
      && -f downloads/special_tokens.npz ]]; then
    export SPECIAL_TOKEN_PATH="$MAGI_ROOT/downloads/special_tokens.npz"
fi
export OFFLOAD_T5_CACHE="${OFFLOAD_T5_CACHE:-true}"
export OFFLOAD_VAE_CACHE="${OFFLOAD_VAE_CACHE:-true}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.9;9.0}"

CONFIG="${CONFIG:-$DEFAULT_CONFIG}"
MODE="${MODE:-$DEFAULT_MODE}"
PROMPT="${PROMPT:-Good Boy}"
OUTPUT_PATH="${OUTPUT_PATH:-example/assets/output_${MODEL_NAME}_${MODE}.mp4}"

ARGS=(--config_file "$CONFIG" --mode "$MODE" --prompt "$PROMPT" --output_path "$OUTPUT_PATH")
if [[ "$MODE" == "i2v" ]]; then
    if [[ -z "$IMAGE_PATH" && ! -f example/assets/image.jpeg ]]; then
        echo "error: MODE=i2v needs IMAGE_PATH=<image>" \
            "(example/assets/image.jpeg, the official example, is not shipped with magi)" >&2
        exit 2
    fi
    ARGS+=(--image_path "${IMAGE_PATH:-example/assets/image.jpeg}")
fi
if [[ "$MODE" == "v2v" ]]; then
    if [[ -z "$PREFIX_VIDEO_PATH" && ! -f example/assets/prefix_video.mp4 ]]; then
        echo "error: MODE=v2v needs PREFIX_VIDEO_PATH=<prefix video>" \
            "(example/assets/prefix_video.mp4, the official example, is not shipped with magi)" >&2
        exit 2
    fi
    ARGS+=(--prefix_video_path "${PREFIX_VIDEO_PATH:-example/assets/prefix_video.mp4}")
fi

if (( GPUS_PER_NODE > 1 || NNODES > 1 )); then
    exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        -m magi.infer "${ARGS[@]}" "$@"
fi
export WORLD_SIZE=1 RANK=0 LOCAL_RANK=0
exec python -m magi.infer "${ARGS[@]}" "$@"
