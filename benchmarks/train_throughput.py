"""Training throughput on the same batches: vlcap against transformers' VisionEncoderDecoderModel
+ HF peft LoRA at its best equal settings (``hf_peer.py``), vlcap's other PEFT methods, and
vlcap with each of its optimisations turned off, one at a time. Random weights.

    pip install -e ".[bench]"
    python benchmarks/train_throughput.py --size full --batch-size 32 --steps 3 --rounds 3 --threads 2 \
        --captions ../shared/data/coco_hw3/train.json --length-buckets --ablations --methods adapter,prefix

Like for like (the headline): ``vlcap lora`` against ``HF LoRA``, the same architecture and the
same trainable parameters: LoRA rank 8 on q and v of every self-attention, the cross-attention,
its LayerNorm and a trained encoder-to-decoder projection (HF's own ``enc_to_dec_proj`` where the
widths differ; at ViT-B/16, 768 = 768, HF has none, so vlcap's is added to it). Both stacks:
dropout 0 in the decoder (LoRA's own 0.05 alike), SDPA attention, fused AdamW, clipping at 1.0,
the token-mean cross-entropy over the labelled positions, ``--amp`` as ``train.amp`` sets it. From
images (``HF LoRA``: the ViT runs every step) and from cached ViT tokens (``+ cache``: vlcap reads
its feature cache, HF is fed the ViT's tokens computed once).

Every configuration runs in its own process, holding only its own model (peak memory: max RSS on
CPU, max allocated on CUDA); rounds are interleaved (every configuration once per round, the order
reversed every other round) so a slow spell of a shared machine hits every row alike; the table
gives min / median / max over rounds, and the vlcap/HF ratios are taken round by round.

With ``--captions`` the batches hold the real captions of a course-style caption file, drawn by the
trainer's own sampler (random batches, or ``--length-buckets``) and padded by its collate; the timed
steps are epoch batches picked across the range of padded lengths (one per equal stratum), so their
mean costs what the epoch's average step costs. Without it, random tokens of 12 +-50% per caption.
The images are synthetic (their content does not change the step's cost). The "epoch" lines put
an epoch of the caption file in hours each stack's users would spend: vlcap from its feature cache
(built once: the ViT over every image), HF from images.
"""
import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loralib
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import BatchSampler

from vlcap.apps.synthetic import draw
from vlcap.core import config as config_lib
from vlcap.core.data import load_captions
from vlcap.core.errors import VlcapError
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.gpt2 import CrossAttention
from vlcap.core.model.tokenizer import IGNORE_INDEX
from vlcap.core.plugins import registry as load_registry
from vlcap.core.runtime import autocast, autocast_dtype, dtype_name, resolve_device
from vlcap.core.train.datasets import CaptionDataset, collate_captions
from vlcap.core.train.distributed import Context, train_sampler
from vlcap.core.train.feature_cache import write_feature_cache
from vlcap.core.train.trainer import build_optimizer
from vlcap.plugins.peft_lora.layer import MergedLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_peer import hf_captioner, with_lora  # noqa: E402

# full: ViT-B/16 + GPT-2 small; large: the course's CLIP ViT-L/14 + GPT-2 small.
ENCODER = {"tiny": "test_vit", "full": "vit_base_patch16_224", "large": "vit_large_patch14_clip_224"}
HF = "HF LoRA"
# vlcap's optimisations, each turned off in its own "vlcap lora + cache - X" row (``ablate``).
ABLATIONS = ("memory-space cross-attention", "LM head at labels only", "low-rank LoRA forward", "fused AdamW")


def vlcap_config(size, method):
    model = {"encoder": ENCODER[size], "encoder_pretrained": False, "random_decoder": True}
    return config_lib.resolve("tiny" if size == "tiny" else "full", overrides=[{"model": model, "peft": {"method": method}}])


def configurations(args):
    """The rows to measure, by name: the headline pair from images and from the cache, then the
    other methods, then the ablations (from the cache, where the decoder is the whole step)."""
    names = ["vlcap lora", HF, "vlcap lora + cache", HF + " + cache"]
    for method in args.methods:
        names += [f"vlcap {method}", f"vlcap {method} + cache"]
    if args.ablations:
        names += [f"vlcap lora + cache - {off}" for off in ABLATIONS]
    return names


def parse(name):
    """``(stack, method, cached, ablation)`` of a configuration name."""
    base, _, off = name.partition(" - ")
    cached = base.endswith(" + cache")
    base = base.removesuffix(" + cache")
    return ("hf", "lora", cached, None) if base == HF else ("vlcap", base.split()[1], cached, off or None)


def synthetic_images(batch_size, transform, folder):
    """``batch_size`` shape images written as PNGs (for the cache) and their pixels."""
    rng = random.Random(0)
    for i in range(batch_size):
        draw(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), "middle", rng).save(folder / f"{i}.png")
    return torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(batch_size)])


