"""`vlcap visualize --hf-model`: per-word attention of a transformers vision-language model
(LLaVA-1.5 first) from the answer to the image tokens, drawn as vlcap draws its own captioner's.

The model generates its answer to the chat prompt for one image (no padding), then one
teacher-forced forward of prompt + answer with eager attention returns every layer's weights:
generation is deterministic given the tokens it produced and the model is causal, so the row of
position t is exactly the attention that predicted token t+1 during generation (the tests check
it against ``generate``'s own ``output_attentions``). The k-th answer token's map is the row of
the position before it, restricted to the image tokens' columns: raw softmax weights, not
renormalised (the rest goes to text tokens), which the figure stretches to each panel's own
min..max. The image tokens lie on the vision tower's patch grid (LLaVA-1.5: 576 tokens on 24 x
24, its CLS token dropped by the "default" feature strategy), inferred from the vision config.
"""
import math
from pathlib import Path

import numpy as np
import torch

from vlcap.apps.hf_captioning import (chat_prompt, check_generation_options, check_prompt, generate,
                                      generation_config, load_hf_model, model_inputs)
from vlcap.apps.visualize import Drawn, choose_targets, draw_attention, save_word_maps_npz
from vlcap.core.data import load_image
from vlcap.core.errors import VlcapError
from vlcap.core.model.attention import Word, check_layer, parse_head, patch_grid, word_attention
from vlcap.core.model.connector import ImageTokens


def image_token_grid(hf, count):
    """The grid of ``count`` image tokens: the vision tower's ``image_size / patch_size`` square
    (plus a leading CLS token when there is one more), else a square of ``count`` (a projector
    that pools the patches); anything else (several crops, tiles) is one line."""
    vision = getattr(hf.model.config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        side = size // patch
        if count - side * side in (0, 1):
            return ImageTokens(count - side * side, (side, side))
    side = math.isqrt(count)
    if count and side * side == count:
        return ImageTokens(0, (side, side))
    raise VlcapError(f"{hf.name}: {count} image tokens do not form one patch grid (several crops or tiles?); attention "
                     "maps need a model that encodes the image as one grid, as LLaVA-1.5 does")


def image_token_id(hf):
    token = getattr(hf.processor, "image_token_id", None)
    token = token if token is not None else getattr(hf.model.config, "image_token_id", None)
    if token is None:
        raise VlcapError(f"{hf.name}: neither its processor nor its config names the image token; attention maps "
                         "need to know which positions hold the image")
    return token


def answer_tokens(hf, ids):
    """The answer's token ids up to (not including) the first end or pad token."""
    tokenizer = hf.processor.tokenizer
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    stops |= set(np.atleast_1d(hf.model.generation_config.eos_token_id or []).tolist())
    tokens = []
    for token in ids:
        if token in stops:
            break
        tokens.append(token)
    return tokens


def token_attention(hf, inputs, tokens, layer, head=None):
    """``(len(tokens), image tokens)``: the attention of decoder layer ``layer`` (head ``head``;
    None: the mean over heads) from the position that predicted each answer token to the image
    tokens, for one image's processor ``inputs`` (batch of 1, no padding). Needs a model loaded
    with eager attention (``attn_implementation="eager"``)."""
    prompt = inputs["input_ids"]
    images = (prompt[0] == image_token_id(hf)).nonzero().squeeze(-1)
    if not tokens:
        return torch.zeros(0, len(images))
    answer = torch.tensor([tokens[:-1]], dtype=prompt.dtype, device=prompt.device)
    forward = dict(inputs, input_ids=torch.cat([prompt, answer], 1),
                   attention_mask=torch.ones(1, prompt.size(1) + answer.size(1), dtype=torch.long, device=prompt.device))
    with torch.inference_mode():
        attentions = hf.model(**forward, output_attentions=True).attentions
    if attentions is None or attentions[layer] is None:
        raise VlcapError(f"{hf.name}: the model returned no attention weights; it must be loaded with eager attention")
    start = prompt.size(1) - 1
    weights = attentions[layer][0, :, start:start + len(tokens)][..., images]  # (heads, tokens, image tokens)
    weights = weights.mean(0) if head is None else weights[head]
    return weights.float().cpu()


def group_answer_words(tokenizer, tokens, pieces=False):
    """The answer's tokens as words: a token whose decoded text (of the answer so far) starts
    with whitespace begins a word, any other continues the current one; whatever the tokenizer
    (SentencePiece's "▁", GPT-2's "Ġ") marks spaces with. ``pieces=True``: one entry per token."""
    groups, previous = [], ""
    for index in range(len(tokens)):
        text = tokenizer.decode(tokens[:index + 1], skip_special_tokens=True)
        added = text[len(previous):] if text.startswith(previous) else ""
        if not groups or pieces or (added[:1].isspace() and previous.strip()):
            groups.append([index])
        else:
            groups[-1].append(index)
        previous = text
    return [Word(tokenizer.decode([tokens[i] for i in group], skip_special_tokens=True).strip(), group)
            for group in groups]


def unnormalized_image(hf, pixels):
    """``(3, H, W)`` processor pixels back to ``(H, W, 3)`` RGB in [0, 1]: the image as the vision
    tower sees it (resized and cropped), which its patch grid covers."""
    processor = hf.processor.image_processor
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.0] * 3).view(3, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [1.0] * 3).view(3, 1, 1)
    if not getattr(processor, "do_normalize", True):
        mean, std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def target_answer(hf, target, text, config, options):
    """``(inputs, tokens)``: one image's processor inputs and the answer tokens to draw: the
    generated answer, or the target's own caption (teacher-forced, as for ``--rank-by``)."""
    inputs = model_inputs(hf, [load_image(target.path)], text)
    if target.caption is None:
        ids = generate(hf, inputs, config, options)[0].tolist()
    else:
        ids = hf.processor.tokenizer.encode(target.caption, add_special_tokens=False)
    return inputs, answer_tokens(hf, ids)


