#!/usr/bin/env bash
# Offline tiny demo: random tiny weights in the official checkpoint layout, the whole magi path on
# CPU (T5 -> DiT sampling -> VAE decode -> mp4). The video is noise (the weights are random); it
# shows that everything runs without downloads. Works from any directory:
#
#   bash example/tiny/run.sh                       # writes example/tiny/output_t2v.mp4
#   OUTPUT_PATH=/tmp/x.mp4 PROMPT="A cat" bash example/tiny/run.sh --seed 7
#
# The first run writes the checkpoint to example/tiny/checkpoints/ (seconds). Extra arguments go to
# `python -m magi.infer`.
set -euo pipefail

MAGI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUTPUT_PATH="${OUTPUT_PATH:-$MAGI_ROOT/example/tiny/output_t2v.mp4}"
[[ "$OUTPUT_PATH" = /* ]] || OUTPUT_PATH="$PWD/$OUTPUT_PATH"  # relative to where it was called from
PROMPT="${PROMPT:-Good Boy}"
# The config's paths (example/tiny/checkpoints/...) are relative to the repository root.
cd "$MAGI_ROOT"

CHECKPOINTS=example/tiny/checkpoints
if [[ ! -f "$CHECKPOINTS/special_tokens.npz" ]]; then
    python scripts/make_tiny_checkpoint.py --config example/tiny/config.json --out "$CHECKPOINTS" --force
fi

export SPECIAL_TOKEN_PATH="$MAGI_ROOT/$CHECKPOINTS/special_tokens.npz"
export PAD_HQ="${PAD_HQ:-1}"
export PAD_DURATION="${PAD_DURATION:-1}"
exec python -m magi.infer --config example/tiny/config.json --mode t2v --prompt "$PROMPT" \
    --output_path "$OUTPUT_PATH" --device cpu "$@"
