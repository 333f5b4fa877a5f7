"""A small synthetic captioning set (coloured shapes at positions, five paraphrased captions per
image) written in the course's layout, so the demo and the tests need no download."""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlcap.core.atomic import atomic_write

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 220),
           "yellow": (240, 200, 20), "purple": (148, 83, 189)}
SHAPES = ("circle", "square", "triangle")
# position name -> (centre as a fraction of the image, phrase used in captions)
POSITIONS = {"left": ((0.25, 0.5), "on the left"), "right": ((0.75, 0.5), "on the right"),
             "top": ((0.5, 0.25), "at the top"), "bottom": ((0.5, 0.75), "at the bottom"),
             "middle": ((0.5, 0.5), "in the middle")}
TEMPLATES = ("a {colour} {shape} {where}", "there is a {colour} {shape} {where}",
             "a picture of a {colour} {shape} {where}", "a {shape} in {colour} {where}",
             "{where} there is a {colour} {shape}")
SIZE = 128


def draw(colour, shape, position, rng):
    background = tuple(rng.randint(200, 250) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    (fx, fy), _ = POSITIONS[position]
    cx, cy = fx * SIZE + rng.uniform(-6, 6), fy * SIZE + rng.uniform(-6, 6)
    r = rng.uniform(14, 22)
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def write_split(out_dir, split, count, rng, first_id):
    images_dir = out_dir / f"images_{split}"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        image_id = first_id + n
        file_name = f"{split}_{n:04d}.png"
        draw(colour, shape, position, rng).save(images_dir / file_name)
        images.append({"file_name": file_name, "id": image_id})
        where = POSITIONS[position][1]
        for template in TEMPLATES:
            caption = template.format(colour=colour, shape=shape, where=where)
            annotations.append({"caption": caption[0].upper() + caption[1:] + ".",
                                "id": len(annotations) + first_id * 10, "image_id": image_id})
    with atomic_write(out_dir / f"{split}.json", "w") as f:
        json.dump({"annotations": annotations, "images": images}, f)


def make_synthetic_set(out_dir, train_images=400, val_images=50, seed=0):
    """Write ``train.json``/``images_train`` and ``val.json``/``images_val`` under ``out_dir``."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    write_split(out_dir, "train", train_images, rng, first_id=1)
    write_split(out_dir, "val", val_images, rng, first_id=100_000)
    return out_dir
