"""Naive full recompute vs. cached incremental decoding, side by side on one model and one set
of images: images/s, speed-up and peak memory per strategy and batch size.

    python benchmarks/decoding.py                      # tiny preset
    python benchmarks/decoding.py --size gpt2 --images 32 --max-length 12

Weights are random (timing only). The image encoder runs once, before timing: only decoding is
measured. The end token is disabled, so every caption runs to --max-length (the same, worst-case
work for both paths; a random decoder would otherwise stop at arbitrary points). Both paths must
produce the same tokens; the table says so per row.
"""
import argparse
import ctypes
import os
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vlcap.core import config as config_lib
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.infer.decoding import next_token_model
from vlcap.core.plugins import registry as load_registry
from vlcap.core.runtime import autocast, autocast_dtype, evaluating, resolve_device

SIZES = {
    "tiny": {},  # the tiny preset's 2-layer, 64-wide decoder
    "gpt2": {"model": {"decoder": config_lib.to_dict(config_lib.RunConfig())["model"]["decoder"]}},  # GPT-2 small
}
NO_END = -1  # an id no token has: captions never end early
STRATEGIES = [("greedy", {}), ("beam", {"num_beams": 3}), ("beam", {"num_beams": 5})]


class PeakMemory:
    """Peak memory above the starting level while the block runs: CUDA allocations on a GPU,
    the process's resident set (sampled every millisecond) on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self.start = self.highest = rss()
            self.running = True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while self.running:
            self.highest = max(self.highest, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.sampler.join()
            self.peak = max(self.highest, rss()) - self.start


def release_freed_memory():
    """Hand memory freed by earlier runs back to the OS (glibc keeps it otherwise), so a run's
    resident-set growth counts its own allocations rather than reusing its predecessor's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def rss():
    """Resident set size in bytes (Linux /proc; 0 elsewhere, and the memory column reads 0)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return 0
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_all(decoder, memories, strategy, config, cached, max_length, start_id, dtype, device):
    """Token lists for every image, batch by batch, and the seconds it took."""
    tokens = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        for memory in memories:
            model = next_token_model(decoder, memory, cached)
            tokens += strategy.generate(model, config, start_id=start_id, end_id=NO_END, max_length=max_length)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--connector", default="cross-attention", help="cross-attention or visual-tokens")
    parser.add_argument("--images", type=int, default=32, help="images per batch-32 run (and per larger batches)")
    parser.add_argument("--single-images", type=int, default=4, help="images for the batch-1 runs")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a busy machine, 1 gives steady timings)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(width=120)
    device = resolve_device(args.device)
    dtype = autocast_dtype(args.amp, device)
    registry = load_registry()
    cfg = config_lib.resolve("tiny", overrides=[SIZES[args.size], {"peft": {"method": args.peft},
                                                                    "connector": {"name": args.connector}}])
    captioner = build_captioner(cfg, registry).captioner
    captioner.to(device)
    start_id = tokenizer_for(cfg).eot_id
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    d = cfg.model.decoder
    console.print(f"decoder {d.n_layer} layers x {d.n_embd} wide ({args.size}), encoder {cfg.model.encoder}, "
                  f"connector {args.connector}, peft {args.peft}, {device}, amp {dtype}, {torch.get_num_threads()} threads, "
                  f"max length {args.max_length}")

    table = Table(title=f"decoding speed: naive full recompute vs cached ({args.size}, {device})")
    for column in ("strategy", "batch", "images", "naive img/s", "cached img/s", "speed-up",
                   "naive peak MiB", "cached peak MiB", "same tokens"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    with evaluating(captioner), torch.inference_mode():
        for batch in batch_sizes:
            count = args.single_images if batch == 1 else max(args.images, batch)
            pixels = torch.randn(count, 3, *captioner.encoder.vit.patch_embed.img_size,
                                 generator=torch.Generator().manual_seed(0)).to(device)
            start = time.perf_counter()
            memories = [captioner.encode(pixels[i:i + batch]) for i in range(0, count, batch)]
            encode_seconds = time.perf_counter() - start
            console.print(f"batch {batch}: encoder {count / encode_seconds:.1f} images/s (not in the table)")
            for name, options in STRATEGIES:
                strategy = registry.get("decoding", name)
                config = config_lib.plugin_config(strategy, options, "decoding.options")
                label = name + (f" {options['num_beams']}" if "num_beams" in options else "")
                # warm-up: first calls pay for allocation and kernel selection
                decode_all(captioner.decoder, [memories[0][:1]], strategy, config, True, 2, start_id, dtype, device)
                results = {}
                for cached in (False, True):
                    with PeakMemory(device) as memory:
                        tokens, seconds = decode_all(captioner.decoder, memories, strategy, config, cached,
                                                     args.max_length, start_id, dtype, device)
                    results[cached] = (tokens, count / seconds, memory.peak / 2**20)
                    console.print(f"  {label:7} batch {batch:3} {'cached' if cached else 'naive':6} "
                                  f"{count / seconds:8.2f} images/s")
                (naive_tokens, naive_rate, naive_mem), (cached_tokens, cached_rate, cached_mem) = results[False], results[True]
                table.add_row(label, str(batch), str(count), f"{naive_rate:.2f}", f"{cached_rate:.2f}",
                              f"{cached_rate / naive_rate:.1f}x", f"{naive_mem:.0f}", f"{cached_mem:.0f}",
                              "yes" if naive_tokens == cached_tokens else "NO")
    console.print(table)


if __name__ == "__main__":
    main()
