"""Zero-shot captioning with a pretrained vision-language model from transformers (`vlcap caption
--hf-model`): LLaVA-1.5 first, and any model of transformers' image-text-to-text class that takes
one image and a chat prompt.

The model and its processor load with ``AutoProcessor`` / ``AutoModelForImageTextToText`` from a
hub id or a local folder; the user's instruction goes through the processor's chat template with
the image; ``generate`` runs with the model's generation config updated by ``--set KEY=VALUE``
(keys of transformers' ``GenerationConfig``). Batches are left-padded (a decoder-only model
continues each row from its last token), so a batch gives the captions each image gets alone.
Only the generated answer is kept. Images are read, batched and reported unreadable by the
core's ``ImageDataset``; predictions are written as ``caption`` writes them.

transformers is an optional extra, imported only here (and in the modules built on this one),
so vlcap works without it.
"""
import copy
import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vlcap.core.console import say
from vlcap.core.data import ImageDataset, find_images, split_unreadable
from vlcap.core.errors import VlcapError, few
from vlcap.core.infer.captioning import Captions
from vlcap.core.outputs import write_predictions
from vlcap.core.progress import progress_bar
from vlcap.core.runtime import native_bf16

HF_EXTRA = 'pip install "vlcap[hf]"'
QUANTIZE_CHOICES = ("4bit", "8bit")
# Captions are one sentence: without this, a model whose generation_config.json sets only
# max_length (20 tokens, prompt included) would stop inside its ~600-token prompt.
DEFAULT_GENERATION = {"max_new_tokens": 50}
# GenerationConfig.to_dict() keys that are bookkeeping, not options a user sets.
NOT_OPTIONS = {"transformers_version", "generation_kwargs"}
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def import_transformers():
    """The transformers module, or one ``VlcapError`` line naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise VlcapError(f"--hf-model needs the transformers package, which is not installed: {HF_EXTRA}") from None
    return transformers


@dataclass
class HfModel:
    name: str  # the hub id or folder it was loaded from
    model: torch.nn.Module
    processor: object  # its AutoProcessor: chat template, tokenizer (left padding), image processor
    device: torch.device
    dtype: torch.dtype  # what the weights (or a quantized model's compute) run in


def model_dtype(device):
    """fp32 on CPU; on CUDA bf16 where the GPU computes it natively (compute capability 8.0+),
    else fp16 (a 7B model does not fit most GPUs in fp32)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def quantization_config(transformers, quantize, device, dtype):
    """A ``BitsAndBytesConfig`` for ``--quantize 4bit|8bit`` (None: full weights); one line when
    there is no GPU or no bitsandbytes."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise VlcapError(f"--quantize: give {' or '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if device.type != "cuda":
        raise VlcapError(f"--quantize {quantize}: bitsandbytes loads 4-/8-bit weights on a CUDA GPU only, and this "
                         f"runs on {device}; drop --quantize")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise VlcapError(f"--quantize {quantize} needs the bitsandbytes package: pip install bitsandbytes")
    if quantize == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def from_pretrained(auto_class, name, **kwargs):
    """``auto_class.from_pretrained(name)``, its failures as one line: a hub id that cannot be
    fetched (offline, gated, misspelt: transformers raises OSError for all of them) says how to
    point ``--hf-model`` at a local copy; anything transformers cannot build says so."""
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as exc:
        if Path(name).is_dir():
            raise VlcapError(f"{name}: not a complete transformers model folder ({first_line(exc)})") from None
        raise VlcapError(f"could not load '{name}' from the Hugging Face hub ({first_line(exc)}); where the hub is "
                         f"reachable, download it (`hf download {name} --local-dir DIR`, after `hf auth login` for a "
                         "gated model) and pass --hf-model DIR") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise VlcapError(f"{name}: transformers cannot load it with {auto_class.__name__} ({first_line(exc)}); "
                         "--hf-model takes an image-text-to-text model such as llava-hf/llava-1.5-7b-hf") from None


def load_hf_model(name, device, *, quantize=None, attention=None):
    """The model and processor of ``name`` (hub id or local folder) on ``device``, in
    ``model_dtype`` (or quantized), in eval mode. ``attention``: transformers'
    ``attn_implementation`` (``"eager"`` returns attention weights; None: its default)."""
    transformers = import_transformers()
    dtype = model_dtype(device)
    quantization = quantization_config(transformers, quantize, device, dtype)
    processor = from_pretrained(transformers.AutoProcessor, name)
    if getattr(processor, "chat_template", None) is None or not hasattr(processor, "tokenizer"):
        raise VlcapError(f"{name}: its processor has no chat template (chat_template.jinja) to put the prompt and the "
                         "image in; use a chat model's processor, e.g. llava-hf/llava-1.5-7b-hf")
    # Straight onto the GPU where accelerate can place it (a 7B model never sits in CPU memory);
    # quantized weights can only be placed that way.
    placed = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    if quantization is not None and not placed:
        raise VlcapError(f"--quantize {quantize} needs the accelerate package: {HF_EXTRA}")
    placement = {"device_map": {"": device}} if placed else {}
    model = from_pretrained(transformers.AutoModelForImageTextToText, name, dtype=dtype, quantization_config=quantization,
                            attn_implementation=attention, **placement)
    if not placed:
        model.to(device)
    processor.tokenizer.padding_side = "left"
    return HfModel(str(name), model.eval(), processor, device, dtype)


def generation_keys():
    """The options ``--set`` may give: the attributes of transformers' ``GenerationConfig``."""
    transformers = import_transformers()
    return sorted(k for k in transformers.GenerationConfig().to_dict() if not k.startswith("_") and k not in NOT_OPTIONS)


