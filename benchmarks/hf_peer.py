"""The Hugging Face stack the benchmarks compare vlcap against, at vlcap's shapes and at its best
equal settings: transformers' VisionEncoderDecoderModel (ViTModel + GPT2LMHeadModel with
cross-attention), its fastest attention (``sdpa``), no dropout (vlcap's decoder has none), and
for training HF peft LoRA on exactly vlcap's default targets.

GPT-2's self-attention is one fused ``c_attn`` (a Conv1D making q, k and v); peft can only adapt
a whole module, so ``split_qkv`` turns each into three Linear layers (``q``, ``k``, ``v``, the
same weights, outputs concatenated) and LoRA targets ``q`` and ``v``: the same rank-r update on
the same slices as vlcap's lora (loralib ``MergedLinear`` with q and v enabled), not one rank-r
update shared by the whole q/k/v. The cross-attention, its LayerNorm and the encoder-to-decoder
projection are made trainable directly (``requires_grad``), not through ``modules_to_save``,
which would keep a frozen original beside a trainable copy of each.

``copy_decoder`` puts a vlcap decoder's weights (LoRA merged) into the HF GPT-2, so the decoding
benchmark can run HF ``generate`` on the very model vlcap decodes.
"""
import torch
from torch import nn

FUSED_QKV = ("q", "k", "v")


def hf_captioner(encoder_shape, decoder_cfg, end_id):
    """An untrained ``VisionEncoderDecoderModel`` the size of a vlcap captioner: ``encoder_shape``
    is vlcap's ``ImageEncoder`` (a meta-device one is enough: only its sizes are read),
    ``decoder_cfg`` its ``GPT2Config``. HF adds its own trained ``enc_to_dec_proj`` only where
    the widths differ; ``HFCaptioner`` adds vlcap's where they do not."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel, VisionEncoderDecoderModel
    vit = encoder_shape.vit
    encoder = ViTModel(ViTConfig(hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks),
                                 num_attention_heads=vit.blocks[0].attn.num_heads,
                                 intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                                 image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attn_implementation="sdpa"), add_pooling_layer=False)
    d = decoder_cfg
    decoder = GPT2LMHeadModel(GPT2Config(n_embd=d.n_embd, n_layer=d.n_layer, n_head=d.n_head, n_positions=d.block_size,
                                         vocab_size=d.vocab_size, add_cross_attention=True, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=end_id, eos_token_id=end_id,
                                         attn_implementation="sdpa"))
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = model.config.pad_token_id = end_id
    return model


class SplitQKV(nn.Module):
    """GPT-2's fused q/k/v Conv1D as three Linear layers whose outputs are concatenated: what it
    computes is unchanged, and peft can target ``q`` and ``v`` alone."""

    def __init__(self, conv1d):
        super().__init__()
        width = conv1d.weight.size(0)
        weights = conv1d.weight.detach().t().split(width)  # Conv1D stores (in, out)
        biases = conv1d.bias.detach().split(width)
        for name, weight, bias in zip(FUSED_QKV, weights, biases):
            layer = nn.Linear(width, width, device=weight.device, dtype=weight.dtype)
            layer.weight.data.copy_(weight)
            layer.bias.data.copy_(bias)
            setattr(self, name, layer)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model):
    """Every GPT-2 block's self-attention ``c_attn`` as a ``SplitQKV``."""
    for block in model.decoder.transformer.h:
        block.attn.c_attn = SplitQKV(block.attn.c_attn)
    return model


def trained_by_vlcap(name):
    """The parameters vlcap trains besides LoRA: cross-attention, its LayerNorm, the projection."""
    return any(part in name for part in (".crossattention.", ".ln_cross_attn.", "enc_to_dec_proj."))


def with_lora(model, r, alpha, dropout):
    """HF peft LoRA of rank ``r`` on q and v of every self-attention (after ``split_qkv``), the
    encoder frozen, the cross-attention and projection trainable in place."""
    from peft import LoraConfig, get_peft_model
    split_qkv(model)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=r".*\.h\.\d+\.attn\.c_attn\.(q|v)")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if trained_by_vlcap(name):
            p.requires_grad_(True)
    return model


def conv1d_weight(*linears):
    """Linear layers' weights stacked on the output side, in Conv1D's (in, out) layout."""
    return torch.cat([layer.weight.detach() for layer in linears]).t()