def draw_hf_target(hf, target, out_dir, text, config, options, layer, head, pieces, save_npz):
    """The PNG (and with ``save_npz`` the arrays, as vlcap's own ``visualize`` saves them) of one
    target."""
    tokenizer = hf.processor.tokenizer
    inputs, tokens = target_answer(hf, target, text, config, options)
    weights = token_attention(hf, inputs, tokens, layer, head)
    grid = image_token_grid(hf, weights.size(-1))
    caption = tokenizer.decode(tokens, skip_special_tokens=True).strip() if target.caption is None else target.caption
    words = group_answer_words(tokenizer, tokens, pieces)
    per_word = word_attention(weights, words)
    grids = patch_grid(per_word, grid)
    heads = "mean of heads" if head is None else f"head {head}"
    note = f"{target.note} | " if target.note else ""
    title = f"\u201c{caption}\u201d\n{note}{hf.name}: attention to the image, layer {layer}, {heads}"
    png = out_dir / f"{target.name}.png"
    panels = draw_attention(unnormalized_image(hf, inputs["pixel_values"][0]), [w.text for w in words], grids,
                            title, png)
    npz = None
    if save_npz:
        npz = out_dir / f"{target.name}.npz"
        token_texts = [w.text for w in group_answer_words(tokenizer, tokens, pieces=True)]
        save_word_maps_npz(npz, caption=caption, tokens=tokens, token_texts=token_texts, weights=weights, words=words,
                           per_word=per_word, grids=grids, image_tokens=grid, layer=layer, head=head)
    return Drawn(target.name, png, npz, caption, [w.text for w in words], panels, target.note)


def text_config(hf):
    config = hf.model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def draw_hf_attention_maps(images, model, out_dir, prompt, options=None, *, device, quantize=None, layer=-1,
                           head="mean", pieces=False, save_npz=False, rank_by=None, pred_path=None,
                           annotations_path=None, image_dir=None, clip_model=None, top=1, bottom=1, console=None):
    """Draw the attention of the answer to ``prompt`` over each image ``choose_targets`` picks
    (``images``, or ranked with ``rank_by``) into ``out_dir``, with the transformers model
    ``model`` loaded on ``device`` with eager attention. Every input is checked before the model
    loads. Returns one ``Drawn`` per image."""
    options = dict(options or {})
    check_prompt(prompt)
    check_generation_options(options)
    parse_head(head)
    targets = choose_targets(images, rank_by=rank_by, pred_path=pred_path, annotations_path=annotations_path,
                             image_dir=image_dir, clip_model=clip_model, top=top, bottom=bottom, console=console)
    hf = load_hf_model(model, device, quantize=quantize, attention="eager")
    text_cfg = text_config(hf)
    layer = check_layer(layer, text_cfg.num_hidden_layers)
    head = parse_head(head, text_cfg.num_attention_heads)
    text, config = chat_prompt(hf, prompt), generation_config(hf, options)
    return [draw_hf_target(hf, target, Path(out_dir), text, config, options, layer, head, pieces, save_npz)
            for target in targets]
