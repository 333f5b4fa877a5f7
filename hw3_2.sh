#!/bin/bash
# Course problem 2: caption every image in a folder.
#   bash hw3_2.sh IMAGES_DIR OUT_JSON DECODER_WEIGHTS
# The trained checkpoint is $VLCAP_CHECKPOINT if set, else checkpoints/best.safetensors beside
# this script. Decoding: beam search with 3 beams (override with $VLCAP_CAPTION_ARGS, e.g.
# VLCAP_CAPTION_ARGS="--decoding greedy"). Needs vlcap installed (pip install -e .): its
# decoding strategies are plugins found through the installed entry points.
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash $0 IMAGES_DIR OUT_JSON DECODER_WEIGHTS" >&2
    exit 2
fi
checkpoint="${VLCAP_CHECKPOINT:-$(dirname "$0")/checkpoints/best.safetensors}"
# shellcheck disable=SC2086  # VLCAP_CAPTION_ARGS is a list of options, split on purpose
python3 -m vlcap caption "$1" --checkpoint "$checkpoint" --decoder-weights "$3" --out "$2" \
    --decoding beam --num-beams 3 ${VLCAP_CAPTION_ARGS:-}
