"""vlcap vit-maps: the position-embedding similarity grid and the [class]-token attention maps,
checked against their definitions on timm's test ViT and small ViTs built here."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from timm.utils import AttentionExtract

from conftest import SHARED, needs_shared, vlcap_cli
from vlcap.core.errors import VlcapError
from vlcap.core.model import vit_inspect


def small_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    return VisionTransformer(**{**options, **kwargs}).eval()


@pytest.fixture(scope="module")
def test_vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def test_similarity_grid_has_the_models_patch_grid_and_ones_on_its_diagonal(test_vit):
    similarity = vit_inspect.position_similarity(test_vit)
    assert similarity.shape == (10, 10, 10, 10)  # test_vit: 160 px / 16 px patches
    flat = similarity.reshape(100, 100)
    assert torch.allclose(torch.diagonal(flat), torch.ones(100), atol=1e-5)
    assert torch.allclose(flat, flat.T, atol=1e-6) and flat.abs().max() <= 1 + 1e-5


def test_prefix_positions_are_left_out_and_a_non_square_grid_keeps_its_shape():
    vit = small_vit(img_size=(32, 48), reg_tokens=2)  # [class] + 2 registers, a 4 x 6 grid
    assert vit.num_prefix_tokens == 3 and vit.pos_embed.shape[1] in (24, 27)
    similarity = vit_inspect.position_similarity(vit)
    assert similarity.shape == (4, 6, 4, 6)
    patches = torch.nn.functional.normalize(vit.pos_embed[0, -24:].detach(), dim=-1)
    assert torch.allclose(similarity[1, 2].reshape(-1), patches[1 * 6 + 2] @ patches.T, atol=1e-6)


def manual_cls_attention(vit, pixels, layer):
    """softmax(q_cls k^T / sqrt(d)) of block ``layer``, averaged over heads, written out by hand."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    for block in vit.blocks[:layer]:
        x = block(x)
    attn = vit.blocks[layer].attn
    h = vit.blocks[layer].norm1(x)
    q, k, _ = (h @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    heads, d = attn.num_heads, attn.head_dim
    q = q.unflatten(-1, (heads, d)).transpose(1, 2)
    k = k.unflatten(-1, (heads, d)).transpose(1, 2)
    weights = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / d ** 0.5, dim=-1)  # (B, heads, 1, tokens)
    return weights[:, :, 0, vit.num_prefix_tokens:].mean(dim=1)


@pytest.mark.parametrize("layer", [0, -1])
def test_cls_attention_equals_a_manual_softmax_over_the_patches(test_vit, layer):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 160, 160)
    weights = vit_inspect.attention_weights(test_vit, pixels, layer)
    maps = vit_inspect.query_attention(test_vit, weights, "cls")
    assert maps.shape == (2, test_vit.blocks[0].attn.num_heads, 10, 10)
    index = layer % len(test_vit.blocks)
    with torch.no_grad():
        expected = manual_cls_attention(test_vit, pixels, index)
    assert torch.allclose(maps.mean(dim=1).reshape(2, -1), expected, atol=1e-6)
    assert torch.allclose(weights.sum(dim=-1), torch.ones_like(weights.sum(dim=-1)), atol=1e-5)


def test_attention_weights_equal_timms_own_unfused_attention():
    vit = small_vit(reg_tokens=1, qk_norm=True)
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 32, 32)
    ours = vit_inspect.attention_weights(vit, pixels, 1)
    for block in vit.blocks:
        block.attn.fused_attn = False  # timm then computes (and passes through attn_drop) the weights
    extracted = AttentionExtract(vit, names=["blocks.1.attn.attn_drop"], method="hook")(pixels)
    assert torch.allclose(ours, next(iter(extracted.values())), atol=1e-6)


def test_a_model_without_class_token_says_so_and_offers_the_mean_over_patch_queries():
    vit = small_vit(class_token=False, global_pool="avg")
    weights = vit_inspect.attention_weights(vit, torch.randn(1, 3, 32, 32), -1)
    with pytest.raises(VlcapError, match="no \\[class\\] token; pass --query mean"):
        vit_inspect.query_attention(vit, weights, "cls")
    mean = vit_inspect.query_attention(vit, weights, "mean")
    assert mean.shape == (1, 4, 4, 4)
    assert torch.allclose(mean[0].reshape(4, -1), weights[0].mean(dim=1), atol=1e-6)


def test_attention_that_is_not_timms_plain_attention_is_refused_in_one_line():
    vit = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28).eval()  # rotary positions
    with pytest.raises(VlcapError, match="is not timm's multi-head Attention"):
        vit_inspect.attention_weights(vit, torch.randn(1, 3, 28, 28), -1)


def write_images(folder, count=2):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_cli_writes_the_grid_and_one_attention_figure_per_image_with_raw_arrays(tmp_path):
    images = write_images(tmp_path / "images")
    out = tmp_path / "maps"
    result = vlcap_cli("vit-maps", images, "--encoder", "test_vit", "--no-pretrained", "--out-dir", out,
                       "--layer", "2", "--save-npz", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"pos-embed.png", "pos-embed.npz", "img0_cls-attention.png",
                                               "img0_cls-attention.npz", "img1_cls-attention.png",
                                               "img1_cls-attention.npz"}
    grid = np.load(out / "pos-embed.npz")
    assert grid["similarity"].shape == (10, 10, 10, 10) and list(grid["grid_size"]) == [10, 10]
    arrays = np.load(out / "img0_cls-attention.npz")
    assert arrays["head_maps"].shape == (2, 10, 10) and int(arrays["layer"]) == 2
    assert np.allclose(arrays["mean_map"], arrays["head_maps"].mean(axis=0))
    assert np.allclose(arrays["head_maps"].reshape(2, -1), arrays["weights"][:, 0, 1:])


@pytest.mark.parametrize("args, message", [
    (["--layer", "6"], "--layer 6: out of range for a 6-layer ViT"),
    (["--checkpoint", "missing.safetensors"], "pass either --encoder NAME"),
    (["--query", "mean", "--encoder", "resnet10t"], "'resnet10t' is not a ViT"),
])
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, args, message):
    images = write_images(tmp_path / "images", 1)
    out = tmp_path / "maps"
    encoder = [] if "--encoder" in args else ["--encoder", "test_vit"]
    result = vlcap_cli("vit-maps", images, *encoder, "--no-pretrained", "--out-dir", out, *args)
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@needs_shared
def test_course_attention_images_draw_from_a_captioner_checkpoints_encoder(tmp_path, run_dir):
    images = [SHARED / "data/hw3_p3_images" / name for name in ("bike.jpg", "umbrella.jpg")]
    result = vlcap_cli("vit-maps", *images, "--checkpoint", run_dir / "best.safetensors", "--out-dir", tmp_path,
                       "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*_cls-attention.png")) == ["bike_cls-attention.png",
                                                                             "umbrella_cls-attention.png"]
    assert (tmp_path / "pos-embed.png").stat().st_size > 0
