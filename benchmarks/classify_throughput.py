"""Zero-shot classification throughput: images embedded per second, as `vlcap classify` does it.

    python benchmarks/classify_throughput.py ../shared/data/hw3_p1_val/images \
        --model tiny_clip.pt --model random:ViT-L-14 --limit random:ViT-L-14=16

A model is what `--clip-model` takes (OpenAI name or local OpenAI-format file), or `random:ARCH`:
open_clip's architecture with random weights (same compute as the pretrained model, no download).
Prints one table; "2,500 images (s)" extrapolates to the course's 2,500 images; peak memory is
the process's max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""
import argparse
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from vlcap.apps import classify as zs
from vlcap.core.eval.clip import Clip, load_clip
from vlcap.core.data import find_images


def build(spec, device):
    if not spec.startswith("random:"):
        return load_clip(spec, device=device)
    import open_clip
    from open_clip.transform import image_transform
    arch = spec.removeprefix("random:")
    model = open_clip.create_model(arch, pretrained=None, device=device).eval()
    if device.type == "cuda":
        model.half()  # as load_clip does for OpenAI weights on CUDA
    return Clip(model, image_transform(model.visual.image_size, is_train=False),
                open_clip.get_tokenizer(arch), device, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images_dir")
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--limit", action="append", default=[], metavar="MODEL=N", help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    limits = dict(item.rsplit("=", 1) for item in args.limit)
    paths = find_images(args.images_dir)
    device = torch.device(args.device)
    progress_console = Console(stderr=True)  # progress bars on stderr, the table alone on stdout
    table = Table(title=f"zero-shot image embedding, {device.type}, {torch.get_num_threads()} threads")
    for column in ("model", "images", "seconds", "images/s", "2,500 images (s)", "peak memory"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for spec in args.model:
        clip = build(spec, device)
        subset = paths[:int(limits.get(spec, len(paths)))]
        zs.encode_images(clip, subset[:2], batch_size=2, console=progress_console)  # warm-up: first-call allocations, kernel selection
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        zs.encode_images(clip, subset, batch_size=args.batch_size, console=progress_console)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        table.add_row(spec, str(len(subset)), f"{seconds:.1f}", f"{len(subset) / seconds:.1f}",
                      f"{2500 * seconds / len(subset):.0f}", f"{peak / 2**20:,.0f} MiB")
        del clip
    Console().print(table)


if __name__ == "__main__":
    main()
