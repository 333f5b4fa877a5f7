"""`vlcap classify` and hw3_1.sh: zero-shot CLIP classification, template reports, top-5 plots."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from conftest import SHARED, needs_shared, vlcap_cli
from vlcap.apps import classify as zs
from vlcap.core.eval.clip import CLIP_MODEL_ENV, load_clip
from vlcap.core.errors import VlcapError

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
MIXED = {"cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
# hw3_p1_val's ids 0-6 (from shared/README.md), then other CIFAR-100 classes up to 50.
CIFAR_50 = ("bicycle chair camel rabbit lamp clock forest apple aquarium_fish baby bear beaver bed bee beetle "
            "boy bridge bus butterfly can castle caterpillar cattle cloud cockroach couch crab crocodile cup "
            "dinosaur dolphin elephant flatfish girl hamster house kangaroo keyboard lawn_mower leopard lion "
            "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree").split()


class ColourClip:
    """A CLIP whose right answers are known: an image embeds as its mean colour; a text as the
    colour it names, pointing away from it when the text says "not", plus a 4th component that
    differs between templates (so ensembling is visible)."""
    name = "colour-clip"
    device = torch.device("cpu")
    model = SimpleNamespace(logit_scale=torch.tensor(math.log(100.0)))
    preprocess = staticmethod(to_tensor)

    def encode_images(self, pixels):
        return F.normalize(F.pad(pixels.mean(dim=(2, 3)), (0, 1)), dim=-1)

    def encode_texts(self, texts):
        rows = []
        for text in texts:
            word, rgb = next((w, rgb) for w, rgb in {**COLOURS, **MIXED}.items() if w in text)
            sign = -1.0 if "not" in text.split() else 1.0
            template_part = len(text.replace(word, "")) % 7 / 7
            rows.append(torch.cat([sign * torch.tensor(rgb), torch.tensor([template_part])]))
        return F.normalize(torch.stack(rows), dim=-1)


def colour_images(folder, per_class=4, broken=()):
    """``{class}_{n}.png`` images of each colour (slightly noisy), plus unreadable files."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for class_id, rgb in enumerate(COLOURS.values()):
        for n in range(per_class):
            pixels = (torch.tensor(rgb)[:, None, None] * 0.8 + 0.2 * torch.rand(3, 12, 12, generator=generator))
            Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{class_id}_{n}.png")
    for name in broken:
        (folder / name).write_bytes(b"not a png")
    return folder


def write_labels(path, names):
    path.write_text(json.dumps({str(i): name for i, name in enumerate(names)}))
    return path


@pytest.fixture
def colour_clip(monkeypatch):
    monkeypatch.setattr("vlcap.core.eval.clip.load_clip", lambda *args, **kwargs: ColourClip())


def run(*args):
    return vlcap_cli("classify", *args)


def read_predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "label"]
    return {name: int(label) for name, label in rows[1:]}


@needs_shared
def test_hw3_1_writes_a_prediction_for_every_course_image(tmp_path, tiny_clip):
    images = SHARED / "data/hw3_p1_val/images"
    write_labels(tmp_path / "id2label.json", CIFAR_50)
    env = {**os.environ, CLIP_MODEL_ENV: str(tiny_clip),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "hw3_1.sh"), str(images), "id2label.json", "out.csv"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    predictions = read_predictions(tmp_path / "out.csv")
    assert len(predictions) == 2500
    assert set(predictions) == {p.name for p in images.iterdir()}
    assert set(predictions.values()) <= set(range(50))


def test_known_answers_give_known_accuracy_per_template(tmp_path, colour_clip):
    folder = colour_images(tmp_path / "images")
    labels = write_labels(tmp_path / "id2label.json", COLOURS)
    result = run(folder, "--labels", labels, "--report", "--out", tmp_path / "pred.csv",
                 "--template", "a photo of a {object} thing.", "--template", "not a {object} photo.",
                 "--template", "a {object} photo.")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
            if line.count("│") == 4}
    assert rows == {"a photo of a {object} thing.": "100.00%",
                    "not a {object} photo.": "0.00%", "a {object} photo.": "100.00%",
                    "ensemble of 3 templates": "100.00%"}
    assert read_predictions(tmp_path / "pred.csv") == {f"{c}_{n}.png": c for c in range(3) for n in range(4)}


