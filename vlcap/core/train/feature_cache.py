"""The frozen-encoder feature cache: the ViT's output tokens for every image in a folder, computed
once and memory-mapped, so training reads tokens instead of running the ViT every epoch.

A cache is a directory:
    features.npy    (images, tokens, width) float16 (or float32), read as a numpy memmap
    manifest.json   what produced the tokens (encoder, weights fingerprint, timm version,
                    preprocessing) and, per image file, its row and the size + mtime_ns it had;
                    ``unreadable``: the files that could not be read (skipped, as training skips them)

Training refuses a cache whose encoder, weights, preprocessing or image files differ from the run's.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from timm.data import resolve_data_config

from vlcap.core.console import say
from vlcap.core.atomic import atomic_write
from vlcap.core.data import IMAGE_SUFFIXES, iterate_images
from vlcap.core.errors import VlcapError, few
from vlcap.core.progress import progress_bar

FORMAT = "vlcap-feature-cache/1"
DTYPES = ("float16", "float32")


def encoder_fingerprint(encoder):
    """A hash of the encoder's name and a few of its tensors (first, middle, last): it changes with
    the model, its pretrained weights, or (for a random encoder) ``model.init_seed``."""
    tensors = list(encoder.state_dict().values())
    digest = hashlib.sha256(encoder.name.encode())
    for t in (tensors[0], tensors[len(tensors) // 2], tensors[-1]):
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_description(encoder):
    """What the cached tokens depend on; a cache is usable only if all of it matches."""
    transform = resolve_data_config({}, model=encoder.vit)
    return {"encoder": encoder.name, "fingerprint": encoder_fingerprint(encoder),
            "transform": json.loads(json.dumps(transform)),  # tuples -> lists, as read back
            "tokens": encoder.num_tokens, "width": encoder.embed_dim}


def list_images(image_dir):
    """Image files under ``image_dir`` as sorted relative POSIX paths (the caption files' names)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise VlcapError(f"{image_dir}: image folder not found")
    return sorted(p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def file_stamp(path):
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def write_feature_cache(encoder, image_dir, out, dtype="float16", batch_size=32, device="cpu",
                        num_workers=0, console=None):
    """Run ``encoder`` over every image under ``image_dir`` and write the cache directory ``out``
    (into a temporary directory beside it, renamed into place when complete). Everything that can
    fail fast (dtype, an existing ``out``, no images, too little disk) is checked first."""
    out, image_dir = Path(out), Path(image_dir)
    if dtype not in DTYPES:
        raise VlcapError(f"feature cache dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if out.exists():
        raise VlcapError(f"{out}: already exists; delete it or choose another --out")
    names = list_images(image_dir)
    if not names:
        raise VlcapError(f"{image_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) to cache")
    shape = (len(names), encoder.num_tokens, encoder.embed_dim)
    check_disk_space(out, shape, dtype, console)
    manifest = {"format": FORMAT, **encoder_description(encoder), "timm": timm.__version__,
                "dtype": dtype, "shape": list(shape),
                "images": {name: [row, *file_stamp(image_dir / name)] for row, name in enumerate(names)}}
    batches = iterate_images([image_dir / n for n in names], encoder.transform(), batch_size, torch.device(device),
                             num_workers=num_workers)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        features = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=dtype, shape=shape)
        unreadable = encode_into(features, encoder, batches, console)
        del features
        if len(unreadable) == len(names):
            raise VlcapError(f"{image_dir}: none of its {len(names)} image(s) can be read "
                             f"({next(iter(unreadable.values()))})")
        manifest["unreadable"] = {}
        for path, message in unreadable.items():
            name = Path(path).relative_to(image_dir).as_posix()
            manifest["unreadable"][name] = message
            del manifest["images"][name]
        if unreadable and console is not None:
            say(console, f"{len(unreadable)} unreadable image(s) were skipped (training skips their captions): "
                f"{few(sorted(manifest['unreadable']), 3)}", "yellow")
        with atomic_write(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureCache(out)


def check_disk_space(out, shape, dtype, console):
    """Say what the cache will take, and refuse before writing if the disk cannot hold it."""
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if console is not None:
        say(console, f"feature cache: {shape[0]:,} images x {shape[1]} tokens x {shape[2]} {dtype} = "
            f"{human_bytes(needed)} on disk ({human_bytes(free)} free at {out.parent})")
    if needed > free:
        raise VlcapError(f"{out}: the feature cache needs {human_bytes(needed)} but only {human_bytes(free)} "
                         f"is free on that disk; choose another --out")


def encode_into(features, encoder, batches, console):
    """Fill the memory-mapped ``features`` (row i: image i) with the encoder's tokens of
    ``batches``; returns ``{path: message}`` of the images that could not be read (rows left zero)."""
    unreadable = {}
    with progress_bar("encode images", console, disable=console is None) as progress:
        task = progress.add_task("encode images", total=len(features))
        for batch in batches:
            unreadable.update((item.path, item.message) for item in batch.unreadable)
            if batch.pixels is not None:
                with torch.no_grad():
                    features[batch.indices] = encoder(batch.pixels).float().cpu().numpy()
            progress.update(task, advance=len(batch.indices) + len(batch.unreadable))
    features.flush()
    return unreadable


class FeatureCache:
    """A cache directory opened for reading; ``features`` is memory-mapped on first use (in each
    dataloader worker), so a cache larger than RAM is fine."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except FileNotFoundError:
            raise VlcapError(f"{self.path}: not a feature cache (no manifest.json); build one with "
                             "`vlcap cache-features`") from None
        except json.JSONDecodeError:
            raise VlcapError(f"{self.path}/manifest.json: not valid JSON; rebuild the cache") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise VlcapError(f"{self.path}/manifest.json: unreadable ({type(exc).__name__}); rebuild the cache") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            format_name = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise VlcapError(f"{self.path}: not a {FORMAT} cache (format {format_name!r}); rebuild it")
        self.rows, self.unreadable = self.check_manifest()
        self._features = None
        self.check_features()

    def check_manifest(self):
        """``(rows, unreadable)`` from a manifest whose every entry has the right type; a damaged
        one is one line."""
        m = self.manifest
        images, unreadable, shape = m.get("images"), m.get("unreadable", {}), m.get("shape")
        whole = (isinstance(images, dict) and isinstance(unreadable, dict) and m.get("dtype") in DTYPES
                 and isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)
                 and all(isinstance(e, list) and len(e) == 3 and all(type(n) is int for n in e) and 0 <= e[0] < shape[0]
                         for e in images.values())
                 and all(isinstance(v, str) for v in unreadable.values())
                 and all(isinstance(m.get(k), v) for k, v in (("encoder", str), ("fingerprint", str),
                                                              ("transform", dict), ("tokens", int), ("width", int))))
        if not whole:
            raise VlcapError(f"{self.path}/manifest.json: damaged (entries missing or of the wrong type); "
                             "rebuild the cache with `vlcap cache-features`")
        return {name: entry[0] for name, entry in images.items()}, unreadable

    def check_features(self):
        """features.npy is there, whole, and of the manifest's shape and dtype."""
        try:
            features = np.load(self.path / "features.npy", mmap_mode="r")
        except FileNotFoundError:
            raise VlcapError(f"{self.path}: features.npy is missing; rebuild the cache with `vlcap cache-features`") from None
        except (OSError, ValueError) as exc:  # truncated: numpy cannot map the length its header states
            raise VlcapError(f"{self.path}/features.npy: damaged or truncated ({exc}); rebuild the cache") from None
        if list(features.shape) != self.manifest["shape"] or features.dtype != np.dtype(self.manifest["dtype"]):
            raise VlcapError(f"{self.path}/features.npy: holds {features.dtype} {list(features.shape)} but the "
                             f"manifest says {self.manifest['dtype']} {self.manifest['shape']}; rebuild the cache")

    @property
    def features(self):
        if self._features is None:
            self._features = np.load(self.path / "features.npy", mmap_mode="r")
        return self._features

    def check_encoder(self, encoder):
        """Refuse tokens another encoder, other weights or other preprocessing produced."""
        ours, theirs = encoder_description(encoder), self.manifest
        rebuild = f"rebuild it with `vlcap cache-features --encoder {encoder.name}` or drop --feature-cache"
        if theirs["encoder"] != ours["encoder"]:
            raise VlcapError(f"{self.path}: cached with encoder '{theirs['encoder']}' but this run uses "
                             f"'{ours['encoder']}'; {rebuild}")
        if theirs["transform"] != ours["transform"]:
            raise VlcapError(f"{self.path}: cached with preprocessing {theirs['transform']} (image size "
                             f"{theirs['transform'].get('input_size')}) but this run uses {ours['transform']}; {rebuild}")
        if theirs["fingerprint"] != ours["fingerprint"] or [theirs["tokens"], theirs["width"]] != [ours["tokens"], ours["width"]]:
            raise VlcapError(f"{self.path}: cached with other '{ours['encoder']}' weights (fingerprint "
                             f"{theirs['fingerprint']}, this run {ours['fingerprint']}: pretrained flag or "
                             f"model.init_seed differ); {rebuild}")

    def check_images(self, names, image_dir, where):
        """Refuse if any of ``names`` (files under ``image_dir`` that ``where`` uses) is not cached
        or has changed on disk since."""
        image_dir = Path(image_dir)
        missing = sorted(n for n in names if n not in self.rows and n not in self.unreadable)
        if missing:
            raise VlcapError(f"{self.path}: {len(missing)} image(s) of {where} are not in the cache: "
                             f"{few(missing)}; rebuild it with `vlcap cache-features --images {image_dir}`")
        changed = sorted(n for n in names if n in self.rows and file_stamp(image_dir / n) != self.manifest["images"][n][1:])
        if changed:
            raise VlcapError(f"{self.path}: {len(changed)} image file(s) in {image_dir} changed since they were "
                             f"cached: {few(changed)}; rebuild the cache")


def training_cache(cfg, encoder, run_dir, console, is_main, barrier):
    """The feature cache a run trains from, or None. With ``data.cache_features`` it is built
    first (by the main process; the others wait) unless it exists already."""
    if not cfg.data.feature_cache and not cfg.data.cache_features:
        return None
    path = Path(cfg.data.feature_cache or Path(run_dir) / "feature_cache")
    if cfg.data.cache_features and not path.exists():
        if is_main:
            write_feature_cache(encoder, cfg.data.train_images, path, dtype=cfg.data.feature_cache_dtype,
                                batch_size=cfg.train.batch_size, device=next(encoder.parameters()).device,
                                num_workers=cfg.train.num_workers, console=console)
        barrier()
    cache = FeatureCache(path)
    cache.check_encoder(encoder)
    return cache
