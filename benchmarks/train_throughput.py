"""Training throughput, side by side on the same batches: vlcap with every installed PEFT method
(from images, and from the feature cache) against transformers' VisionEncoderDecoderModel (ViT +
GPT-2 with add_cross_attention=True) wrapped with HF peft LoRA, at the same sizes, random weights.

    pip install -e ".[bench]"
    python benchmarks/train_throughput.py --size full --batch-size 32 --steps 8 --rounds 2 \
        --captions ../shared/data/coco_hw3/train.json [--length-buckets]

Each configuration runs in its own process, so peak memory (CPU: max RSS; CUDA: max allocated) is
its own. Every configuration runs the same steps on the same batches: forward, token-mean
cross-entropy over the labelled positions, backward, clip, fused AdamW (vlcap's trainer and HF
Trainer's default), under ``--amp`` as ``train.amp`` sets it (bf16 autocast on CUDA, fp32 on
CPU). With ``--captions`` the batches hold the real captions of a course-style caption file,
drawn by the trainer's own sampler (random batches, or ``--length-buckets``) and padded by its
collate; the timed steps are epoch batches picked across the range of padded lengths (one per
equal stratum), so their mean costs what the epoch's average step costs. Without it, random
tokens of 12 +-50% per caption. The images are synthetic (their content does not change the
step's cost).

HF's VisionEncoderDecoderModel adds a trained encoder-to-decoder projection only when the widths
differ (ViT-L/14's 1024 vs GPT-2's 768); at ViT-B/16 (768 = 768) it feeds the ViT tokens to the
cross-attention directly. vlcap always trains one, so at ViT-B/16 the HF row is also run with that
same projection added ("+ projection"): the equal-architecture comparison.
"""
import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import BatchSampler

from vlcap.core import config as config_lib
from vlcap.core.model.captioner import build_captioner, tokenizer_for
from vlcap.core.model.checkpoint import save_checkpoint
from vlcap.core.data import load_captions
from vlcap.core.train.datasets import CaptionDataset, collate_captions
from vlcap.core.train.distributed import Context, train_sampler
from vlcap.core.errors import VlcapError
from vlcap.core.train.feature_cache import write_feature_cache
from vlcap.core.plugins import registry as load_registry
from vlcap.apps.synthetic import draw
from vlcap.core.model.tokenizer import IGNORE_INDEX
from vlcap.core.runtime import autocast, autocast_dtype, resolve_device
from vlcap.core.train.trainer import build_optimizer

# full: ViT-B/16 + GPT-2 small; large: the course's CLIP ViT-L/14 + GPT-2 small.
ENCODER = {"tiny": "test_vit", "full": "vit_base_patch16_224", "large": "vit_large_patch14_clip_224"}
HF = "HF VisionEncoderDecoder + peft LoRA"
HF_PROJECTED = HF + " + projection"


def vlcap_config(size, method):
    model = {"encoder": ENCODER[size], "encoder_pretrained": False, "random_decoder": True}
    return config_lib.resolve("tiny" if size == "tiny" else "full", overrides=[{"model": model, "peft": {"method": method}}])


def synthetic_images(args, captioner, folder):
    """``batch_size`` shape images written as PNGs (for the cache) and their pixels."""
    rng = random.Random(0)
    transform = captioner.encoder.transform()
    for i in range(args.batch_size):
        draw(rng.choice(["red", "blue"]), rng.choice(["circle", "square"]), "middle", rng).save(folder / f"{i}.png")
    return torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(args.batch_size)])


def caption_batches(args, cfg, tokenizer, count):
    """``count`` ``(input_ids, labels)`` batches, laid out and padded as vlcap trains on them:
    input ``[eot, t1..tN, eot, pad..]``, labels ``[t1..tN, eot, ignore..]``."""
    if args.captions:  # the trainer's dataset, sampler (seed 0, first epoch) and collate
        dataset = CaptionDataset(load_captions(args.captions), ".", None, tokenizer, cfg.data.max_caption_tokens)
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


