#!/bin/bash
# Course problem 2: caption every image in a folder.
#   bash hw3_2.sh IMAGES_DIR OUT_JSON DECODER_WEIGHTS
# The trained checkpoint is $VLCAP_CHECKPOINT if set, else checkpoints/best.safetensors beside
# this script. Decoding: beam search with 3 beams, unless $VLCAP_CAPTION_ARGS chooses its own
# with --decoding, --num-beams or --set num_beams=N (e.g. VLCAP_CAPTION_ARGS="--decoding greedy"
# or "--num-beams 5"); its other options are added (e.g. VLCAP_CAPTION_ARGS="--max-length 20").
# vlcap is found beside this script, installed or not (its built-in plugins need no installation).
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash $0 IMAGES_DIR OUT_JSON DECODER_WEIGHTS" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
checkpoint="${VLCAP_CHECKPOINT:-$here/checkpoints/best.safetensors}"
# The user's options, split on whitespace (no glob expansion). Each default is left out when the
# user chooses it, so the two never meet (`--decoding greedy --num-beams 3` is refused).
read -r -a user_args <<< "${VLCAP_CAPTION_ARGS:-}"
strategy=(--decoding beam)
beams=(--num-beams 3)
for arg in ${user_args[@]+"${user_args[@]}"}; do
    case "$arg" in
        --decoding | --decoding=*) strategy=() beams=() ;;
        --num-beams | --num-beams=* | num_beams=* | --set=num_beams=*) beams=() ;;
    esac
done
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 -m vlcap caption "$1" --checkpoint "$checkpoint" \
    --decoder-weights "$3" --out "$2" \
    ${strategy[@]+"${strategy[@]}"} ${beams[@]+"${beams[@]}"} ${user_args[@]+"${user_args[@]}"}
