"""CLIPScore throughput: vlcap's batched scoring vs the course's one-image-at-a-time loop.

Both run the same ViT-B/32 architecture (random weights unless --clip-model names a real
checkpoint: speed does not depend on the weights) on the same images, on the GPU when there is
one, and the table puts the two side by side from one run:

    python benchmarks/clipscore_speed.py --images ../shared/data/flickr8k_1k/images_val --count 1789
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from vlcap.core.eval.clip import load_clip
from vlcap.core.data import IMAGE_SUFFIXES, load_image
from vlcap.core.eval.evaluation import clip_scores


def random_vit_b32(path):
    """ViT-B/32 with random weights, saved as a state dict with OpenAI's key names."""
    import open_clip
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


def course_loop(clip, paths, captions):
    """The course's CLIPScore.__call__: preprocess, encode and compare one image at a time."""
    total = 0.0
    for path, caption in zip(paths, captions):
        image = clip.model.encode_image(clip.preprocess(load_image(path)).unsqueeze(0).to(clip.device, clip._dtype()))
        text = clip.model.encode_text(clip.tokenizer([caption]).to(clip.device))
        total += 2.5 * max(F.cosine_similarity(image, text).item(), 0)
    return total / len(paths)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (cycled to --count)")
    parser.add_argument("--count", type=int, default=1789, help="images to score (the course's val set: 1,789)")
    parser.add_argument("--clip-model", help="OpenAI CLIP name or file (default: a random ViT-B/32)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = {f"img{i}": files[i % len(files)] for i in range(args.count)}
    captions = {stem: "a photo of a dog running on the grass" for stem in paths}
    with tempfile.TemporaryDirectory() as tmp:
        clip = load_clip(args.clip_model or str(random_vit_b32(Path(tmp) / "vit-b32.pt")))
    clip_scores(dict(list(captions.items())[:8]), paths, clip, show_progress=False)  # warm-up
    batched, batched_s = timed(lambda: clip_scores(captions, paths, clip, batch_size=args.batch_size,
                                                   show_progress=False).score)
    loop, loop_s = timed(lambda: course_loop(clip, list(paths.values()), list(captions.values())))
    table = Table(title=f"CLIPScore, {args.count:,} images, ViT-B/32 on {clip.device}")
    for column in ("scorer", "seconds", "images/s", "mean CLIPScore"):
        table.add_column(column, justify="left" if column == "scorer" else "right")
    for name, value, seconds in (("course loop (1 image at a time)", loop, loop_s),
                                 (f"vlcap (batch {args.batch_size})", batched, batched_s)):
        table.add_row(name, f"{seconds:.1f}", f"{args.count / seconds:.0f}", f"{value:.6f}")
    Console().print(table)
    Console().print(f"speed-up: {loop_s / batched_s:.1f}x")


if __name__ == "__main__":
    main()
