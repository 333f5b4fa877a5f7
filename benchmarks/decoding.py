"""Decoding speed: vlcap's cached decoding against transformers' ``generate`` on the same weights,
and against a naive full recompute, per strategy and batch size; images/s, peak memory, tokens.

    pip install -e ".[bench]"
    python benchmarks/decoding.py --size gpt2 --threads 2 --images 32 --max-length 10 --rounds 3

The captioner is vlcap's (GPT-2 small-size decoder with --size gpt2, the tiny preset's otherwise;
random weights, every trained part made non-zero as training leaves it). ``HF generate`` runs transformers'
VisionEncoderDecoderModel holding the same decoder (``hf_peer.decoding_peer``: LoRA merged, sdpa)
on the same image tokens, with the same strategy options (greedy; beam search with the same
length penalty and maximum length); before any timing its greedy tokens must equal vlcap's on
20-token captions of 8 images, or the benchmark stops. The image encoder runs once, before
timing: only decoding is measured. In the timed runs the end token is disabled, so every caption
runs to --max-length (the same, worst-case work for every path; a random decoder would otherwise
stop at arbitrary points). ``naive`` runs the whole sequence through the decoder every step
(the LM head only at the last position). Every batch size decodes the same --images images. Each
round runs every row once, paths interleaved; images/s is median (min-max) over rounds.
"""
import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from vlcap.core import config as config_lib
from vlcap.core.infer.decoding import next_token_model
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.plugins import registry as load_registry
from vlcap.core.runtime import autocast, dtype_name, evaluating, inference_dtype, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import decoding_peer, hf_generate  # noqa: E402

SIZES = {
    "tiny": {},  # the tiny preset's 2-layer, 64-wide decoder
    "gpt2": {"model": {"decoder": config_lib.to_dict(config_lib.RunConfig())["model"]["decoder"]}},  # GPT-2 small
}
NO_END = -1  # an id no token has: vlcap's captions never end early (HF: eos_token_id=None)
STRATEGIES = {"greedy": 1, "beam 3": 3, "beam 5": 5}  # label -> beams
PATHS = ("vlcap cached", "HF generate", "naive")


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