def hf_model(captioner, cfg):
    """transformers' ViT + GPT-2 (cross-attention) at vlcap's sizes, LoRA r=8 on the self-attention
    and the cross-attention (and HF's own projection, where it has one) trainable, as vlcap's lora
    trains them."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel
    vit, dec = captioner.encoder.vit, cfg.model.decoder
    encoder = ViTModel(ViTConfig(hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks),
                                 num_attention_heads=vit.blocks[0].attn.num_heads,
                                 intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                                 image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0]),
                       add_pooling_layer=False)
    decoder = GPT2LMHeadModel(GPT2Config(n_embd=dec.n_embd, n_layer=dec.n_layer, n_head=dec.n_head,
                                         n_positions=dec.block_size, vocab_size=dec.vocab_size, add_cross_attention=True))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.encoder.requires_grad_(False)
    trained = ["crossattention", "ln_cross_attn"] + (["enc_to_dec_proj"] if hasattr(model, "enc_to_dec_proj") else [])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, fan_in_fan_out=True,
                      target_modules=r".*h\.\d+\.attn\.c_attn", modules_to_save=trained)
    return get_peft_model(model, lora)


class HFStack(torch.nn.Module):
    """The HF model run from the frozen ViT's tokens: computed per step from pixels, or once (the
    HF user's equivalent of vlcap's feature cache). ``projection``: vlcap's trained projection
    between the ViT and the cross-attention, for widths where HF has no ``enc_to_dec_proj``."""

    def __init__(self, model, projection=None):
        super().__init__()
        self.model = model
        self.projection = projection

    def vit_tokens(self, pixel_values):
        with torch.no_grad():
            return self.model.get_encoder()(pixel_values=pixel_values).last_hidden_state

    def forward(self, tokens, decoder_input_ids):
        from transformers.modeling_outputs import BaseModelOutput
        if self.projection is not None:
            tokens = self.projection(tokens)
        # HF applies its own enc_to_dec_proj to encoder_outputs too, where it has one.
        return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=tokens), decoder_input_ids=decoder_input_ids)


def measure(args):
    """Run one configuration; print its numbers as JSON."""
    device = resolve_device(args.device)
    registry = load_registry()
    name = args.one
    method = name.split()[1] if name.startswith("vlcap") else "lora"
    cfg = vlcap_config(args.size, method)
    torch.manual_seed(0)
    captioner, peft_method, _ = build_captioner(cfg, registry)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        pixels = synthetic_images(args, captioner, tmp / "images").to(device)
        batches = [tuple(t.to(device) for t in batch) for batch in caption_batches(args, cfg, tokenizer_for(cfg), args.steps)]
        if name.startswith(HF):
            width = cfg.model.decoder.n_embd
            model = HFStack(hf_model(captioner, cfg), torch.nn.Linear(width, width) if HF_PROJECTED in name else None)
            model = model.to(device)
            del captioner
            cached = model.vit_tokens(pixels) if name.endswith("+ cache") else None

            def loss_fn(input_ids, labels):
                tokens = model.vit_tokens(pixels) if cached is None else cached
                logits = model(tokens, input_ids).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        else:
            model = captioner.to(device)
            if name.endswith("+ cache"):
                cache = write_feature_cache(captioner.encoder, tmp / "images", tmp / "cache", device=device)
                rows = [cache.rows[f"{i}.png"] for i in range(args.batch_size)]

                def loss_fn(input_ids, labels):  # read the tokens from the memory-mapped cache every step
                    features = torch.from_numpy(cache.features[rows].astype("float32")).to(device)
                    return captioner.loss_from_features(features, input_ids, labels)
            else:
                def loss_fn(input_ids, labels):
                    return captioner.loss(pixels, input_ids, labels)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, cfg.train)
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
        if name.startswith(HF):
            model.model.save_pretrained(tmp / "hf")
            if model.projection is not None:
                save_file(model.projection.state_dict(), tmp / "hf" / "projection.safetensors")
            size = sum(f.stat().st_size for f in (tmp / "hf").rglob("*") if f.is_file())
        else:
            save_checkpoint(tmp / "ckpt.safetensors", captioner, peft_method, cfg, tokenizer_for(cfg), registry)
            size = (tmp / "ckpt.safetensors").stat().st_size
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"name": name, "samples_per_s": args.batch_size / seconds, "step_s": seconds,
                      "peak_bytes": peak, "trainable": sum(p.numel() for p in trainable), "checkpoint_bytes": size}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(ENCODER), default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--captions", help="course-style caption JSON: train on its real captions, batched as the trainer batches them")
    parser.add_argument("--length-buckets", action="store_true", help="with --captions: the trainer's length-bucketed batches")
    parser.add_argument("--caption-tokens", type=int, default=12, help="without --captions: mean caption length (the course: 12)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times; keep its fastest")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                        help="mixed precision, as train.amp: auto = bf16 (or fp16) on CUDA, off on CPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()
    if args.one:
        return measure(args)

    registry = load_registry()
    methods = registry.names("peft")
    cfg = vlcap_config(args.size, methods[0])
    try:  # read the captions here first: a bad --captions is one line, not every process's traceback
        timed = caption_batches(args, cfg, tokenizer_for(cfg), args.steps)
    except VlcapError as exc:
        sys.exit(f"Error: {exc}")
    names = [f"vlcap {m}" for m in methods] + [f"vlcap {m} + cache" for m in methods] + [HF]
    shapes = build_captioner(vlcap_config(args.size, methods[0]), registry, meta=True).captioner
    # Where HF has no projection of its own, the equal-architecture comparison adds vlcap's.
    same_architecture = HF_PROJECTED if shapes.encoder.embed_dim == shapes.decoder.cfg.n_embd else HF
    names += [HF_PROJECTED] * (same_architecture != HF) + [same_architecture + " + cache"]
    # The same options for every configuration's process (flags only where set).
    forwarded = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
                 if k not in ("one", "rounds") and v not in (None, False)]
    best = {}
    for round_ in range(args.rounds):  # round-robin, so a slow spell of the machine hits every row alike
        for name in names:
            command = [sys.executable, __file__, "--one", name] + forwarded
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if name not in best or row["step_s"] < best[name]["step_s"]:
                best[name] = row
            print(f"  round {round_ + 1}/{args.rounds}: measured {name}", file=sys.stderr)
    rows = [best[name] for name in names]

    device = resolve_device(args.device)
    positions = sum(ids.size(1) for ids, _ in timed) / len(timed)
    tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in timed) / (len(timed) * args.batch_size)
    captions = (f"the captions of {args.captions} in the trainer's {'length-bucketed' if args.length_buckets else 'random'} batches"
                if args.captions else f"random captions of {args.caption_tokens} +-50% tokens")
    print(f"\n{args.size}: {ENCODER[args.size]} + GPT-2 ({'2 layers, 64 wide' if args.size == 'tiny' else 'small'}), "
          f"random weights, batch {args.batch_size}, {captions} ({tokens:.1f} labelled tokens per caption, padded to "
          f"{positions:.1f} positions on average), mean of {args.steps} timed steps, best of {args.rounds} round(s) "
          f"on {device} ({torch.get_num_threads()} threads), {str(autocast_dtype(args.amp, device) or torch.float32)[6:]}\n")
    print("| configuration | samples/s | s/step | peak memory | trainable | checkpoint |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['samples_per_s']:.2f} | {r['step_s']:.3f} | {r['peak_bytes'] / 2**20:,.0f} MiB "
              f"| {r['trainable']:,} | {r['checkpoint_bytes'] / 2**20:.1f} MiB |")
    speed = {r["name"]: r["samples_per_s"] for r in rows}
    print()
    short = same_architecture.replace(HF, "HF")
    for m in methods:
        versus = "; ".join(f"{speed[f'vlcap {m}'] / speed[hf]:.2f}x {hf.replace(HF, 'HF')}" for hf in (HF, HF_PROJECTED) if hf in speed)
        print(f"vlcap {m}: {speed[f'vlcap {m} + cache'] / speed[f'vlcap {m}']:.2f}x faster per step from the feature cache; "
              f"samples/s from images {versus}; from cached tokens {speed[f'vlcap {m} + cache'] / speed[same_architecture + ' + cache']:.2f}x {short}")


if __name__ == "__main__":
    main()
