#!/usr/bin/env bash
# Zero-shot CLIP classification: bash hw3_1.sh IMAGES_DIR id2label.json OUTPUT.csv
# The CLIP model is $VLCAP_CLIP_MODEL (an OpenAI name or a local OpenAI-format file), else ViT-L/14.
# vlcap is found beside this script, installed or not.
PYTHONPATH="$(dirname "$0")${PYTHONPATH:+:$PYTHONPATH}" python3 -m vlcap classify "$1" --labels "$2" --out "$3"