def check_generation_options(options, where="--set"):
    """``options`` (``--set`` key -> value) checked as ``GenerationConfig`` keys and values, in
    one line naming the key: unknown keys (with the nearest known one), more than one caption
    per image, and whatever ``GenerationConfig.validate(strict=True)`` refuses (e.g. a
    temperature without sampling, which would be ignored). ``where``: what the line names first
    (``--set``, or a grid file)."""
    transformers = import_transformers()
    keys = generation_keys()
    unknown = [key for key in options if key not in keys]
    if unknown:
        near = [m for key in unknown for m in difflib.get_close_matches(key, keys, n=1)]
        hint = f"; did you mean {few(near)}?" if near else ""
        raise VlcapError(f"{where} {few(unknown)}: not a generation option (transformers' GenerationConfig keys, e.g. "
                         f"num_beams, max_new_tokens, do_sample, temperature, length_penalty){hint}")
    if options.get("num_return_sequences", 1) != 1:
        raise VlcapError(f"{where} num_return_sequences: a caption is one answer per image; leave it at 1")
    try:
        transformers.GenerationConfig(**options).validate(strict=True)
    except (ValueError, TypeError) as exc:
        raise VlcapError(f"{where} {options_text(options)}: {first_line(exc)}") from None


def options_text(options):
    """``num_beams=2 max_new_tokens=30``: a setting's generation options as typed."""
    return " ".join(f"{k}={v}" for k, v in options.items()) or "(model defaults)"


def generation_config(hf, options):
    """The model's own generation config updated by ``DEFAULT_GENERATION`` and ``options``."""
    config = copy.deepcopy(hf.model.generation_config)
    config.update(**{**DEFAULT_GENERATION, **options})
    if config.pad_token_id is None:  # left-padded batches need one; models without a pad token pad with EOS
        tokenizer = hf.processor.tokenizer
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config


def check_prompt(prompt):
    if prompt is None or not prompt.strip():
        raise VlcapError("--prompt: give the instruction, e.g. --prompt \"Describe the image in one sentence.\"")


