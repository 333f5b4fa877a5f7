"""vlcap train-classifier and classify --classifier: a timm test ViT fine-tuned on labelled
folders (synthetic colours, and the course's real 32x32 images when ../shared is there)."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import SHARED, needs_shared, vlcap_cli
from test_inspect import report_rows
from vlcap.core.errors import VlcapError
from vlcap.core.train.classifier import ClassifierTrainer

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (40, 40, 210)}


def write_folder(folder, per_class, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        for n in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{n}.png")
    return folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return write_folder(root / "train", 8, 0), write_folder(root / "val", 3, 1)


def train_args(train, val, out, *extra):
    return ["train-classifier", train, "--val", val, "--encoder", "test_vit", "--no-pretrained", "--img-size", 64,
            "--out", out,
            "--batch-size", 8, "--lr", 2e-3, "--device", "cpu", "--set", "train.num_workers=0",
            "--set", "train.warmup_steps=2", *extra]


TIMINGS = ("epoch_seconds", "samples_per_s", "val_seconds")


def history(run):
    """The run's history without its timings (which no two runs share)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, optimizer", [("full", "adamw"), ("lora", "sam")])
def test_training_lowers_the_loss_and_keeps_the_most_accurate_epoch(tmp_path, colours, method, optimizer):
    out = tmp_path / "run"
    result = vlcap_cli(*train_args(*colours, out, "--epochs", 3, "--method", method, "--optimizer", optimizer))
    assert result.exit_code == 0, result.output
    records = history(out)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(0 <= r["val_accuracy"] <= 1 for r in records)
    best = max(records, key=lambda r: r["val_accuracy"])  # the first of equals
    with safe_open(str(out / "best.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    saved_at = {k: v for k, v in json.loads(metadata["training"]).items() if k not in TIMINGS}
    assert saved_at == best and json.loads(metadata["classes"]) == ["blue", "green", "red"]
    assert f"validation accuracy {100 * best['val_accuracy']:.2f}%" in result.output
    shown = vlcap_cli("inspect", out / "best.safetensors")
    rows = report_rows(shown.output)
    assert rows["optimizer"] == optimizer and rows["classes"] == "3: blue, green, red"
    assert rows["saved at"] == f"epoch {best['epoch']}, step {best['step']}"
    assert rows["val_accuracy"] == f"{best['val_accuracy']:.4f}"
    if method == "lora":  # trainable only: the LoRA factors of every block's q/v and the new head
        assert keys == {f"vit.blocks.{i}.attn.qkv.lora_{m}" for i in range(6) for m in "AB"} | {"vit.head.weight",
                                                                                                 "vit.head.bias"}


def test_a_stopped_run_resumes_bit_identically(tmp_path, colours, monkeypatch):
    # SAM + LoRA: the optimizer state inside SAM and the LoRA factors must all come back.
    args = ["--epochs", 2, "--method", "lora", "--optimizer", "sam"]
    reference = tmp_path / "reference"
    assert vlcap_cli(*train_args(*colours, reference, *args)).exit_code == 0

    show_step = ClassifierTrainer.show_step

    def stop_after_step_2(self, epoch):  # a SIGTERM in the middle of the first epoch (3 steps)
        show_step(self, epoch)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ClassifierTrainer, "show_step", stop_after_step_2)
    out = tmp_path / "stopped"
    stopped = vlcap_cli(*train_args(*colours, out, *args))
    assert stopped.exit_code == 1 and f"continue with: vlcap train-classifier --resume {out}" in stopped.output
    monkeypatch.setattr(ClassifierTrainer, "show_step", show_step)

    refused = vlcap_cli("train-classifier", "--resume", out, "--method", "full")
    assert refused.exit_code == 1 and "drop --method" in refused.output
    replaced = vlcap_cli(*train_args(*colours, out, *args))  # a new run into it would delete its state
    assert replaced.exit_code == 1 and "pass --overwrite to replace it" in replaced.output
    resumed = vlcap_cli("train-classifier", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    final, expected = load_file(out / "last.safetensors"), load_file(reference / "last.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert history(out) == history(reference)


def test_classify_writes_filename_label_rows_and_reports_accuracy(tmp_path, colours):
    out = tmp_path / "run"
    assert vlcap_cli(*train_args(*colours, out, "--epochs", 1, "--method", "linear")).exit_code == 0
    pred = tmp_path / "pred.csv"
    result = vlcap_cli("classify", colours[1], "--classifier", out / "best.safetensors", "--out", pred, "--report",
                       "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(pred.open()))
    assert rows[0] == ["filename", "label"] and [r[0] for r in rows[1:]] == sorted(p.name for p in colours[1].iterdir())
    assert {r[1] for r in rows[1:]} <= set(COLOURS)
    correct = sum(r[0].startswith(r[1] + "_") for r in rows[1:])
    assert f"({correct}/9)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--labels", "id2label.json"], "--labels belong to zero-shot CLIP classification"),
    ([], "nothing to do: pass --out pred.csv"),
])
def test_classify_with_a_classifier_refuses_zero_shot_options(tmp_path, colours, args, message):
    result = vlcap_cli("classify", colours[1], "--classifier", tmp_path / "best.safetensors", *args)
    assert result.exit_code == 1 and message in result.output


