"""Where the images come from: sources, the decoded-tensor cache, scale subsets, normalisation.

Sources (``DataConfig.source``):

* ``folder``: an ImageFolder tree ``root/{train,test}/<class>/*.{jpg,png,...}`` of 32x32 RGB images
  (the workplace copy of CIFAR-10 is one; see ``shared/data/README.md``);
* ``cifar10``: torchvision's CIFAR-10 (``root/cifar-10-batches-py``), downloaded where the network allows;
* ``auto``: ``folder`` when the root has ``train/`` or ``test/``, else ``cifar10``;
* ``synthetic``: random images for unit tests. Never chosen automatically, so a real run cannot
  silently train on noise.

``data.root`` falls back to the environment variable ``ABLATE_DATA`` so that tests, CI and sweeps can
point at the data without editing configs. Decoding 60,000 JPEGs takes seconds, so the decoded uint8
tensors are cached under ``data.cache_dir``; every later run and every job of a sweep starts in about a
second. The cache is built under a lock per data root, so parallel jobs on a fresh cache decode once
(the others wait and read it), and it is keyed by every image file's size and mtime, so an image
edited in place is noticed. Every problem raises :class:`DataError` with a message saying what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ablate.config import DataConfig, ScaleConfig
from ablate.locks import remove_stale_temps, wait_lock
from ablate.progress import phase
from ablate.records import atomic_file

log = logging.getLogger(__name__)

# Per-channel mean and std of the CIFAR-10 training set on the 0-255 scale (docs/references.md 0.4).
CIFAR_MEAN = (125.31, 122.95, 113.87)
CIFAR_STD = (62.99, 62.09, 66.70)

IMAGE_SIZE = 32
ENV_ROOT = "ABLATE_DATA"
# Bump when the cache file layout or key changes, so stale files are never read as current ones.
# 2: keyed by every file's size and mtime (1: by the directories' mtimes, blind to in-place edits).
_CACHE_VERSION = 2
# How long a job waits for another one building the same cache before it decodes on its own.
_CACHE_WAIT_SECONDS = 900
# Below this many images a process pool costs more (fork + pickling) than it saves.
_POOL_MIN_IMAGES = 4096
_CHUNK = 1000
SOURCES = ("auto", "folder", "cifar10", "synthetic")  # data.source (see the module docstring)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                "data_batch_5", "test_batch")


class DataError(Exception):
    """A data problem the user has to fix (missing data set, wrong layout, bad image)."""


@dataclass
class Images:
    """A decoded data set: uint8 NHWC images and int64 labels, on the CPU."""

    train_x: Tensor  # uint8, N x 32 x 32 x 3
    train_y: Tensor  # int64, N
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    source: str  # human description: a path, "torchvision CIFAR-10 at ...", or "synthetic"


_HOW_TO = (
    "Provide CIFAR-10 in one of these ways:\n"
    f"  * set data.root=/path/to/cifar10 on the command line, or the environment variable {ENV_ROOT}=/path/to/cifar10;\n"
    "  * that path may be an ImageFolder tree with train/ and test/ folders holding one folder per class\n"
    "    (the same class folders in both) of 32x32 RGB images;\n"
    f"  * or a directory holding torchvision's {_CIFAR_DIR}/;\n"
    "  * or let torchvision download it (data.download=true, needs internet access)."
)


# --------------------------------------------------------------------------------------------------
# Public entry points


def load_images(cfg: DataConfig) -> Images:
    """Load the training and test images that ``cfg`` describes (see the module docstring)."""
    if cfg.source == "synthetic":
        return _synthetic(cfg.synthetic_size)
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r} is not one of {', '.join(SOURCES)}")
    raw_root = cfg.root if cfg.root is not None else os.environ.get(ENV_ROOT) or None
    root = Path(raw_root).expanduser().absolute() if raw_root else None
    cache_dir = Path(cfg.cache_dir).expanduser().absolute()

    if cfg.source == "folder":
        if root is None:
            raise DataError(f"data.source=folder needs a root, but data.root and {ENV_ROOT} are unset.\n" + _HOW_TO)
        return _load_folder(root, cache_dir)
    # 'auto' takes a tree with either split folder as an ImageFolder attempt, so a tree missing test/
    # is reported as such instead of triggering a CIFAR-10 download into the user's folder.
    if cfg.source == "auto" and root is not None and ((root / "train").is_dir() or (root / "test").is_dir()):
        return _load_folder(root, cache_dir)
    return _load_cifar10(root, cfg, cache_dir)


def take_subset(images: Images, scale: ScaleConfig) -> Images:
    """Class-balanced, deterministic subset: the first ``size // classes`` images of each class, in
    dataset order, for ``scale.train_size`` / ``scale.test_size`` (None keeps a split whole)."""
    n_classes = len(images.classes)
    train = _balanced(images.train_x, images.train_y, scale.train_size, n_classes, "scale.train_size")
    test = _balanced(images.test_x, images.test_y, scale.test_size, n_classes, "scale.test_size")
    if scale.train_size is None and scale.test_size is None:
        return images
    source = f"{images.source} (subset: {len(train[1])} train, {len(test[1])} test)"
    return replace(images, train_x=train[0], train_y=train[1], test_x=test[0], test_y=test[1], source=source)


def normalise(x: Tensor) -> Tensor:
    """uint8 NHWC -> float32 NCHW, per-channel ``(x - CIFAR_MEAN) / CIFAR_STD``, on x's device."""
    if x.dim() != 4 or x.shape[-1] != len(CIFAR_MEAN):
        raise ValueError(f"normalise expects an N x H x W x 3 batch, got shape {tuple(x.shape)}")
    # Built on the host and copied without blocking: no wait for the device's queued work.
    mean = torch.tensor(CIFAR_MEAN, dtype=torch.float32).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(CIFAR_STD, dtype=torch.float32).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    # .contiguous() does the real NHWC -> NCHW transpose (the permute alone is only a view).
    return ((x.permute(0, 3, 1, 2).float() - mean) / std).contiguous()