def caption_dataset(args, cfg):
    return CaptionDataset(load_captions(args.captions), ".", None, tokenizer_for(cfg), cfg.data.max_caption_tokens)


def caption_batches(args, cfg, count):
    """``count`` ``(input_ids, labels)`` batches, laid out and padded as vlcap trains on them:
    input ``[eot, t1..tN, eot, pad..]``, labels ``[t1..tN, eot, ignore..]``."""
    tokenizer = tokenizer_for(cfg)
    if args.captions:  # the trainer's dataset, sampler (seed 0, first epoch) and collate
        dataset = caption_dataset(args, cfg)
        sampler, batch_sampler = train_sampler(dataset, args.batch_size, Context(), 0, args.length_buckets)
        if batch_sampler is None:  # the DataLoader's own batching of a sampler
            batch_sampler = BatchSampler(sampler, args.batch_size, drop_last=False)
        # A step's cost follows its padded length, which varies a lot between batches (length
        # buckets: 9 to 40 positions). So that a few steps stand for the whole epoch, the epoch's
        # full batches are sorted by padded length and cut into ``count`` equal strata, and each
        # stratum gives the batch nearest its mean length.
        def padded(batch):
            return max(len(dataset.items[i][1]) for i in batch)
        full = sorted((batch for batch in batch_sampler if len(batch) == args.batch_size), key=padded)
        if len(full) < count:
            raise VlcapError(f"{args.captions}: {len(full)} full batch(es) of {args.batch_size} captions, {count} steps asked; "
                             "lower --steps or --batch-size")
        strata = [full[k * len(full) // count:(k + 1) * len(full) // count] for k in range(count)]
        chosen = []
        for stratum in strata:
            mean = statistics.mean(map(padded, stratum))
            chosen.append(min(stratum, key=lambda batch: abs(padded(batch) - mean)))
        pairs = [[dataset.items[i][1:] for i in batch] for batch in chosen]
    else:  # random tokens, the course's 12 tokens per caption +-50%
        rng = random.Random(0)
        pairs = []
        for _ in range(count):
            captions = [[rng.randrange(tokenizer.eot_id) for _ in range(rng.randint(args.caption_tokens // 2, args.caption_tokens * 3 // 2))]
                        for _ in range(args.batch_size)]
            pairs.append([([tokenizer.eot_id, *c, tokenizer.eot_id], [*c, tokenizer.eot_id, IGNORE_INDEX]) for c in captions])
    no_pixels = torch.zeros(0)
    batches = [collate_captions([(no_pixels, torch.tensor(x), torch.tensor(y)) for x, y in batch], pad_id=tokenizer.eot_id)
               for batch in pairs]
    return [(batch.input_ids, batch.labels) for batch in batches]


def every_position_loss(logits, labels):
    """Cross-entropy from logits at every position, unlabelled ones ignored: what HF computes
    from ``labels``, and vlcap's plain form of its labelled-positions-only loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


class HFCaptioner(torch.nn.Module):
    """The HF model trained from the frozen ViT's tokens, with vlcap's projection added where HF
    has no ``enc_to_dec_proj`` of its own (equal widths)."""

    def __init__(self, model, width, projected_by_hf):
        super().__init__()
        self.model = model
        self.projection = None if projected_by_hf else torch.nn.Linear(width, width)

    def vit_tokens(self, pixel_values):
        with torch.no_grad():
            return self.model.get_encoder()(pixel_values=pixel_values).last_hidden_state

    def loss(self, tokens, input_ids, labels):
        from transformers.modeling_outputs import BaseModelOutput
        if self.projection is not None:
            tokens = self.projection(tokens)
        # HF applies its own enc_to_dec_proj to encoder_outputs, where it has one.
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=tokens), decoder_input_ids=input_ids).logits
        return every_position_loss(logits, labels)


def hf_setup(cfg, shapes, pixels, cached, device):
    """The HF model and its loss function ``(input_ids, labels) -> loss``."""
    lora = cfg.peft.options
    width = cfg.model.decoder.n_embd
    model = hf_captioner(shapes.encoder, cfg.model.decoder, tokenizer_for(cfg).eot_id)
    projected = hasattr(model, "enc_to_dec_proj")
    model = HFCaptioner(with_lora(model, lora["r"], lora["alpha"], lora["dropout"]), width, projected).to(device)
    tokens = model.vit_tokens(pixels) if cached else None

    def loss_fn(input_ids, labels):
        return model.loss(model.vit_tokens(pixels) if tokens is None else tokens, input_ids, labels)
    return model, loss_fn


def ablate(captioner, off):
    """Turn one of vlcap's optimisations off (the plain forms its tests compare them with); the
    loss function and the optimizer are switched in ``vlcap_setup``."""
    if off == "memory-space cross-attention":  # project the image tokens to keys/values, as decoding does
        for module in captioner.modules():
            if isinstance(module, CrossAttention):
                module.form = "project"
    elif off == "low-rank LoRA forward":  # loralib's own forward: the full B @ A update every call
        for module in captioner.modules():
            if isinstance(module, MergedLinear):
                module.forward = loralib.MergedLinear.forward.__get__(module)


def vlcap_setup(captioner, pixels, cached, off, tmp, device):
    """The vlcap loss function ``(input_ids, labels) -> loss`` and, for cached rows, the ViT's
    seconds per image (what building the cache costs)."""
    ablate(captioner, off)
    encode_s = None
    if cached:
        started = time.perf_counter()
        captioner.encoder_features(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        encode_s = (time.perf_counter() - started) / len(pixels)
        cache = write_feature_cache(captioner.encoder, tmp / "images", tmp / "cache", device=device)
        rows = [cache.rows[f"{i}.png"] for i in range(len(pixels))]

        def features():  # read from the memory-mapped cache every step, as training does
            return torch.from_numpy(cache.features[rows].astype("float32")).to(device)
    else:
        def features():
            return captioner.encoder_features(pixels)

    def loss_fn(input_ids, labels):
        if off == "LM head at labels only":
            return every_position_loss(captioner.decoder(input_ids, captioner.projection(features())), labels)
        return captioner.loss_from_features(features(), input_ids, labels)
    return loss_fn, encode_s


def optimizer_for(trainable, cfg, off):
    """vlcap's fused AdamW, or with it ablated the same parameter groups in torch's default AdamW
    (a per-tensor loop on CPU, ``foreach`` on CUDA)."""
    optimizer = build_optimizer(trainable, cfg.train)
    if off != "fused AdamW":
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def measure(args):
    """Run one configuration; print its numbers as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    registry = load_registry()
    stack, method, cached, off = parse(args.one)
    cfg = vlcap_config(args.size, method)
    torch.manual_seed(0)
    encode_s = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        shapes = build_captioner(cfg, registry, meta=True)  # sizes only: nothing allocated
        cfg = shapes.config  # the method's resolved options
        pixels = synthetic_images(args.batch_size, shapes.captioner.encoder.transform(), tmp / "images").to(device)
        batches = [tuple(t.to(device) for t in batch) for batch in caption_batches(args, cfg, args.steps)]
        if stack == "hf":
            model, loss_fn = hf_setup(cfg, shapes.captioner, pixels, cached, device)
        else:
            model = build_captioner(cfg, registry).captioner.to(device)
            loss_fn, encode_s = vlcap_setup(model, pixels, cached, off, tmp, device)
        del shapes
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_for(trainable, cfg, off)
        dtype = autocast_dtype(args.amp, device)  # the trainer's rule: bf16 (fp16 + loss scaling) on CUDA
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step(batch):
            with autocast(device, dtype):
                loss = loss_fn(*batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        for _ in range(args.warmup):
            step(batches[len(batches) // 2])
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        seconds = (time.perf_counter() - started) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"name": args.one, "step_s": seconds, "peak_bytes": peak, "encode_s_per_image": encode_s,
                      "trainable": sum(p.numel() for p in trainable)}))


def run_rounds(args, names):
    """Every configuration once per round, each in a fresh process; the order reversed every
    other round. Returns ``{name: [row of each round]}``."""
    forwarded = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
                 if k in ("size", "batch_size", "captions", "length_buckets", "caption_tokens", "steps", "warmup",
                          "device", "amp", "threads") and v not in (None, False)]
    rows = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", name] + forwarded, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = rows[name][-1]
            print(f"  round {round_ + 1}/{args.rounds}: {name}: {row['step_s']:.3f} s/step, peak "
                  f"{row['peak_bytes'] / 2**20:,.0f} MiB ({time.perf_counter() - started:.0f} s in all)",
                  file=sys.stderr, flush=True)
    return rows


def spread(values, fmt="{:.2f}"):
    """``median (min-max)`` of a list of numbers."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(args, rows, timed, cfg):
    device = resolve_device(args.device)
    positions = sum(ids.size(1) for ids, _ in timed) / len(timed)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in timed) / (len(timed) * args.batch_size)
    captions = (f"the captions of {args.captions} in the trainer's {'length-bucketed' if args.length_buckets else 'random'} batches"
                if args.captions else f"random captions of {args.caption_tokens} +-50% tokens")
    threads = args.threads or torch.get_num_threads()
    print(f"\n{args.size}: {ENCODER[args.size]} + GPT-2 ({'2 layers, 64 wide' if args.size == 'tiny' else 'small'}), "
          f"random weights, batch {args.batch_size}, {captions} ({tokens:.1f} labelled tokens per caption, padded to "
          f"{positions:.1f} positions on average), mean of {args.steps} timed steps per process, {args.rounds} "
          f"interleaved round(s) on {device} ({threads} torch threads), {dtype_name(autocast_dtype(args.amp, device))}\n")
    print("| configuration | samples/s: median (min-max) | s/step (median) | peak memory (max) | trainable |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in rows.items():
        speeds = [args.batch_size / r["step_s"] for r in runs]
        print(f"| {name} | {spread(speeds)} | {statistics.median(r['step_s'] for r in runs):.3f} "
              f"| {max(r['peak_bytes'] for r in runs) / 2**20:,.0f} MiB | {runs[0]['trainable']:,} |")
    print()

    def ratio(a, b):  # samples/s of a over b, round by round: both ran in the same round, under the same load
        if a not in rows or b not in rows:
            return "(not run)"
        return spread([y["step_s"] / x["step_s"] for x, y in zip(rows[a], rows[b])], "{:.2f}x")
    print(f"- like for like, vlcap lora vs HF LoRA: {ratio('vlcap lora', HF)} samples/s from images, "
          f"{ratio('vlcap lora + cache', HF + ' + cache')} from cached ViT tokens")
    print(f"- vlcap lora's feature cache: {ratio('vlcap lora + cache', 'vlcap lora')} per step")
    for method in args.methods:
        print(f"- vlcap {method} vs HF LoRA: {ratio(f'vlcap {method}', HF)} from images, "
              f"{ratio(f'vlcap {method} + cache', HF + ' + cache')} from cached tokens")
    for off in ABLATIONS if args.ablations else ():
        print(f"- {off}: vlcap lora + cache runs {ratio('vlcap lora + cache', f'vlcap lora + cache - {off}')} "
              "the samples/s with it as without")
    if args.captions and "vlcap lora + cache" in rows and HF in rows:
        epoch_hours(args, rows, cfg)


def epoch_hours(args, rows, cfg):
    """An epoch of the caption file as each stack's users would run it: vlcap from its feature
    cache (built once, the ViT over every image), HF from images."""
    dataset = caption_dataset(args, cfg)
    steps = math.ceil(len(dataset) / args.batch_size)
    images = len(load_captions(args.captions).images)
    build = statistics.median(r["encode_s_per_image"] for r in rows["vlcap lora + cache"]) * images
    vlcap = statistics.median(r["step_s"] for r in rows["vlcap lora + cache"]) * steps
    hf = statistics.median(r["step_s"] for r in rows[HF]) * steps
    print(f"- an epoch of {args.captions} ({len(dataset):,} captions, {steps:,} steps of {args.batch_size}, "
          f"{images:,} images): vlcap with its feature cache {vlcap / 3600:.2f} h (+ {build / 3600:.2f} h once, "
          f"to build the cache), HF from images {hf / 3600:.2f} h: {hf / (vlcap + build):.2f}x on the first epoch, "
          f"{hf / vlcap:.2f}x on each later one (medians)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(ENCODER), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--captions", help="course-style caption JSON: train on its real captions, batched as the trainer batches them")
    parser.add_argument("--length-buckets", action="store_true", help="with --captions: the trainer's length-bucketed batches")
    parser.add_argument("--caption-tokens", type=int, default=12, help="without --captions: mean caption length (the course: 12)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (min/median/max over them)")
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=[],
                        help="other vlcap PEFT methods to add as their own rows, e.g. adapter,prefix")
    parser.add_argument("--ablations", action="store_true", help="add vlcap lora + cache with each optimisation off")
    parser.add_argument("--only", help="comma-separated configuration names to run (default: all the flags ask for)")
    parser.add_argument("--reverse", action="store_true", help="start with the last configuration (to interleave with "
                        "an earlier run in the usual order)")
    parser.add_argument("--threads", type=int, help="torch threads in every process (the same for both stacks)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                        help="mixed precision, as train.amp: auto = bf16 (fp16 without native bf16) on CUDA, off on CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()
    if args.one:
        return measure(args)
    unknown = set(args.methods) - set(load_registry().names("peft"))
    if unknown:
        sys.exit(f"Error: --methods: {', '.join(sorted(unknown))} not installed")
    cfg = vlcap_config(args.size, "lora")
    try:  # read the captions here first: a bad --captions is one line, not every process's traceback
        timed = caption_batches(args, cfg, args.steps)
    except VlcapError as exc:
        sys.exit(f"Error: {exc}")
    names = configurations(args)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if args.reverse:
        names = names[::-1]
    report(args, run_rounds(args, names), timed, cfg)


if __name__ == "__main__":
    main()