def test_images_without_a_class_in_their_name_are_one_line(tmp_path, colours):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (8, 8)).save(bad / "photo.png")
    Image.new("RGB", (8, 8)).save(bad / "cat_1.png")
    result = vlcap_cli(*train_args(bad, colours[1], tmp_path / "run"))
    assert result.exit_code == 1 and "cannot read the class of photo.png" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_labels_file_names_the_classes_and_numeric_classes_sort_as_numbers(tmp_path):
    from vlcap.core.config import ClassifierDataConfig
    from vlcap.core.train.classifier import labelled_items
    train, val = tmp_path / "train", tmp_path / "val"
    for folder, names in ((train, ["a.png", "b.png", "c.png"]), (val, ["d.png"])):
        folder.mkdir()
        for name in names:
            Image.new("RGB", (8, 8)).save(folder / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\na.png,10\nb.png,2\nc.png,1\nd.png,2\n")
    items = labelled_items(ClassifierDataConfig(str(train), str(val), str(labels)))
    assert items.classes == ["1", "2", "10"] and [c for _, c in items.train] == ["10", "2", "1"]
    labels.write_text("filename,label\na.png,10\nb.png,2\nc.png,1\nd.png,7\n")
    with pytest.raises(VlcapError, match="class\\(es\\) 7 have no training image"):
        labelled_items(ClassifierDataConfig(str(train), str(val), str(labels)))


def link_classes(source, folder, classes, numbers):
    """Symlinks to the course's {class}_{n}.png images (the real files stay in ../shared)."""
    folder.mkdir()
    for c in classes:
        for n in numbers:
            (folder / f"{c}_{n}.png").symlink_to(source / f"{c}_{n}.png")
    return folder


@needs_shared
def test_classify_writes_the_course_csv_for_its_2500_real_images(tmp_path):
    images = SHARED / "data/hw3_p1_val/images"
    first = sorted(int(p.stem.split("_")[1]) for p in images.glob("0_*.png"))
    train = link_classes(images, tmp_path / "train", range(5), first[:6])
    val = link_classes(images, tmp_path / "val", range(5), first[6:8])
    out = tmp_path / "run"
    trained = vlcap_cli(*train_args(train, val, out, "--epochs", 2, "--method", "full"))
    assert trained.exit_code == 0, trained.output
    assert json.loads(safe_open(str(out / "best.safetensors"), "pt").metadata()["classes"]) == list("01234")
    pred = tmp_path / "pred.csv"
    result = vlcap_cli("classify", images, "--classifier", out / "best.safetensors", "--out", pred,
                       "--batch-size", 250, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with open(SHARED / "data/hw3_p1_val/val_gt.csv") as f:
        expected_files = sorted(row["filename"] for row in csv.DictReader(f))
    rows = list(csv.reader(pred.open()))
    assert rows[0] == ["filename", "label"] and len(rows) == 2501
    assert [r[0] for r in rows[1:]] == expected_files and {r[1] for r in rows[1:]} <= set("01234")


def test_two_gloo_processes_match_one_process(tmp_path, colours):
    """DDP with SAM: both passes of a step all-reduce, so the ascent uses the global gradient."""
    args = ["--max-steps", 3, "--method", "lora", "--optimizer", "sam"]
    single = tmp_path / "one"
    assert vlcap_cli(*train_args(*colours, single, *args)).exit_code == 0
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlcap",
               *map(str, train_args(*colours, out, *args))]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes" in done.stderr and done.stdout.count("trained 3 steps") == 1
    assert history(out)[0]["train_loss"] == pytest.approx(history(single)[0]["train_loss"], rel=1e-5)
    one, two = load_file(single / "last.safetensors"), load_file(out / "last.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


def test_a_fully_fine_tuned_checkpoint_loads_without_fetching_the_pretrained_weights(tmp_path):
    import dataclasses
    from vlcap.core.config import ClassifierConfig, ClassifierModelConfig
    from vlcap.core.model.classifier import ViTClassifier, load_classifier, save_classifier
    model_cfg = ClassifierModelConfig("test_vit", pretrained=False, img_size=32, method="full")
    model = ViTClassifier(model_cfg, ["a", "b"])
    # As trained from timm's pretrained weights: every weight is in the file, so none is fetched.
    cfg = ClassifierConfig(model=dataclasses.replace(model_cfg, pretrained=True, init_seed=7))
    save_classifier(tmp_path / "best.safetensors", model, cfg)
    loaded = load_classifier(tmp_path / "best.safetensors")
    assert loaded.model.classes == ["a", "b"] and loaded.config.model.pretrained
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(pixels), model.eval()(pixels))


def test_resume_overrides_are_validated_like_a_new_run(tmp_path):
    from vlcap.core.config import ClassifierConfig, dump_yaml
    from vlcap.core.train.classifier import classifier_resume_config
    (tmp_path / "config.yaml").write_text(dump_yaml(ClassifierConfig()))
    assert classifier_resume_config(tmp_path, {"lr": 1e-5}).train.lr == 1e-5
    with pytest.raises(VlcapError, match=r"train.lr = -1.0: expected"):
        classifier_resume_config(tmp_path, {"lr": -1.0})
    with pytest.raises(VlcapError, match="cannot change train.seed"):
        classifier_resume_config(tmp_path, {"seed": 3})