def pad_reflect(x: Tensor, pad: int) -> Tensor:
    """Reflect-pad the two spatial dims of an NCHW batch by ``pad`` (numpy's 'reflect': edge not repeated)."""
    if pad == 0:
        return x
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")


# --------------------------------------------------------------------------------------------------
# Subsets


def _balanced(x: Tensor, y: Tensor, size: Optional[int], n_classes: int, key: str) -> tuple[Tensor, Tensor]:
    if size is None:
        return x, y
    k = size // n_classes
    if k < 1:
        raise DataError(f"{key}={size} is smaller than the number of classes ({n_classes}); "
                        "a class-balanced subset needs at least one image per class")
    picked = []
    for c in range(n_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < k:
            raise DataError(f"{key}={size} needs {k} images of class {c}, but the data set has only {len(idx)}")
        picked.append(idx[:k])
    # Sorting keeps dataset order, so the subset interleaves classes exactly as the full set does.
    idx = torch.cat(picked).sort().values
    return x[idx], y[idx]


# --------------------------------------------------------------------------------------------------
# Synthetic


def _synthetic(n: int) -> Images:
    """Deterministic random images with balanced labels in random order (unit tests only)."""
    if n < 1:
        raise DataError(f"data.synthetic_size={n} must be > 0")
    g = torch.Generator().manual_seed(0)
    n_classes = 10

    def split() -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, generator=g)
        y = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]
        return x, y

    train_x, train_y = split()
    test_x, test_y = split()
    return Images(train_x, train_y, test_x, test_y, [f"class{i}" for i in range(n_classes)], "synthetic")


# --------------------------------------------------------------------------------------------------
# ImageFolder


def _list_classes(split_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(split_dir))[0]
    except FileNotFoundError:
        raise DataError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/<image files>.\n"
                        + _HOW_TO) from None


def _load_folder(root: Path, cache_dir: Path) -> Images:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory.\n" + _HOW_TO)
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        what = "is empty" if not any(root.iterdir()) else f"has no {' or '.join(m + '/' for m in missing)} folder"
        raise DataError(f"data root {root} {what}: an ImageFolder tree needs train/ and test/ folders, "
                        "each with one folder per class.\n" + _HOW_TO)
    classes = _list_classes(root / "train")
    test_classes = _list_classes(root / "test")
    if classes != test_classes:
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'test'}: "
                        f"only in train: {sorted(set(classes) - set(test_classes))}, "
                        f"only in test: {sorted(set(test_classes) - set(classes))}")
    key = {"version": _CACHE_VERSION, "kind": "folder", "root": str(root), "files": _listing_digest(root, classes)}

    def decode() -> Images:
        from torchvision.datasets import ImageFolder

        t0 = time.perf_counter()
        folders = {}
        for split in ("train", "test"):
            try:
                folders[split] = ImageFolder(str(root / split))  # labels = alphabetical class index
            except FileNotFoundError as e:  # raised for a class folder without image files
                empty = [str(root / split / c) for c in classes
                         if not any(_is_image(p) for p in (root / split / c).iterdir())]
                raise DataError(f"empty class folder(s) under {root / split}: {', '.join(empty) or e}. "
                                "Every class folder needs image files (.jpg, .png, ...).") from None
        n = sum(len(ds.samples) for ds in folders.values())
        splits = {}
        with phase(f"decoding {n:,} images of {root} (once: later runs read the cache)", total=n, unit="img") as bar:
            for split, ds in folders.items():
                x = torch.from_numpy(_decode_files([p for p, _ in ds.samples], bar.update))
                splits[split] = (x, torch.tensor(ds.targets, dtype=torch.int64))
        images = Images(*splits["train"], *splits["test"], classes=classes, source=str(root))
        log.info("decoded %d images from %s in %.1f s", len(images.train_y) + len(images.test_y), root,
                 time.perf_counter() - t0)
        return images

    return _cached(cache_dir, key, decode)