def as_if_trained(captioner):
    """Every trained part made non-zero, as training leaves it: a fresh captioner's LoRA B and
    cross-attention output are zero, so its captions would not depend on the image (every image
    the same tokens) and the HF copy's merged LoRA would go unchecked."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in captioner.parameters():
            if p.requires_grad:  # unit gain: a matrix's noise scaled by 1/sqrt(its input width)
                std = p.size(-1) ** -0.5 if p.dim() >= 2 else 0.02
                p.add_(torch.randn(p.shape, generator=generator) * std)


class Decoders:
    """The three paths over one captioner, each ``(memory, beams, max_length, end_id) -> tokens``."""

    def __init__(self, captioner, method, registry, start_id):
        self.captioner, self.start_id = captioner, start_id
        self.hf = decoding_peer(captioner, method, start_id)
        self.greedy, self.beam = registry.get("decoding", "greedy"), registry.get("decoding", "beam")
        self.registry = registry

    def vlcap(self, memory, beams, max_length, end_id, cached=True):
        strategy = self.greedy if beams == 1 else self.beam
        options = {} if beams == 1 else {"num_beams": beams}
        config = config_lib.plugin_config(strategy, options, "decoding.options")
        model = next_token_model(self.captioner.decoder, memory, cached)
        return strategy.generate(model, config, start_id=self.start_id, end_id=end_id, max_length=max_length)

    def run(self, path, memory, beams, max_length, end_id):
        if path == "HF generate":
            return hf_generate(self.hf, memory, start_id=self.start_id, end_id=None if end_id == NO_END else end_id,
                               max_length=max_length, num_beams=beams)
        return self.vlcap(memory, beams, max_length, end_id, cached=path == "vlcap cached")


def timed(decoders, path, memories, beams, max_length, dtype, device):
    """``(tokens, seconds, peak bytes)`` of decoding every batch of ``memories`` on ``path``."""
    tokens = []
    with PeakMemory(device) as memory, torch.inference_mode(), autocast(device, dtype):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch in memories:
            tokens += decoders.run(path, batch, beams, max_length, NO_END)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return tokens, seconds, memory.peak


def check_same_greedy_tokens(decoders, memory, dtype, device):
    """HF generate on the copied weights must give vlcap's greedy captions (20 tokens each), and
    they must differ between images (else the image would not matter and the check says little)."""
    with torch.inference_mode(), autocast(device, dtype):
        ours = decoders.vlcap(memory, 1, 20, NO_END)
        theirs = decoders.run("HF generate", memory, 1, 20, NO_END)
    if ours != theirs:
        sys.exit(f"HF generate's greedy tokens differ from vlcap's on {sum(a != b for a, b in zip(ours, theirs))} "
                 f"of {len(ours)} images: not the same model, no comparison")
    if len({tuple(tokens) for tokens in ours}) < 2:
        sys.exit("every image decoded to the same tokens: the image tokens do not reach the decoder")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--encoder", help="timm ViT for the image tokens (default: the tiny preset's test_vit; "
                        "vit_base_patch16_224 gives ViT-B/16's 197 tokens)")
    parser.add_argument("--images", type=int, default=32, help="images decoded at every batch size")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-length", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-rounds", type=int, help="rounds that include the naive path (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=config_lib.PRECISIONS, help="as `vlcap caption --precision`")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = inference_dtype(args.precision, device)
    registry = load_registry()
    model = {"encoder": args.encoder} if args.encoder else {}
    cfg = config_lib.resolve("tiny", overrides=[SIZES[args.size], {"model": model, "peft": {"method": "lora"}}])
    built = build_captioner(cfg, registry)
    captioner, start_id = built.captioner, tokenizer_for(cfg).eot_id
    as_if_trained(captioner)
    captioner.to(device).eval()
    decoders = Decoders(captioner, built.method, registry, start_id)
    pixels = torch.randn(args.images, 3, *captioner.encoder.vit.patch_embed.img_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    with evaluating(captioner), torch.inference_mode(), autocast(device, dtype):
        memory = captioner.encode(pixels)
    check_same_greedy_tokens(decoders, memory[:8], dtype, device)
    d = cfg.model.decoder
    print(f"decoder {d.n_layer} layers x {d.n_embd} wide, {memory.size(1)} image tokens ({cfg.model.encoder}), LoRA, "
          f"{device}, {dtype_name(dtype)}, {torch.get_num_threads()} threads, {args.images} images, "
          f"every caption {args.max_length} tokens, {args.rounds} rounds; HF generate's greedy tokens = vlcap's, "
          "checked", file=sys.stderr)

    rows = [(label, beams, batch) for batch in map(int, args.batch_sizes.split(",")) for label, beams in STRATEGIES.items()]
    results = {(row, path): [] for row in rows for path in PATHS}
    for round_ in range(args.rounds):
        for (label, beams, batch) in rows:
            memories = memory.split(batch)
            paths = [p for p in PATHS if p != "naive" or round_ < (args.naive_rounds or args.rounds)]
            for path in paths if round_ % 2 == 0 else paths[::-1]:
                tokens, seconds, peak = timed(decoders, path, memories, beams, args.max_length, dtype, device)
                results[((label, beams, batch), path)].append((tokens, args.images / seconds, peak))
                print(f"  round {round_ + 1}: {label} batch {batch} {path}: {args.images / seconds:.2f} img/s",
                      file=sys.stderr, flush=True)
            # the table so far after every row: a long run cut short keeps what it measured
            print(f"\nround {round_ + 1}, {label} at batch {batch} done:", flush=True)
            print_table([row for row in rows if results[(row, "vlcap cached")]], results)


def print_table(rows, results):
    def speed(runs):
        rates = [r for _, r, _ in runs]
        return f"{statistics.median(rates):.2f} ({min(rates):.2f}-{max(rates):.2f})"
    print("| strategy | batch | vlcap cached img/s | HF generate img/s | naive img/s | cached / HF | cached / naive "
          "| peak MiB cached / HF / naive | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        label, _, batch = row
        cached, hf, naive = (results[(row, path)] or [([], float("nan"), 0)] for path in PATHS)
        # ratios round by round: both paths ran in the same round, one after the other
        over_hf = [c[1] / h[1] for c, h in zip(cached, hf)]
        over_naive = [c[1] / n[1] for c, n in zip(cached, naive)]
        same = all(run[0] == cached[0][0] for run in hf + naive)
        peaks = " / ".join(f"{max(p for _, _, p in runs) / 2**20:.0f}" for runs in (cached, hf, naive))
        print(f"| {label} | {batch} | {speed(cached)} | {speed(hf)} | {speed(naive)} "
              f"| {statistics.median(over_hf):.2f}x ({min(over_hf):.2f}-{max(over_hf):.2f}) "
              f"| {statistics.median(over_naive):.2f}x | {peaks} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
