"""CIDEr and CLIPScore exactly as the course's evaluator computes them, and `vlcap evaluate`."""
import csv
import json
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SHARED, data_overrides, needs_shared, tiny_clip_model, tiny_config, vlcap_cli
from vlcap.core.eval.clip import load_clip
from vlcap.core.errors import VlcapError
from vlcap.core.eval.evaluation import cider, clip_scores, ptb_tokenize
from vlcap.core.train.trainer import selection_key, train

LONG_CAPTION = "a small dog with a red ball running across a very green field of grass " * 8  # > 77 CLIP tokens


def run(*args):
    return vlcap_cli(*args)


def course_cider(predictions, gts):
    """The course evaluator's CIDERScore.__call__, verbatim apart from names."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    predictions = {name: [{"caption": pred}] for name, pred in predictions.items()}
    gts = {name: [{"caption": gt} for gt in gts[name]] for name in gts}
    score, _ = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(predictions))
    return score


@needs_shared
def test_leave_one_out_cider_on_course_references_equals_pycocoevalcap(tmp_path):
    data = json.loads((SHARED / "data/coco_hw3/val.json").read_text())
    by_image = defaultdict(list)
    for annotation in data["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    # Each image's first reference becomes its prediction, scored against the remaining ones.
    held_out = {image_id: annotations[0]["caption"] for image_id, annotations in by_image.items()}
    remaining = dict(data, annotations=[a for a in data["annotations"] if a is not by_image[a["image_id"]][0]])
    names = {image["id"]: image["file_name"].replace(".jpg", "") for image in data["images"]}
    predictions = {names[image_id]: caption for image_id, caption in held_out.items()}
    gts = defaultdict(list)  # the course's getGTCaptions
    for annotation in remaining["annotations"]:
        gts[names[annotation["image_id"]]].append(annotation["caption"])
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    (tmp_path / "refs.json").write_text(json.dumps(remaining))

    result = run("evaluate", "--pred", tmp_path / "pred.json", "--annotations", tmp_path / "refs.json",
                 "--no-clipscore", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["images"] == len(predictions) == 1789
    assert scores["cider"] == course_cider(predictions, gts)  # to the last digit
    assert 0.3 < scores["cider"] < 1.5  # human captions against the other humans'


def test_cider_per_image_scores_and_corpus_mean():
    predictions = {"a": "A dog runs on the grass.", "b": "Two cats sleep.", "c": "a red car"}
    references = {"a": ["a dog running on grass", "The dog runs."], "b": ["two cats sleeping on a sofa", "cats"],
                  "c": ["a dog on a beach", "a boat"]}
    result = cider(predictions, references)
    assert result.score == course_cider(predictions, references)
    assert set(result.per_image) == set(predictions)
    assert result.per_image["a"] > result.per_image["c"] >= 0
    assert abs(sum(result.per_image.values()) / 3 - result.score) < 1e-12


def test_ptb_tokenizer_keeps_captions_on_their_image_and_runs_concurrently():
    # Java's -preserveLines splits on \r and U+2028 too; pycocoevalcap alone would shift "b" onto "a".
    captions = {"a": ["One\rtwo,", "three\u2028four"], "b": ["Five."]}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(ptb_tokenize, [captions, captions]))
    assert results == [{"a": ["one two", "three four"], "b": ["five"]}] * 2


def test_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VlcapError, match="apt-get install default-jre-headless"):
        cider({"a": "a dog"}, {"a": ["a dog"]})


def write_images(folder, count=6, size=(48, 40)):
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return {f"img{i}": folder / f"img{i}.png" for i in range(count)}


CAPTIONS = ["a dog on the grass", "two cats", "a red car parked in the street", "a bowl of fruit",
            LONG_CAPTION, "people walking"]


def independent_clipscore(paths, captions):
    """The course's CLIPScore loop on the tiny CLIP, with the preprocessing spelled out in torchvision."""
    from open_clip import tokenize
    from torchvision import transforms
    model = tiny_clip_model()
    preprocess = transforms.Compose([
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    total, scores = 0.0, []
    with torch.no_grad():
        for path, caption in zip(paths, captions):
            image = model.encode_image(preprocess(Image.open(path).convert("RGB")).unsqueeze(0))
            text = model.encode_text(tokenize([caption]))
            score = 2.5 * max(F.cosine_similarity(image, text).item(), 0)
            scores.append(score)
            total += score
    return total / len(paths), scores


def test_clipscore_equals_an_independent_computation(tmp_path, tiny_clip):
    paths = write_images(tmp_path / "images")
    predictions = dict(zip(paths, CAPTIONS))
    result = clip_scores(predictions, paths, load_clip(str(tiny_clip), device="cpu"), batch_size=4,
                         show_progress=False)
    want, want_each = independent_clipscore(paths.values(), CAPTIONS)
    assert result.score == pytest.approx(want, abs=1e-6)
    assert list(result.per_image.values()) == pytest.approx(want_each, abs=1e-6)
    assert any(s == 0 for s in want_each) and any(s > 0 for s in want_each)  # both sides of max(cos, 0)
    assert result.truncated == ["img4"]


def test_unreadable_image_is_named(tmp_path, tiny_clip):
    paths = write_images(tmp_path / "images", count=3)
    paths["img1"].write_bytes(b"not a png")
    with pytest.raises(VlcapError, match=r"img1.png: unreadable image"):
        clip_scores(dict(zip(paths, CAPTIONS)), paths, load_clip(str(tiny_clip), device="cpu"), show_progress=False)


def write_annotations(path, stems, suffix=".png"):
    images = [{"id": i, "file_name": f"{stem}{suffix}"} for i, stem in enumerate(stems)]
    annotations = [{"id": 2 * i + k, "image_id": i, "caption": f"{caption} {k}"}
                   for i, caption in enumerate(CAPTIONS[:len(stems)]) for k in range(2)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_evaluate_command_scores_writes_per_image_csv_and_ranks(tmp_path, tiny_clip):
    paths = write_images(tmp_path / "images")
    annotations = write_annotations(tmp_path / "val.json", list(paths))
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps(dict(zip(paths, CAPTIONS))))
    common = ["--pred", pred, "--annotations", annotations, "--images", tmp_path / "images",
              "--clip-model", tiny_clip, "--batch-size", 4]
    result = run("evaluate", *common, "--json", "--per-image", tmp_path / "out/scores.csv")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["clipscore"] == pytest.approx(independent_clipscore(paths.values(), CAPTIONS)[0], abs=1e-6)
    assert scores["cider"] == course_cider(dict(zip(paths, CAPTIONS)),
                                           {s: [f"{c} 0", f"{c} 1"] for s, c in zip(paths, CAPTIONS)})
    assert scores["truncated"] == ["img4"] and "1 caption(s) longer than CLIP's 77 tokens" in result.stderr
    with open(tmp_path / "out/scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["stem"] for r in rows) == sorted(paths)
    clipscores = [float(r["clipscore"]) for r in rows]
    assert clipscores == sorted(clipscores, reverse=True)  # best first
    assert sum(clipscores) / len(rows) == pytest.approx(scores["clipscore"], abs=1e-12)
    assert {r["stem"]: r["caption"] for r in rows} == dict(zip(paths, CAPTIONS))

    table = run("evaluate", *common, "--top-k", 2)
    assert table.exit_code == 0, table.output
    assert "CIDEr" in table.stdout and "CLIPScore" in table.stdout
    assert "top 2 by CLIPScore" in table.stdout and "bottom 2 by CLIPScore" in table.stdout
    assert rows[0]["stem"] in table.stdout.split("bottom 2")[0] and rows[-1]["stem"] in table.stdout.split("bottom 2")[1]


@pytest.mark.parametrize("case, message", [
    ("missing key", r"pred.json \(against .*val.json\): keys must be exactly the annotated image stems; "
                    r"1 annotated image\(s\) have no prediction: img2"),
    ("extra key", r"1 prediction key\(s\) are not annotated images: stray"),
    ("non-string caption", r"caption\(s\) must be strings; not a string for 2 image\(s\): img0, img1"),
    ("not an object", r"pred.json \(against .*\): expected a JSON object mapping image stem -> caption, got list"),
    ("empty file", r"pred.json: the prediction file is empty"),
    ("invalid JSON", r"pred.json: not valid JSON"),
    ("no prediction file", r"pred.json: prediction file not found"),
    ("missing image", r"val.json \(images in .*images\): 1 image file\(s\) missing: .*img1.png"),
    ("no image folder given", r"CLIPScore needs the images: pass --images DIR \(or --no-clipscore\)"),
    ("missing annotations", r"val.json: caption file not found"),
])
def test_bad_evaluate_input_is_one_clear_line(tmp_path, case, message):
    stems = ["img0", "img1", "img2"]
    images = tmp_path / "images"
    images.mkdir()
    for stem in stems:
        Image.new("RGB", (8, 8)).save(images / f"{stem}.png")
    annotations = write_annotations(tmp_path / "val.json", stems)
    predictions = {stem: "a caption" for stem in stems}
    pred = tmp_path / "pred.json"
    args = ["--images", images, "--clip-model", "no-such-model-is-loaded-before-the-inputs-are-checked"]
    if case == "missing key":
        del predictions["img2"]
    elif case == "extra key":
        predictions["stray"] = "a caption"
    elif case == "non-string caption":
        predictions.update(img0=["a list"], img1=None)
    elif case == "missing image":
        (images / "img1.png").unlink()
    elif case == "no image folder given":
        args = []
    elif case == "missing annotations":
        annotations.unlink()
    pred.write_text({"not an object": "[]", "empty file": "  \n", "invalid JSON": "{'img0': 'x'"}.get(
        case, json.dumps(predictions)))
    if case == "no prediction file":
        pred.unlink()
    result = run("evaluate", "--pred", pred, "--annotations", annotations, *args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]


def test_training_reports_cider_and_selects_by_it(tmp_path, synthetic, registry):
    cfg = tiny_config("lora", **data_overrides(synthetic), train={"max_steps": 2, "batch_size": 60,
                                                                  "max_val_images": 4})
    assert cfg.train.metrics == ["cider"] and cfg.train.best_metric == "auto"
    assert selection_key(cfg, registry, has_val=True) == ("cider", True)
    result = train(cfg, tmp_path / "run", registry)
    history = [json.loads(line) for line in (tmp_path / "run/history.jsonl").read_text().splitlines()]
    assert history == result.history and all(isinstance(r["cider"], float) and r["cider"] >= 0 for r in history)


@pytest.mark.parametrize("train_options, message", [
    ({"metrics": "cider"}, r"train.metrics = 'cider': expected a list of text"),
    ({"metrics": ["bleu"]}, r"unknown metric 'bleu'; installed: cider, clipscore"),
    ({"metrics": [], "best_metric": "cider"}, r"train.best_metric=cider is not computed"),
])
def test_bad_metric_choices_fail_before_training(tmp_path, synthetic, registry, train_options, message):
    with pytest.raises(VlcapError, match=message):
        train(tiny_config("lora", **data_overrides(synthetic), train=train_options), tmp_path / "run", registry)
    assert not (tmp_path / "run/last.safetensors").exists()


def test_training_without_java_says_how_to_train_without_cider(tmp_path, synthetic, registry, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = tiny_config("lora", **data_overrides(synthetic))
    with pytest.raises(VlcapError, match=r"default-jre-headless.*--set train.metrics=\[\]"):
        train(cfg, tmp_path / "run", registry)
    cfg = tiny_config("lora", **data_overrides(synthetic), train={"metrics": [], "max_steps": 1})
    assert "cider" not in train(cfg, tmp_path / "run", registry).history[0]  # selects by validation loss, no java needed


def test_the_java_tokenizer_prints_nothing_into_the_terminal(capfd):
    references = {"a": ["a dog running on grass", "the dog runs"], "b": ["two cats on a sofa", "cats sleeping"]}
    result = cider({"a": "a dog runs", "b": "two cats"}, references)
    assert result.score > 0
    captured = capfd.readouterr()
    assert "PTBTokenizer" not in captured.err and "tokens at" not in captured.err
    assert captured.out == ""


def test_a_clip_that_cannot_be_loaded_points_to_no_clipscore(tmp_path):
    annotations = tmp_path / "val.json"
    annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                       "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]}))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pred.json").write_text(json.dumps({"a": "a dog"}))
    result = run("evaluate", "--pred", tmp_path / "pred.json", "--annotations", annotations, "--images", tmp_path,
                 "--clip-model", tmp_path / "missing-clip.pt")
    assert result.exit_code == 1
    assert "--no-clipscore" in result.output.splitlines()[-1]