def _listing_digest(root: Path, classes: list[str]) -> str:
    """A hash of every file's name, size and mtime under the class folders: any image added, removed,
    renamed or edited in place (which leaves its directory's mtime as it was) changes it. One stat
    per file: about 0.1 s for CIFAR-10's 60,000 files, against seconds to decode them."""
    digest = hashlib.sha1()
    for split in ("train", "test"):
        for c in classes:
            with os.scandir(root / split / c) as entries:
                files = sorted((e.name, e.stat()) for e in entries if e.is_file())
            for name, st in files:
                digest.update(f"{split}/{c}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _is_image(path: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return path.is_file() and path.name.lower().endswith(IMG_EXTENSIONS)


def _decode_chunk(paths: list[str]) -> np.ndarray:
    """Decode 32x32 RGB images into one uint8 N x 32 x 32 x 3 array; any bad file raises DataError."""
    from PIL import Image

    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im.load()
                mode, size = im.mode, im.size
                if mode == "RGB" and size == (IMAGE_SIZE, IMAGE_SIZE):
                    out[i] = np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3)
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError...)
            raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}. "
                            "Replace or delete the file.") from None
        # Converting silently would hide a data set that is not the one the user thinks it is.
        if mode != "RGB":
            raise DataError(f"image {path} has mode {mode}, expected RGB; convert it "
                            "(e.g. PIL's Image.convert('RGB')) or remove it")
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"image {path} is {size[0]}x{size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}; "
                            "resize it or remove it")
    return out


def _decode_files(paths: list[str], done: Callable[[int], object] = lambda n: None) -> np.ndarray:
    """Decode ``paths`` in order, over all available cores when there are enough of them, calling
    ``done`` with the number of images of each chunk decoded (a progress bar's ``update``).

    Measured on a shared 2-core machine, all 60,000 CIFAR-10 JPEGs: one process 6.5 s, a 2-process
    fork pool 4.6 s. Threads gain less because PIL holds the GIL outside the decoder itself. Fork (not
    spawn) avoids re-importing torch in every worker; the workers only run PIL and numpy.
    """
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n_cpu = os.cpu_count() or 1
    workers = min(n_cpu, 8)
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    if (len(paths) < _POOL_MIN_IMAGES or workers < 2 or "fork" not in multiprocessing.get_all_start_methods()
            or multiprocessing.current_process().daemon):  # a daemonic process may not have children
        return np.concatenate([_counted(_decode_chunk(chunk), done) for chunk in chunks])
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return np.concatenate([_counted(array, done) for array in pool.imap(_decode_chunk, chunks)])


def _counted(array: np.ndarray, done: Callable[[int], object]) -> np.ndarray:
    done(len(array))
    return array


# --------------------------------------------------------------------------------------------------
# torchvision CIFAR-10


def _load_cifar10(root: Optional[Path], cfg: DataConfig, cache_dir: Path) -> Images:
    import torchvision

    base = root if root is not None else cache_dir / "cifar10"
    if base.name == _CIFAR_DIR:  # accept the batches folder itself as the root
        base = base.parent
    batches = base / _CIFAR_DIR
    looked = []
    if root is None:
        looked.append(f"data.root and the environment variable {ENV_ROOT} are unset")
    elif not root.exists():
        looked.append(f"{root}: does not exist")
    elif root.is_dir() and not any(root.iterdir()):
        looked.append(f"{root}: is empty")
    elif cfg.source == "auto":
        looked.append(f"{root}: no train/ or test/ class folders (ImageFolder layout)")

    if all((batches / f).is_file() for f in _CIFAR_FILES):
        stamps = {f: [st.st_size, st.st_mtime_ns] for f in _CIFAR_FILES for st in [(batches / f).stat()]}
        key = {"version": _CACHE_VERSION, "kind": "cifar10", "root": str(base), "files": stamps}

        def read_batches() -> Images:
            try:
                sets = [torchvision.datasets.CIFAR10(str(base), train=t, download=False) for t in (True, False)]
            except Exception as e:  # torchvision raises RuntimeError for a failed checksum
                raise DataError(f"torchvision CIFAR-10 at {batches} is unreadable ({type(e).__name__}: {e}); "
                                f"delete {batches} and download it again, or use another source.\n" + _HOW_TO) from None
            return _from_torchvision(sets, base)

        return _cached(cache_dir, key, read_batches)

    looked.append(f"{batches}: not found or incomplete")
    if not cfg.download:
        looked.append("download: disabled (data.download=false)")
    else:
        existed = base.exists()
        try:
            sets = [torchvision.datasets.CIFAR10(str(base), train=t, download=True) for t in (True, False)]
            return _from_torchvision(sets, base)  # the next load finds the batches and caches them
        except Exception as e:  # URLError offline, HTTP errors, checksum failures...
            looked.append(f"download into {base}: failed ({type(e).__name__}: {e})")
            if not existed and base.is_dir() and not any(base.iterdir()):
                base.rmdir()  # torchvision created it; leave no empty folder behind a failed download
    raise DataError("no CIFAR-10 data found. Looked at:\n  - " + "\n  - ".join(looked) + "\n" + _HOW_TO)


