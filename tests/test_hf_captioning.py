"""`vlcap caption/visualize --hf-model` on a tiny random LLaVA (CLIP vision tower + Llama text
model, a BPE tokenizer built with `tokenizers`, LLaVA-1.5's chat template) saved in a temporary
folder and loaded offline, as a user's local copy of llava-hf/llava-1.5-7b-hf would be."""
import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED, needs_shared, vlcap_cli

transformers = pytest.importorskip("transformers")

# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json), without the assistant-turn branch.
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
CORPUS = ["a man riding a bicycle down the street.", "two dogs playing in the snow!", "USER:\nASSISTANT:",
          "what is in this image? describe it in one sentence.", "a woman holding an umbrella in the rain",
          "a group of sheep grazing on a green hill", "a skier going down a snowy slope"]
GRID = 4  # 32-px images, 8-px patches: 16 image tokens on 4 x 4 (+ CLS, dropped by the "default" strategy)


def build_tiny_llava(folder, seed=0, strategy="default"):
    """A random LLaVA-1.5-shaped model and its processor, saved as the hub's files are
    (``strategy="full"`` keeps the vision tower's CLS token among the image tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=140, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>")
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                                            chat_template=LLAVA_TEMPLATE)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      image_seq_length=GRID * GRID + (strategy == "full"),
                                      vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # a random model barely reads what it attends to: make the image change the answer
        for layer in model.model.language_model.layers:
            layer.self_attn.v_proj.weight.mul_(5)
            layer.self_attn.o_proj.weight.mul_(5)
    model.generation_config.pad_token_id = 3
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, synthetic):
    """Five images of different sizes and aspect ratios (the processor resizes and crops each)."""
    folder = tmp_path_factory.mktemp("photos")
    for i, source in enumerate(sorted((synthetic / "images_val").iterdir())[:5]):
        Image.open(source).convert("RGB").resize((40 + 9 * i, 56 - 5 * i)).save(folder / f"img{i}.png")
    return folder


def hf_model(tiny_llava, attention=None):
    from vlcap.apps.hf_captioning import load_hf_model
    return load_hf_model(str(tiny_llava), torch.device("cpu"), attention=attention)


def caption(*args):
    return vlcap_cli("caption", *args, width=250)


def test_a_batch_gives_the_captions_each_image_gets_alone(tiny_llava, photos):
    from vlcap.apps.hf_captioning import caption_with_hf
    from vlcap.core.data import find_images
    hf, paths = hf_model(tiny_llava), find_images(photos)
    for options in ({"max_new_tokens": 5}, {"num_beams": 2, "max_new_tokens": 4}):
        batched = caption_with_hf(hf, paths, "Describe the image.", options, batch_size=3).predictions
        alone = caption_with_hf(hf, paths, "Describe the image.", options, batch_size=1).predictions
        assert batched == alone and sorted(batched) == [p.stem for p in paths]
        assert len(set(batched.values())) > 1  # the images matter: not one caption for all
    # LLaVA-1.5 prompts all have one length; where they do not (image tokens varying with the image),
    # the left padding load_hf_model sets keeps every row's answer as it is alone.
    from vlcap.apps.hf_captioning import chat_prompt, generate, generation_config
    from vlcap.core.data import load_image
    images = [load_image(p) for p in paths[:2]]
    texts = [chat_prompt(hf, "Describe the image."), chat_prompt(hf, "What is in this image? Describe it.")]
    config = generation_config(hf, {"max_new_tokens": 6})
    padded = hf.processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert (padded["attention_mask"][0] == 0).any()
    together = generate(hf, padded, config, {})
    for i in range(2):
        alone = generate(hf, hf.processor(images=images[i:i + 1], text=texts[i:i + 1], return_tensors="pt"), config, {})
        assert together[i].tolist()[:alone.size(1)] == alone[0].tolist()


def test_caption_writes_only_the_answer_per_image_stem(tmp_path, tiny_llava, photos):
    out = tmp_path / "pred.json"
    result = caption(photos, "--hf-model", tiny_llava, "--prompt", "Describe the image.", "--out", out,
                     "--set", "max_new_tokens=8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    predictions = json.loads(out.read_text())
    assert sorted(predictions) == [f"img{i}" for i in range(5)]
    hf = hf_model(tiny_llava)  # the answer is what generate adds after the chat prompt, nothing else
    inputs = hf.processor(images=[Image.open(photos / "img3.png")], return_tensors="pt",
                          text=["USER: <image>\nDescribe the image. ASSISTANT:"])
    ids = hf.model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert predictions["img3"] == " ".join(hf.processor.decode(ids, skip_special_tokens=True).split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.json"]  # no temporary file left


def test_generation_options_reach_generate(tmp_path, tiny_llava, photos, monkeypatch):
    seen = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["generation_config"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    result = caption(photos, "--hf-model", tiny_llava, "--prompt", "Describe.", "--out", tmp_path / "p.json",
                     "--set", "max_new_tokens=3", "--set", "repetition_penalty=1.3", "--set", "length_penalty=0.5",
                     "--num-beams", 2, "--batch-size", 5)
    assert result.exit_code == 0, result.output
    config, = seen
    assert (config.num_beams, config.max_new_tokens, config.repetition_penalty, config.length_penalty) == (2, 3, 1.3, 0.5)
    tokenizer = transformers.AutoProcessor.from_pretrained(tiny_llava).tokenizer
    for text in json.loads((tmp_path / "p.json").read_text()).values():
        assert len(tokenizer.encode(text, add_special_tokens=False)) <= 3 + 1  # re-encoding may split one more


def test_first_sentence_keeps_the_answer_up_to_its_first_sentence_end():
    from vlcap.apps.hf_captioning import clean_answer
    assert clean_answer(" A dog runs.  It is\nhappy. ", first_sentence=True) == "A dog runs."
    assert clean_answer("A dog runs on the 3.5 km path! Yes", first_sentence=True) == "A dog runs on the 3.5 km path!"
    assert clean_answer("no end here", first_sentence=True) == "no end here"
    assert clean_answer(" A dog runs.\n It is happy. ") == "A dog runs. It is happy."


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def annotated(tmp_path, photos):
    references = ["a man riding a bicycle", "two dogs playing in the snow", "a woman holding an umbrella",
                  "sheep grazing on a green hill", "a skier going down a slope"]
    names = sorted(p.name for p in photos.iterdir())
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                               "annotations": [{"id": i, "image_id": i, "caption": c}
                                               for i, c in enumerate(references)]}))
    return val


def test_the_comparison_scores_every_setting_with_vlcap_s_evaluation(tmp_path, tiny_llava, photos, tiny_clip):
    from vlcap.core.eval.evaluation import evaluate_files
    from vlcap.core.plugins import registry as load_registry
    val, out = annotated(tmp_path, photos), tmp_path / "compare"
    result = caption(photos, "--hf-model", tiny_llava, "--prompt", "What are these?", "--prompt", "Describe it.",
                     "--set", "num_beams=1", "--set", "num_beams=2", "--set", "max_new_tokens=6",
                     "--annotations", val, "--report", "--clip-model", tiny_clip, "--out-dir", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    settings = [(s["prompt"], s["generation"]) for s in report["settings"]]
    assert settings == [(p, {"num_beams": b, "max_new_tokens": 6}) for p in ("What are these?", "Describe it.")
                        for b in (1, 2)]
    rows = read_csv(out / "report.csv")
    assert [r["generation"] for r in rows] == ["num_beams=1 max_new_tokens=6", "num_beams=2 max_new_tokens=6"] * 2
    for setting, row in zip(report["settings"], rows):
        predictions = out / f"setting-{setting['setting']}.json"
        assert setting["predictions"] == row["predictions"] == str(predictions)
        assert f"{setting['cider']:.4f}" in result.output and f"{setting['clipscore']:.4f}" in result.output
    for setting in report["settings"][-1:]:  # `vlcap evaluate`'s scores (java is slow to start: one of them)
        expected = evaluate_files(setting["predictions"], val, load_registry(), ["cider", "clipscore"],
                                  {"clipscore": {"model": str(tiny_clip)}}, photos)
        assert setting["cider"] == pytest.approx(expected.cider.score)
        assert setting["clipscore"] == pytest.approx(expected.clipscore.score)
    assert json.loads((out / "settings.json").read_text())["settings"] == report["settings"]


def test_a_yaml_grid_gives_the_same_settings(tmp_path, tiny_llava):
    from vlcap.apps.hf_comparison import settings_grid
    grid = tmp_path / "grid.yaml"
    grid.write_text("prompt: [\"What are these?\", Describe it.]\nnum_beams: [1, 2]\nmax_new_tokens: 6\n")
    from_flags = settings_grid(["What are these?", "Describe it."],
                               ["num_beams=1", "num_beams=2", "max_new_tokens=6", "num_beams=2"])
    assert settings_grid(grid_file=grid) == from_flags and len(from_flags) == 4


def test_unreadable_images_follow_caption_s_policy(tmp_path, tiny_llava, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(photos.iterdir())[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred.json"
    args = (folder, "--hf-model", tiny_llava, "--prompt", "Describe.", "--out", out, "--set", "max_new_tokens=2")
    result = caption(*args)
    assert result.exit_code != 0 and "--skip-bad-images" in result.output
    assert any(line.startswith("warning:") and "broken.jpg" in line for line in result.output.splitlines())
    assert sorted(json.loads(out.read_text())) == ["img0", "img1"]
    assert caption(*args, "--skip-bad-images").exit_code == 0


def test_maps_lie_on_the_image_grid_and_equal_the_attention_generation_used(tiny_llava, photos):
    from vlcap.apps.hf_attention import (answer_tokens, image_token_grid, image_token_id, token_attention)
    from vlcap.apps.hf_captioning import chat_prompt, model_inputs
    from vlcap.core.data import load_image
    hf = hf_model(tiny_llava, attention="eager")
    inputs = model_inputs(hf, [load_image(photos / "img1.png")], chat_prompt(hf, "Describe the image."))
    with torch.no_grad():
        out = hf.model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1, output_attentions=True,
                                return_dict_in_generate=True)
    tokens = answer_tokens(hf, out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
    assert len(tokens) >= 3
    images = (inputs["input_ids"][0] == image_token_id(hf)).nonzero().squeeze(-1)
    assert len(images) == GRID * GRID
    grid = image_token_grid(hf, len(images))
    assert (grid.prefix, grid.grid) == (0, (GRID, GRID))
    for layer in (0, 1):
        for head in (None, 3):
            weights = token_attention(hf, inputs, tokens, layer, head)
            assert weights.shape == (len(tokens), GRID * GRID)
            # step k's attentions: (batch, heads, queries, keys); its last query predicted token k
            seen = torch.stack([step[layer][0, :, -1, images] for step in out.attentions[:len(tokens)]])
            seen = seen.mean(1) if head is None else seen[:, head]
            torch.testing.assert_close(weights, seen.float(), atol=1e-5, rtol=1e-5)


def test_a_kept_cls_token_is_left_out_of_the_grid(tmp_path, photos):
    from vlcap.apps.hf_attention import draw_hf_target, image_token_grid
    from vlcap.apps.hf_captioning import chat_prompt, generation_config
    from vlcap.apps.visualize import Target
    hf = hf_model(build_tiny_llava(tmp_path / "full", strategy="full"), attention="eager")
    assert image_token_grid(hf, GRID * GRID + 1).prefix == 1
    drawn = draw_hf_target(hf, Target(photos / "img0.png", "img0"), tmp_path, chat_prompt(hf, "Describe."),
                           generation_config(hf, {"max_new_tokens": 4}), {}, layer=1, head=None, pieces=False,
                           save_npz=True)
    saved = np.load(drawn.npz)
    assert saved["token_weights"].shape[1] == GRID * GRID + 1 and int(saved["num_prefix_tokens"]) == 1
    assert saved["token_maps"].shape[1:] == (GRID, GRID)
    torch.testing.assert_close(torch.from_numpy(saved["token_maps"]).flatten(1),
                               torch.from_numpy(saved["token_weights"][:, 1:]))


def test_visualize_draws_one_panel_per_answer_word_on_the_grid(tmp_path, tiny_llava, photos):
    out = tmp_path / "maps"
    result = vlcap_cli("visualize", photos / "img0.png", photos / "img2.png", "--hf-model", tiny_llava,
                       "--prompt", "Describe the image.", "--out-dir", out, "--set", "max_new_tokens=7",
                       "--layer", 0, "--head", 1, "--save-npz", width=250)
    assert result.exit_code == 0, result.output
    for stem in ("img0", "img2"):
        saved = np.load(out / f"{stem}.npz")
        words = list(saved["words"])
        assert saved["word_maps"].shape == (len(words), GRID, GRID) and tuple(saved["grid_size"]) == (GRID, GRID)
        assert saved["token_weights"].shape == (len(saved["token_ids"]), GRID * GRID)
        assert int(saved["layer"]) == 0 and str(saved["head"]) == "1"
        assert " ".join(words) == str(saved["caption"])  # the answer's words, panel by panel
        assert f"{stem}.png: {len(words) + 1} panels" in result.output
        with Image.open(out / f"{stem}.png") as png:
            assert png.format == "PNG"


def test_rank_by_clipscore_teacher_forces_the_scored_captions(tmp_path, tiny_llava, photos, tiny_clip):
    val = annotated(tmp_path, photos)
    captions = ["a man riding a bicycle", "two dogs in the snow", "a green hill", "sheep", "a skier"]
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({f"img{i}": c for i, c in enumerate(captions)}))
    out = tmp_path / "ranked"
    result = vlcap_cli("visualize", "--rank-by", "clipscore", "--pred", pred, "--annotations", val, "--images", photos,
                       "--clip-model", tiny_clip, "--hf-model", tiny_llava, "--prompt", "Describe.", "--out-dir", out,
                       "--save-npz", width=250)
    assert result.exit_code == 0, result.output
    for npz in sorted(out.glob("*.npz")):
        saved = np.load(npz)
        caption = str(saved["caption"])
        assert caption in captions and list(saved["words"]) == caption.split()
        assert saved["word_maps"].shape == (len(caption.split()), GRID, GRID)
    assert sorted(p.name.split("_")[0] for p in out.glob("*.png")) == ["best-1", "worst-1"]


@pytest.mark.parametrize("text", ["a man riding a bicycle.", "two sheep grazing", "umbrella"])
def test_answer_tokens_merge_into_the_answer_s_words(tiny_llava, text):
    from vlcap.apps.hf_attention import group_answer_words
    tokenizer = transformers.AutoProcessor.from_pretrained(tiny_llava).tokenizer
    tokens = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > len(text.split())  # some words are several BPE pieces
    words = group_answer_words(tokenizer, tokens)
    assert [w.text for w in words] == text.split()
    assert sorted(i for w in words for i in w.pieces) == list(range(len(tokens)))
    assert len(group_answer_words(tokenizer, tokens, pieces=True)) == len(tokens)


@pytest.mark.parametrize("args, message", [
    (["--set", "nbeams=2"], "--set nbeams: not a generation option"),
    (["--set", "temperature=0.5"], "--set temperature=0.5"),
    (["--set", "num_return_sequences=2"], "num_return_sequences"),
    (["--decoding", "beam"], "--decoding: these are a checkpoint's"),
    (["--prompt", "A", "--prompt", "B", "--out", "p.json"], "2 setting(s) write one file each: pass --out-dir"),
    (["--report", "--out-dir", "d"], "--report scores against reference captions"),
    (["--checkpoint", "x.safetensors"], "pass --checkpoint CKPT (a vlcap checkpoint) or --hf-model"),
    (["--quantize", "4bit"], "--quantize 4bit: bitsandbytes loads 4-/8-bit weights on a CUDA GPU only"),
])
def test_bad_options_are_one_line_before_anything_is_written(tmp_path, tiny_llava, photos, monkeypatch, args,
                                                             message):
    monkeypatch.chdir(tmp_path)
    result = caption(photos, "--hf-model", tiny_llava, *(["--prompt", "Describe."] if "--prompt" not in args else []),
                     *args, *(["--out", "p.json"] if "--out" not in args and "--out-dir" not in args else []),
                     "--device", "cpu")
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("grid, args, message", [
    ("num_beams: [1, 2]\n", [], "give 'prompt:' as a string or a list of strings"),
    ("prompt: Describe.\nnum_beams: []\n", [], "num_beams: an empty list gives no setting"),
    ("prompt: Describe.\nbeams: [1, 2]\n", [], "grid.yaml: beams: not a generation option"),
    ("prompt: Describe.\n", ["--prompt", "Other."], "--grid holds the prompts and generation options"),
])
def test_a_bad_grid_is_one_line(tmp_path, tiny_llava, photos, monkeypatch, grid, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(grid)
    result = caption(photos, "--hf-model", tiny_llava, "--grid", "grid.yaml", *args, "--out-dir", "out")
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_weights_are_fp32_on_cpu_and_half_precision_on_a_gpu_as_it_supports(tiny_llava, monkeypatch):
    from vlcap.apps import hf_captioning
    assert hf_model(tiny_llava).model.dtype == torch.float32
    for native, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(hf_captioning, "native_bf16", lambda device, native=native: native)
        assert hf_captioning.model_dtype(torch.device("cuda")) == dtype
        assert hf_captioning.model_dtype(torch.device("cpu")) == torch.float32


def test_prompt_without_hf_model_is_one_line(tmp_path, photos):
    result = caption(photos, "--checkpoint", tmp_path / "best.safetensors", "--prompt", "x", "--out", tmp_path / "p")
    assert result.exit_code != 0 and "--prompt: these go with --hf-model" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_model_that_cannot_be_fetched_says_how_to_use_a_local_copy(tmp_path, photos, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with no network, without waiting
    name = "vlcap-tests/llava-never-cached"  # a hub id no cache holds
    result = caption(photos, "--hf-model", name, "--prompt", "Describe.", "--out", tmp_path / "p.json")
    assert result.exit_code != 0
    line, = result.output.strip().splitlines()
    assert f"could not load '{name}'" in line and f"hf download {name} --local-dir DIR" in line
    assert "--hf-model DIR" in line and not (tmp_path / "p.json").exists()


def test_without_transformers_the_extra_to_install_is_named(tmp_path, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    for command in (["caption", photos, "--out", tmp_path / "p.json"], ["visualize", photos, "--out-dir", tmp_path]):
        result = vlcap_cli(*command, "--hf-model", "llava-hf/llava-1.5-7b-hf", "--prompt", "Describe.")
        assert result.exit_code != 0
        line, = result.output.strip().splitlines()
        assert 'pip install "vlcap[hf]"' in line


@needs_shared
def test_the_comparison_table_on_real_photos(tmp_path, tiny_llava, tiny_clip):
    """The comparison on 10 real Flickr8k photos and their captions (a random model: the scores
    are near zero, the table is what is checked)."""
    flickr = SHARED / "data/flickr8k_1k"
    data = json.loads((flickr / "val.json").read_text())
    images = data["images"][:10]
    ids = {image["id"] for image in images}
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    result = caption(flickr / "images_val", "--hf-model", tiny_llava, "--prompt", "What are these?",
                     "--prompt", "Focus only on the primary subject and its core action in this image.",
                     "--set", "num_beams=2", "--set", "max_new_tokens=8",
                     "--annotations", val, "--report", "--clip-model", tiny_clip, "--out-dir", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cmp/report.json").read_text())
    assert report["images"] == 10 and len(report["settings"]) == 2
    assert all(s["cider"] is not None and s["clipscore"] is not None and s["captions"] == 10 for s in report["settings"])
    for setting in report["settings"]:  # the table: each setting's scores beside its options and prompt
        row = next(line for line in result.output.splitlines() if line.startswith(f"│ {setting['setting']} "))
        assert f"{setting['cider']:.4f}" in row and f"{setting['clipscore']:.4f}" in row
        assert "num_beams=2" in row and setting["prompt"][:8] in row