def chat_prompt(hf, prompt):
    """``prompt`` as the user's turn after one image, through the processor's chat template,
    ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return hf.processor.apply_chat_template(messages, add_generation_prompt=True)


def model_inputs(hf, images, text):
    """Processor outputs for ``images`` (PIL), each with the chat prompt ``text``, left-padded,
    on the model's device; floating inputs (pixels) in the model's dtype."""
    inputs = hf.processor(images=list(images), text=[text] * len(images), padding=True, return_tensors="pt")
    return inputs.to(hf.device, dtype=hf.dtype)


def generate(hf, inputs, config, options):
    """The generated ids after the prompt, ``(B, new tokens)``; a bad option value that only
    ``generate`` detects is one line naming the options."""
    try:
        with torch.inference_mode():
            ids = hf.model.generate(**inputs, generation_config=config)
    except (ValueError, TypeError) as exc:
        raise VlcapError(f"--set {options_text(options)}: generate refused it ({first_line(exc)})") from None
    return ids[:, inputs["input_ids"].shape[1]:]


def clean_answer(text, first_sentence=False):
    """The answer as a one-line caption: whitespace runs become one space; with
    ``first_sentence``, cut after the first ., ! or ? that ends a word."""
    text = " ".join(text.split())
    if first_sentence:
        end = SENTENCE_END.search(text)
        text = text[:end.end()] if end else text
    return text


def keep_image(image):
    return image


def image_batches(paths, batch_size, device):
    """``(images, indices, unreadable)`` per batch of ``paths``: the readable PIL images, their
    positions in ``paths`` and the core's ``Unreadable`` items. Decoding runs in worker
    processes on CUDA, as ``iterate_images`` does."""
    workers = min(4, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = DataLoader(ImageDataset(paths, keep_image), batch_size=batch_size, num_workers=workers,
                        collate_fn=split_unreadable)
    for readable, unreadable in loader:
        yield [image for image, _ in readable], [index for _, index in readable], unreadable


def caption_with_hf(hf, paths, prompt, options=None, *, first_sentence=False, batch_size=8, console=None,
                    label="captioning", seed=0):
    """Caption the image files ``paths`` with ``prompt`` and the generation ``options`` (checked
    ones, ``--set`` key -> value). Unreadable images get a warning line each and are left out
    (returned in ``bad_images``), as ``caption`` does. Sampling (``do_sample``) starts from
    ``seed``, so a command run twice gives the same captions."""
    if batch_size < 1:
        raise VlcapError(f"--batch-size: must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    options = dict(options or {})
    text, config = chat_prompt(hf, prompt), generation_config(hf, options)
    predictions, bad = {}, []
    with progress_bar(label, console) as progress:
        task = progress.add_task(label, total=len(paths))
        for images, indices, unreadable in image_batches(paths, batch_size, hf.device):
            for item in unreadable:
                say(progress.console, f"warning: {item.message}; skipped")
                bad.append(item.message)
            if images:
                answers = hf.processor.batch_decode(generate(hf, model_inputs(hf, images, text), config, options),
                                                    skip_special_tokens=True)
                predictions.update((paths[i].stem, clean_answer(a, first_sentence)) for i, a in zip(indices, answers))
            progress.advance(task, len(indices) + len(unreadable))
    return Captions(predictions, bad)


def caption_folder_with_hf(images_dir, model, out, prompt, options=None, *, device, quantize=None, first_sentence=False,
                           batch_size=8, console=None):
    """Caption every image in ``images_dir`` with the transformers model ``model`` (hub id or
    folder) and write ``{stem: caption}`` to ``out`` atomically. Inputs and options are checked
    before the model loads."""
    paths = find_images(images_dir, unique_stems=True)
    options = dict(options or {})
    check_prompt(prompt)
    check_generation_options(options)
    hf = load_hf_model(model, device, quantize=quantize)
    result = caption_with_hf(hf, paths, prompt, options, first_sentence=first_sentence, batch_size=batch_size,
                             console=console)
    write_predictions(out, result.predictions)
    return result
