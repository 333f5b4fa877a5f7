"""Time `vlcap caption` end to end on a folder of images, as the course's hw3_2.sh runs it: load a
checkpoint, read and preprocess every image, encode, decode, write the JSON. Random weights (the
same compute as trained ones): a lora checkpoint over a random GPT-2-size decoder file.

    python benchmarks/caption_timing.py --images 1404 --encoder vit_large_patch14_clip_224 --device cuda

The images are synthetic PNGs (the course's test set has 1,404; its limit is 40 minutes). Every
caption is --tokens long (beam search's ``min_length`` = ``max_length``; a random decoder would
otherwise end at arbitrary points): 13 by default, the course captions' 12.3 tokens plus the end
token. Prints one markdown row: seconds (checkpoint load and the whole folder), images/s, peak
memory.
"""
import argparse
import dataclasses
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

from vlcap.apps.synthetic import draw
from vlcap.core import config as config_lib
from vlcap.core.infer.captioning import caption_folder
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.checkpoint import save_checkpoint
from vlcap.core.model.course_weights import save_course_weights
from vlcap.core.plugins import registry as load_registry
from vlcap.core.runtime import dtype_name, inference_dtype, resolve_device


def write_images(folder, count):
    rng = random.Random(0)
    folder.mkdir()
    for i in range(count):
        draw(rng.choice(["red", "blue", "green"]), rng.choice(["circle", "square", "triangle"]), "middle",
             rng).save(folder / f"{i:05d}.png")


def write_checkpoint(folder, encoder, size, registry):
    """A lora checkpoint (random, non-zero LoRA) and its random ``decoder_model.bin``."""
    decoder = {} if size == "tiny" else {"decoder": config_lib.to_dict(config_lib.RunConfig())["model"]["decoder"]}
    cfg = config_lib.resolve("tiny", overrides=[{"model": {"encoder": encoder or "test_vit", **decoder},
                                                 "peft": {"method": "lora"}}])
    built = build_captioner(cfg, registry)
    with torch.no_grad():
        for name, p in built.captioner.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * p.size(-1) ** -0.5 if p.dim() >= 2 else torch.zeros_like(p))
    weights = folder / "decoder_model.bin"
    save_course_weights(built.captioner.decoder, weights)
    model = dataclasses.replace(built.config.model, decoder_weights=str(weights), random_decoder=False)
    path = folder / "ckpt.safetensors"
    save_checkpoint(path, built.captioner, built.method, dataclasses.replace(built.config, model=model),
                    tokenizer_for(cfg), registry)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1404)
    parser.add_argument("--encoder", help="timm ViT (default: the tiny preset's test_vit)")
    parser.add_argument("--size", choices=["tiny", "gpt2"], default="gpt2", help="decoder: GPT-2 small or the tiny one")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=13, help="tokens per caption")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=config_lib.PRECISIONS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    registry = load_registry()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "images", args.images)
        checkpoint = write_checkpoint(tmp, args.encoder, args.size, registry)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        result = caption_folder(tmp / "images", checkpoint, tmp / "pred.json", registry, device=device,
                                strategy="beam", options={"num_beams": args.num_beams, "min_length": args.tokens},
                                max_length=args.tokens,
                                batch_size=args.batch_size, precision=args.precision)
        seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("| encoder | images | beams | tokens per caption | precision | device | seconds | images/s | peak memory |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    print(f"| {args.encoder or 'test_vit'} | {len(result.predictions):,} | {args.num_beams} | {args.tokens} "
          f"| {dtype_name(inference_dtype(args.precision, device))} | {device} | {seconds:.1f} "
          f"| {len(result.predictions) / seconds:.2f} | {peak / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