def copy_decoder(vlcap_decoder, hf_decoder):
    """Load a vlcap ``GPT2Decoder`` (any trained LoRA already merged into its weights, so every
    layer reads as a plain Linear) into HF's ``GPT2LMHeadModel``; the LM head stays tied."""
    src = vlcap_decoder
    state = {"transformer.wte.weight": src.wte.weight, "transformer.wpe.weight": src.wpe.weight,
             "transformer.ln_f.weight": src.ln_f.weight, "transformer.ln_f.bias": src.ln_f.bias}
    for i, block in enumerate(src.h):
        h = f"transformer.h.{i}."
        cross = block.cross_attn
        parts = {"ln_1": block.ln_1, "ln_cross_attn": block.ln_cross, "ln_2": block.ln_2}
        state.update({f"{h}{name}.{p}": getattr(layer, p) for name, layer in parts.items() for p in ("weight", "bias")})
        state.update({
            f"{h}attn.c_attn.weight": conv1d_weight(block.attn.c_attn), f"{h}attn.c_attn.bias": block.attn.c_attn.bias,
            f"{h}attn.c_proj.weight": conv1d_weight(block.attn.c_proj), f"{h}attn.c_proj.bias": block.attn.c_proj.bias,
            f"{h}crossattention.q_attn.weight": conv1d_weight(cross.q), f"{h}crossattention.q_attn.bias": cross.q.bias,
            f"{h}crossattention.c_attn.weight": conv1d_weight(cross.k, cross.v),
            f"{h}crossattention.c_attn.bias": torch.cat([cross.k.bias, cross.v.bias]),
            f"{h}crossattention.c_proj.weight": conv1d_weight(cross.c_proj),
            f"{h}crossattention.c_proj.bias": cross.c_proj.bias,
            f"{h}mlp.c_fc.weight": conv1d_weight(block.mlp.c_fc), f"{h}mlp.c_fc.bias": block.mlp.c_fc.bias,
            f"{h}mlp.c_proj.weight": conv1d_weight(block.mlp.c_proj), f"{h}mlp.c_proj.bias": block.mlp.c_proj.bias})
    missing, unexpected = hf_decoder.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]  # tied; causal-mask buffers
    if missing or unexpected:
        raise ValueError(f"decoder copy: missing {missing}, unexpected {unexpected}")
    hf_decoder.tie_weights()
    return hf_decoder


def decoding_peer(captioner, method, end_id):
    """The ``VisionEncoderDecoderModel`` that decodes exactly as ``captioner`` does, fed the same
    image tokens: its GPT-2 holds the captioner's decoder with the PEFT method (which must be
    mergeable, e.g. lora) merged in; ``generate`` gets ``captioner.encode``'s projected tokens as
    ``encoder_outputs``, so its encoder is a never-run stand-in of the decoder's width (no
    ``enc_to_dec_proj``). The captioner itself is not changed."""
    import copy
    from types import SimpleNamespace
    merged = copy.deepcopy(captioner).eval()
    method.merge(merged)
    width = merged.decoder.cfg.n_embd
    stand_in = SimpleNamespace(vit=SimpleNamespace(
        embed_dim=width, blocks=[SimpleNamespace(attn=SimpleNamespace(num_heads=1), mlp=SimpleNamespace(fc1=nn.Linear(1, 1)))],
        patch_embed=SimpleNamespace(img_size=(16, 16), patch_size=(16, 16))))
    model = hf_captioner(stand_in, merged.decoder.cfg, end_id)
    copy_decoder(merged.decoder, model.decoder)
    return model.to(next(captioner.parameters()).device).eval()


def hf_generate(model, memory, *, start_id, end_id, max_length, num_beams=1, length_penalty=1.0):
    """HF ``generate`` from projected image tokens ``memory`` ``(B, N, n_embd)``: greedy
    (``num_beams=1``) or beam search. Token lists as vlcap returns them: no start token, cut
    before the end token. ``end_id=None``: no token ends a caption (every row runs to
    ``max_length``)."""
    from transformers import GenerationConfig
    from transformers.modeling_outputs import BaseModelOutput
    config = GenerationConfig(decoder_start_token_id=start_id, bos_token_id=start_id, pad_token_id=start_id,
                              eos_token_id=end_id, max_new_tokens=max_length, num_beams=num_beams, do_sample=False,
                              length_penalty=length_penalty, early_stopping=False)
    model.generation_config = config  # else generate fills what this leaves None (eos_token_id) from the model's
    with torch.inference_mode():
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory))
    rows = out[:, 1:].tolist()
    return [row[:row.index(end_id)] if end_id is not None and end_id in row else row for row in rows]
