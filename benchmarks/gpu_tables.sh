#!/usr/bin/env bash
# The GPU tables of docs/benchmarks.md, prepared to run once when a GPU is lent (random weights,
# the same compute as trained ones; synthetic images and, unless CAPTIONS names the course's
# train.json, random captions of 12 +-50% tokens). Two parts, each well under 10 minutes on one
# recent GPU, so each fits one command:
#
#   bash benchmarks/gpu_tables.sh train    # training throughput, both stacks, with/without the cache,
#                                          # ViT-B/16 (+ ablations) and the course's CLIP ViT-L/14, bf16
#   bash benchmarks/gpu_tables.sh infer    # decoding vs HF generate; `vlcap caption` of 1,404 images
#                                          # with beam 3 (ViT-L/14); zero-shot classification of 2,500
#                                          # images with ViT-L/14 (the course's limits: 40 and 10 min)
#
# Results go to $OUT (default gpu_tables/) as markdown, one file per table, with nvidia-smi's
# description of the GPU. SMOKE=1 runs the same plumbing at tiny sizes on any device (a check of
# this script, not a measurement). Needs `pip install -e ".[bench]"` (checked first, in one line).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-gpu_tables}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
part=${1:-all}
python() { "${PYTHON:-python3}" "$@"; }
python -c "import torch, timm, transformers, peft, open_clip, vlcap" 2>/dev/null ||
    { echo "gpu_tables.sh: install the benchmark extras first: pip install -e \".[bench]\"" >&2; exit 1; }

if [[ ${SMOKE:-0} == 1 ]]; then
    FULL=tiny LARGE=tiny DECODER=tiny VIT_B=test_vit VIT_L=test_vit CLIP=tiny STEPS=1 ROUNDS=1 BATCH=4 IMAGES=8
    CAPTION_IMAGES=4 CLASSIFY_IMAGES=4
else
    FULL=full LARGE=large DECODER=gpt2 VIT_B=vit_base_patch16_224 VIT_L=vit_large_patch14_clip_224 CLIP=ViT-L-14
    STEPS=10 ROUNDS=2 BATCH=32 IMAGES=64 CAPTION_IMAGES=1404 CLASSIFY_IMAGES=2500
fi
captions=()
if [[ -n ${CAPTIONS:-} && -f ${CAPTIONS:-} ]]; then captions=(--captions "$CAPTIONS" --length-buckets); fi

describe() {
    { date -u; nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
      python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/machine.txt"
}

train() {
    # --amp auto: bf16 on a GPU with native bf16 (as train.amp=auto), fp16 + loss scaling below it.
    python benchmarks/train_throughput.py --device "$DEVICE" --size "$FULL" --batch-size "$BATCH" --steps "$STEPS" \
        --warmup 2 --rounds "$ROUNDS" --ablations "${captions[@]}" > "$OUT/train_vit_b16.md"
    python benchmarks/train_throughput.py --device "$DEVICE" --size "$LARGE" --batch-size "$BATCH" --steps "$STEPS" \
        --warmup 2 --rounds "$ROUNDS" "${captions[@]}" > "$OUT/train_vit_l14.md"
}

infer() {
    python benchmarks/decoding.py --device "$DEVICE" --size "$DECODER" --encoder "$VIT_B" \
        --images "$IMAGES" --max-length 10 --rounds 3 > "$OUT/decoding.md"
    python benchmarks/caption_timing.py --device "$DEVICE" --size "$DECODER" --encoder "$VIT_L" --images "$CAPTION_IMAGES" \
        --num-beams 3 > "$OUT/caption_1404.md"
    images=$(mktemp -d)
    scratch=$(mktemp -d)
    python - "$images" "$CLASSIFY_IMAGES" <<'EOF'
import random, sys
from pathlib import Path
from vlcap.apps.synthetic import draw
rng = random.Random(0)
for i in range(int(sys.argv[2])):  # named {class}_{n}.png like the course's set
    draw(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), "middle", rng).save(Path(sys.argv[1]) / f"{i % 50}_{i}.png")
EOF
    if [[ $CLIP == tiny ]]; then
        model=$scratch/tiny_clip.pt  # the test suite's tiny CLIP
        python -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_tiny_clip; write_tiny_clip('$model')"
    else
        model=random:$CLIP
    fi
    python benchmarks/classify_throughput.py "$images" --model "$model" --batch-size 128 --device "$DEVICE" > "$OUT/classify_2500.md"
    rm -rf "$images" "$scratch"
}

describe
case $part in
    train) train ;;
    infer) infer ;;
    all) train; infer ;;
    *) echo "usage: $0 train|infer|all" >&2; exit 2 ;;
esac
ls -l "$OUT"