def _from_torchvision(sets: list, base: Path) -> Images:
    (tr, te) = sets
    return Images(torch.from_numpy(tr.data), torch.tensor(tr.targets, dtype=torch.int64),
                  torch.from_numpy(te.data), torch.tensor(te.targets, dtype=torch.int64),
                  classes=list(tr.classes), source=f"torchvision CIFAR-10 at {base}")


# --------------------------------------------------------------------------------------------------
# Cache: one file per source, named by the root, valid for the key (root + file stamps) it was
# written with, built under the root's lock (``<cache dir>/<kind>-<root hash>.lock``).


def _cache_path(cache_dir: Path, key: dict) -> Path:
    root_hash = hashlib.sha1(key["root"].encode()).hexdigest()[:12]
    key_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"{key['kind']}-{root_hash}-{key_hash}.pt"


def _cached(cache_dir: Path, key: dict, build: Callable[[], Images]) -> Images:
    """The images of ``key`` from the cache, else ``build()`` them and cache them. The root's lock is
    held meanwhile: a parallel job asking for the same data waits for the first to build it and then
    reads it, instead of decoding it too; holding it, temporary files that a killed writer of this
    root's cache left are removed. A cache directory that cannot be written only costs speed."""
    root_name = _cache_path(cache_dir, key).name.rsplit("-", 1)[0]  # <kind>-<root hash>
    try:
        lock = wait_lock(cache_dir / f"{root_name}.lock", _CACHE_WAIT_SECONDS)
    except OSError as e:
        log.warning("cannot lock the data cache in %s (%s); decoding without it", cache_dir, e)
        return build()
    if lock is None:
        log.warning("the data cache in %s has been locked by %s for %d s; decoding without waiting longer",
                    cache_dir, root_name, _CACHE_WAIT_SECONDS)
        return build()
    with lock:
        remove_stale_temps(cache_dir, f"*{root_name}-*.tmp", before=lock.since)
        cached = _cache_read(cache_dir, key)
        if cached is not None:
            return cached
        images = build()
        _cache_write(cache_dir, key, images)
        return images


def _cache_read(cache_dir: Path, key: dict) -> Optional[Images]:
    path = _cache_path(cache_dir, key)
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    try:
        with phase(f"reading the decoded images from the cache {path}"):
            d = torch.load(path, weights_only=True)
        if d["key"] != key:  # a hash collision, however unlikely, must not load the wrong data
            return None
        images = Images(d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["classes"]), d["source"])
    except Exception as e:  # a truncated or foreign file: decode again and overwrite it
        log.warning("ignoring unreadable cache file %s (%s: %s)", path, type(e).__name__, e)
        return None
    log.info("loaded %s from cache %s in %.2f s", images.source, path, time.perf_counter() - t0)
    return images


def _cache_write(cache_dir: Path, key: dict, images: Images) -> None:
    """Write atomically (``records.atomic_file``) so parallel sweep jobs never read half a file;
    remove older caches of the same root. A cache that cannot be written only costs speed."""
    path = _cache_path(cache_dir, key)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with phase(f"writing the decoded images to the cache {path}"), atomic_file(path, binary=True) as f:
            torch.save({"key": key, "train_x": images.train_x, "train_y": images.train_y,
                        "test_x": images.test_x, "test_y": images.test_y,
                        "classes": list(images.classes), "source": images.source}, f)
        for stale in cache_dir.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as e:
        log.warning("could not write the data cache %s (%s); later runs will decode again", path, e)
