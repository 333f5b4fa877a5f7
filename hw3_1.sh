#!/bin/bash
# Course problem 1: zero-shot CLIP classification of every image in a folder.
#   bash hw3_1.sh IMAGES_DIR ID2LABEL_JSON OUT_CSV
# The CLIP model is $VLCAP_CLIP_MODEL (an OpenAI name or a local OpenAI-format file), else ViT-L/14.
# vlcap is found beside this script, installed or not.
set -euo pipefail
if [ "$#" -ne 3 ]; then
    echo "usage: bash $0 IMAGES_DIR ID2LABEL_JSON OUT_CSV" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 -m vlcap classify "$1" --labels "$2" --out "$3"