def test_ensemble_is_the_renormalised_mean_of_template_embeddings(tiny_clip, tmp_path):
    clip = load_clip(str(tiny_clip), device="cpu")
    names = ["bicycle", "camel", "lamp"]
    templates = ["a photo of a {object}.", "a blurry photo of the {object}.", "No {object}, no score."]
    tokenize = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        per_template = [F.normalize(clip.model.encode_text(tokenize([t.replace("{object}", n) for n in names])), dim=-1)
                        for t in templates]
    mean = torch.stack(per_template).mean(dim=0)
    want = mean / mean.norm(dim=-1, keepdim=True)
    got = zs.ensemble(zs.text_embeddings(clip, names, t) for t in templates)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, per_template[0], atol=1e-3)

    # The command predicts with exactly that ensemble and CLIP's logit scale.
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(1)
    for n in range(6):
        Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).byte().numpy()).save(folder / f"img{n}.png")
    labels = write_labels(tmp_path / "id2label.json", names)
    args = [folder, "--labels", labels, "--out", tmp_path / "pred.csv", "--clip-model", tiny_clip]
    assert run(*args, *[x for t in templates for x in ("--template", t)]).exit_code == 0
    pixels = torch.stack([clip.preprocess(Image.open(folder / f"img{n}.png").convert("RGB")) for n in range(6)])
    logits = clip.model.logit_scale.exp() * F.normalize(clip.model.encode_image(pixels), dim=-1) @ want.T
    expected = {f"img{n}.png": label for n, label in enumerate(logits.argmax(dim=-1).tolist())}
    assert read_predictions(tmp_path / "pred.csv") == expected


def test_default_templates_are_valid_and_distinct():
    assert len(set(zs.DEFAULT_TEMPLATES)) == len(zs.DEFAULT_TEMPLATES) == 18
    assert "a photo of a {object}." in zs.DEFAULT_TEMPLATES
    assert all(zs.check_template(t) for t in zs.DEFAULT_TEMPLATES)


def test_top5_plot_is_a_png_of_the_five_most_probable_classes(tmp_path, colour_clip):
    probs = torch.tensor([0.02, 0.3, 0.05, 0.4, 0.03, 0.1, 0.1])
    labels = zs.Labels(list(range(7)), ["a", "b", "c", "d", "e", "f", "g"])
    drawn = zs.plot_top5(Image.new("RGB", (32, 32), "red"), probs, labels, tmp_path / "plot.png")
    assert [name for name, _ in drawn][:2] == ["d", "b"] and len(drawn) == 5
    assert sorted(name for name, _ in drawn[2:]) == ["c", "f", "g"]
    assert sum(height for _, height in drawn) <= 1
    with Image.open(tmp_path / "plot.png") as png:
        assert png.format == "PNG" and png.width > 200

    folder = colour_images(tmp_path / "images")
    labels_file = write_labels(tmp_path / "id2label.json", [*COLOURS, *MIXED])
    result = run(folder, "--labels", labels_file, "--plot-top5", 3, "--out-dir", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "plots").glob("*_top5.png"))
    assert len(pngs) == 3 and all(Image.open(p).format == "PNG" for p in pngs)


def test_bad_label_files_are_one_line_errors(tmp_path):
    cases = {"missing.json": None, "broken.json": "{not json", "list.json": '["bicycle"]', "empty.json": "{}",
             "key.json": '{"zero": "bicycle"}', "name.json": '{"0": ""}'}
    messages = []
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(VlcapError, match=name) as error:
            zs.load_labels(tmp_path / name)
        messages.append(str(error.value))
    assert "not found" in messages[0] and "not valid JSON" in messages[1] and "not a class id" in messages[4]


def test_bad_inputs_stop_before_the_model_loads(tmp_path):
    labels = write_labels(tmp_path / "id2label.json", COLOURS)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = run(empty, "--labels", labels, "--out", tmp_path / "pred.csv", "--clip-model", "ViT-Q/9")
    assert result.exit_code == 1 and "no images" in result.output

    folder = colour_images(tmp_path / "images")
    result = run(folder, "--labels", labels, "--out", tmp_path / "pred.csv", "--template", "a photo of a {}.")
    assert result.exit_code == 1 and "must contain {object}" in result.output
    (folder / "9_0.png").write_bytes((folder / "0_0.png").read_bytes())
    result = run(folder, "--labels", labels, "--report", "--clip-model", "ViT-Q/9")
    assert result.exit_code == 1 and "class id(s) 9" in result.output
    assert not (tmp_path / "pred.csv").exists()


