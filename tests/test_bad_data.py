"""A corpus of broken images and annotations, generated per test: every case has its documented
outcome (README, "Bad data"), a converted image, a skip with a summary, or a one-line error."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import vlcap_cli
from vlcap.core.data import ImageDataset, load_captions, load_image
from vlcap.core.train.datasets import CaptionDataset
from vlcap.core.errors import VlcapError
from vlcap.core.model.tokenizer import Tokenizer


def run(*args):
    return vlcap_cli(*args)


def pixel(path, xy=(0, 0)):
    return load_image(path).getpixel(xy)


def test_non_rgb_modes_are_converted_faithfully(tmp_path):
    grey16 = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)  # 16-bit PNG, full range
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert [pixel(tmp_path / "grey16.png", (x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128),
                                                                          (255, 255, 255), (4, 4, 4)]
    Image.new("L", (4, 4), 100).save(tmp_path / "grey.png")
    assert pixel(tmp_path / "grey.png") == (100, 100, 100)
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent: PIL's convert would give black
    rgba.save(tmp_path / "rgba.png")
    assert pixel(tmp_path / "rgba.png") == (10, 20, 30) and pixel(tmp_path / "rgba.png", (1, 0)) == (255, 255, 255)
    Image.new("LA", (2, 2), (50, 0)).save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png") == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert pixel(tmp_path / "palette.png") == (200, 10, 10)
    palette.save(tmp_path / "palette_transparent.png", transparency=1)
    assert pixel(tmp_path / "palette_transparent.png") == (255, 255, 255)
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert all(v > 250 for v in pixel(tmp_path / "cmyk.jpg"))


def broken_images(root):
    """name -> what the error must say, for files PIL cannot (or must not) decode."""
    root.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "whole.jpg", quality=95)
    data = (root / "whole.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    return {"truncated.jpg": "truncated", "garbage.png": "unreadable image", "empty.jpg": "unreadable image",
            "text.png": "unreadable image"}


def test_broken_files_raise_one_clear_error(tmp_path):
    for name, message in broken_images(tmp_path).items():
        with pytest.raises(VlcapError, match=message) as error:
            load_image(tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)) and "\n" not in str(error.value)


@pytest.mark.parametrize("size", [40, 64])  # PIL warns above MAX_IMAGE_PIXELS and fails above twice that
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, size):
    Image.new("RGB", (size, size)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(VlcapError, match="bomb.png: refused as a possible decompression bomb"):
        load_image(tmp_path / "bomb.png")
    dataset = ImageDataset([tmp_path / "bomb.png"], transform=lambda im: im)
    assert "decompression bomb" in dataset[0].message


def caption_file(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


@pytest.mark.parametrize("images, annotations, message", [
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [], r"image id\(s\) listed more than once.*1"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.jpg"}], [], "file names listed more than once.*a.jpg"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.png"}], [], "sharing a stem.*a.jpg, a.png"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 2, "caption": "x"}], "image ids with no entry in 'images': 2"),
    ([{"id": "1", "file_name": "a.jpg"}], [], "id '1' is not an integer"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": None}], "caption None is not a string"),
    ([{"id": 1}], [], "malformed entry"),
    # a file_name may not leave the images folder
    ([{"id": 1, "file_name": "../secret.jpg"}], [], "file_name '../secret.jpg' leaves the images folder"),
    ([{"id": 1, "file_name": "/etc/passwd"}], [], "file_name '/etc/passwd' leaves the images folder"),
    ([{"id": 1, "file_name": "a/../../b.jpg"}], [], "leaves the images folder"),
    ([{"id": 1, "file_name": ""}], [], "leaves the images folder"),
    ([{"id": 2 ** 70, "file_name": "a.jpg"}], [], r"id 11805916207174113034\.\.\. is not a 64-bit integer"),
])
def test_bad_annotations_are_one_line_errors(tmp_path, images, annotations, message):
    with pytest.raises(VlcapError, match=message):
        load_captions(caption_file(tmp_path / "captions.json", images, annotations))


def test_empty_and_overlong_captions_are_counted(tmp_path):
    path = caption_file(tmp_path / "c.json", [{"id": 1, "file_name": "a.jpg"}],
                        [{"image_id": 1, "caption": c} for c in ("a dog", "", "   ", "word " * 80)])
    dataset = CaptionDataset(load_captions(path), tmp_path, None, Tokenizer(), max_tokens=60)
    assert (len(dataset), dataset.empty, dataset.truncated) == (2, 2, 1)
    assert max(len(ids) for _, ids, _ in dataset.items) == 62  # start + 60 tokens + end


def dataset_with(tmp_path, broken_names, captions=("a red square",)):
    images = tmp_path / "images"
    broken_images(images)
    names = ["whole.jpg", *broken_names]
    caption_file(tmp_path / "train.json", [{"id": i, "file_name": n} for i, n in enumerate(names)],
                 [{"image_id": i, "caption": c} for i in range(len(names)) for c in captions])
    return ["--train-json", tmp_path / "train.json", "--train-images", images]


def test_unreadable_images_are_skipped_with_a_summary(tmp_path):
    args = dataset_with(tmp_path, ["truncated.jpg", "garbage.png"])
    result = run("train", "--preset", "tiny", *args, "--out", tmp_path / "run", "--max-steps", 2, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    output = "".join(result.output.split())  # rich wraps long paths
    assert "2unreadableimage(s)wereskipped" in output
    assert "truncated.jpg:unreadableimage" in output and "garbage.png:unreadableimage" in output


@pytest.mark.parametrize("broken, captions, message", [
    (["truncated.jpg", "empty.jpg"], ("a red square",), "no training image could be read in epoch 1"),
    ([], ("", "  "), "no non-empty captions to train on"),
])
def test_nothing_left_to_train_on_is_one_line(tmp_path, broken, captions, message):
    args = dataset_with(tmp_path, broken, captions)
    if broken:  # every image broken, the good one too
        (tmp_path / "images" / "whole.jpg").write_bytes(b"broken")
    result = run("train", "--preset", "tiny", *args, "--out", tmp_path / "run", "--max-steps", 2)
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Error: " in result.output


def test_duplicate_ids_through_the_cli(tmp_path):
    images = tmp_path / "images"
    broken_images(images)
    caption_file(tmp_path / "train.json", [{"id": 7, "file_name": "whole.jpg"}, {"id": 7, "file_name": "empty.jpg"}],
                 [{"image_id": 7, "caption": "x"}])
    result = run("train", "--preset", "tiny", "--train-json", tmp_path / "train.json", "--train-images", images,
                 "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'train.json'}: image id(s) listed more than once in 'images': 7" in result.output


@pytest.mark.parametrize("text, message", [
    ('{"images": [{"id": ' + "9" * 5000 + ', "file_name": "a.jpg"}], "annotations": []}', "not usable JSON"),
    ('{"images": [{"id": 1, "file_name": "\\ud800.jpg"}], "annotations": []}', "not valid Unicode"),
    ('{"images": ' + "[" * 100000 + "]" * 100000 + ', "annotations": []}', "nested too deeply"),
])
def test_hostile_json_is_one_line(tmp_path, text, message):
    path = tmp_path / "captions.json"
    path.write_text(text)
    with pytest.raises(VlcapError, match=message):
        load_captions(path)
