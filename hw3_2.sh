#!/bin/bash
# Course problem 2: caption every image in a folder.
#   bash hw3_2.sh IMAGES_DIR OUT_JSON DECODER_WEIGHTS
# The trained checkpoint is $VLCAP_CHECKPOINT if set, else checkpoints/best.safetensors beside
# this script. Decoding: beam search with 3 beams (options in $VLCAP_CAPTION_ARGS are added,
# e.g. VLCAP_CAPTION_ARGS="--max-length 20"). vlcap is found beside this script, installed or
# not (its built-in plugins need no installation).
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash $0 IMAGES_DIR OUT_JSON DECODER_WEIGHTS" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
checkpoint="${VLCAP_CHECKPOINT:-$here/checkpoints/best.safetensors}"
# shellcheck disable=SC2086  # VLCAP_CAPTION_ARGS is a list of options, split on purpose
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 -m vlcap caption "$1" --checkpoint "$checkpoint" \
    --decoder-weights "$3" --out "$2" --decoding beam --num-beams 3 ${VLCAP_CAPTION_ARGS:-}