def test_ground_truth_csv(tmp_path, colour_clip):
    folder = colour_images(tmp_path / "images")
    for path in folder.iterdir():  # names that no longer carry the class
        path.rename(folder / f"x{path.name}")
    labels = write_labels(tmp_path / "id2label.json", COLOURS)
    assert "pass --ground-truth" in run(folder, "--labels", labels, "--report").output
    truth = tmp_path / "gt.csv"
    truth.write_text("filename,label\n" + "".join(f"x{c}_{n}.png,{c}\n" for c in range(3) for n in range(4)))
    result = run(folder, "--labels", labels, "--report", "--ground-truth", truth, "--template", "a {object} photo.")
    assert result.exit_code == 0 and "100.00%" in result.output
    truth.write_text("filename,label\nx0_0.png,0\n")
    assert "no label for 11 image(s)" in run(folder, "--labels", labels, "--report", "--ground-truth", truth).output


def test_unreadable_images_are_listed_and_fail_unless_skipped(tmp_path, colour_clip):
    folder = colour_images(tmp_path / "images", broken=("0_9.png", "2_9.jpg"))
    labels = write_labels(tmp_path / "id2label.json", COLOURS)
    out = tmp_path / "pred.csv"
    result = run(folder, "--labels", labels, "--out", out)
    assert result.exit_code == 1
    assert "2 unreadable image(s)" in result.output and "0_9.png, 2_9.jpg" in result.output
    assert sum("warning:" in line for line in result.output.splitlines()) == 2
    assert not out.exists()

    result = run(folder, "--labels", labels, "--out", out, "--skip-bad-images", "--template", "a {object} photo.")
    assert result.exit_code == 0, result.output
    assert read_predictions(out) == {f"{c}_{n}.png": c for c in range(3) for n in range(4)}


@pytest.mark.parametrize("name, prompt", [("palm_tree", "palm tree"), ("aquarium__fish", "aquarium fish"),
                                          (" sweet_ pepper ", "sweet pepper"), ("bicycle", "bicycle")])
def test_class_names_are_written_as_words_in_prompts(name, prompt):
    assert zs.prompt_name(name) == prompt


def test_text_embedding_of_an_underscored_name_is_that_of_its_words(tiny_clip):
    clip = load_clip(str(tiny_clip), device="cpu")
    template = "a photo of a {object}."
    got = zs.text_embeddings(clip, ["palm_tree", "maple_tree"], template)
    want = clip.encode_texts(["a photo of a palm tree.", "a photo of a maple tree."])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, clip.encode_texts(["a photo of a palm_tree.", "a photo of a maple_tree."]))


class RecordingClip(ColourClip):
    """A ``ColourClip`` that keeps every text it was asked to embed."""

    def __init__(self):
        self.texts = []

    def encode_texts(self, texts):
        self.texts.extend(texts)
        return super().encode_texts(texts)


def test_prompts_use_words_and_every_output_keeps_the_raw_name(tmp_path, monkeypatch):
    clip = RecordingClip()
    monkeypatch.setattr("vlcap.core.eval.clip.load_clip", lambda *args, **kwargs: clip)
    titles = []
    monkeypatch.setattr(zs, "plot_top5", lambda image, probs, labels, path, title="": titles.append(
        (list(labels.names), title)))
    names = ["red_[x]_thing", "green__thing", "blue_thing"]
    folder = colour_images(tmp_path / "images")
    result = zs.run_classification(folder, write_labels(tmp_path / "id2label.json", names),
                                   ["a photo of a {object}."], out=tmp_path / "pred.csv", report=True,
                                   plot_top5=1, out_dir=tmp_path / "plots")
    assert sorted(set(clip.texts)) == ["a photo of a blue thing.", "a photo of a green thing.",
                                       "a photo of a red [x] thing."]
    assert read_predictions(tmp_path / "pred.csv") == {f"{c}_{n}.png": c for c in range(3) for n in range(4)}
    assert result.report[0].correct == 12
    (plotted_names, title), = titles
    assert plotted_names == names and title.split("(true: ")[1].rstrip(")") in names
