"""ablate.data: ImageFolder loading and its cache, error messages, the torchvision route, synthetic
data, subsets, normalisation, and (where the workplace copy exists) the real CIFAR-10."""
from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ablate.data as data
from ablate.config import DataConfig, ScaleConfig
from ablate.data import (CIFAR_MEAN, CIFAR_STD, DataError, Images, load_images, normalise, pad_reflect,
                         take_subset)

# Read at import: the autouse fixture below removes the variable from every test's environment.
REAL_ROOT_ENV = os.environ.get("ABLATE_DATA")
CLASSES = ["ant", "cat", "dog"]  # alphabetical = label order
PER_CLASS = {"train": 3, "test": 2}


def _pixel(split: str, label: int, j: int) -> tuple[int, int, int]:
    """The constant colour of image j of a class: encodes split, label and index."""
    return (10 + 40 * label + j, 100 if split == "train" else 200, 7 * j)


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _make_tree(root: Path) -> Path:
    for split, count in PER_CLASS.items():
        for label, cls in enumerate(CLASSES):
            for j in range(count):
                _write(root / split / cls / f"{j:04d}.png", np.full((32, 32, 3), _pixel(split, label, j), np.uint8))
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "tree")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("ABLATE_DATA", raising=False)


def _cfg(root: Path | None, cache: Path, **kw) -> DataConfig:
    return DataConfig(root=None if root is None else str(root), cache_dir=str(cache), **kw)


# --------------------------------------------------------------------------------------------------
# ImageFolder


@pytest.mark.parametrize("source", ["auto", "folder"])
def test_folder_loads_labels_and_classes(tree, cache, source):
    im = load_images(_cfg(tree, cache, source=source, download=False))
    assert im.classes == CLASSES
    assert im.source == str(tree)
    for split, x, y in (("train", im.train_x, im.train_y), ("test", im.test_x, im.test_y)):
        n = PER_CLASS[split] * len(CLASSES)
        assert x.dtype == torch.uint8 and x.shape == (n, 32, 32, 3)
        assert y.dtype == torch.int64 and y.tolist() == [c for c in range(3) for _ in range(PER_CLASS[split])]
        for i in range(n):  # each image decoded into its own slot, with its own folder's label
            label, j = divmod(i, PER_CLASS[split])
            assert x[i].flatten(0, 1).unique(dim=0).tolist() == [list(_pixel(split, label, j))]


def test_folder_reads_jpeg(tree, cache):
    _write(tree / "train" / "cat" / "0100.jpg", np.full((32, 32, 3), (200, 50, 20), np.uint8))
    im = load_images(_cfg(tree, cache))
    assert len(im.train_y) == 10 and int(im.train_y[-4]) == 1  # cat's 4th file, after the three PNGs
    assert (im.train_x[-4].float().mean((0, 1)) - torch.tensor([200.0, 50.0, 20.0])).abs().max() < 3


def test_cache_is_written_and_reused(tree, cache, monkeypatch):
    first = load_images(_cfg(tree, cache))
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def fail(paths, *done):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data, "_decode_files", fail)
    second = load_images(_cfg(tree, cache))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.classes == first.classes and second.source == first.source

    # A changed class folder invalidates the cache: the (failing) decoder is called again ...
    _write(tree / "test" / "dog" / "0009.png", np.zeros((32, 32, 3), np.uint8))
    os.utime(tree / "test" / "dog", ns=(1, 1))  # a distinct mtime, even on a coarse-clock file system
    with pytest.raises(AssertionError, match="decoded again"):
        load_images(_cfg(tree, cache))
    # ... and the new cache replaces the old file rather than piling up beside it.
    monkeypatch.undo()
    monkeypatch.delenv("ABLATE_DATA", raising=False)
    assert len(load_images(_cfg(tree, cache)).test_y) == 7
    assert [p.name for p in cache.glob("*.pt")] != [files[0].name] and len(list(cache.glob("*.pt"))) == 1


def test_cache_notices_an_image_edited_in_place(tree, cache):
    """Overwriting an image leaves its folder's mtime as it was (no entry added or removed); the
    cache key sees the file's own size and mtime."""
    load_images(_cfg(tree, cache))
    image, folder = tree / "train" / "cat" / "0001.png", tree / "train" / "cat"
    folder_mtime = folder.stat().st_mtime_ns
    _write(image, np.full((32, 32, 3), 3, np.uint8))
    os.utime(image, ns=(1, 1))  # a distinct mtime, even on a coarse-clock file system
    os.utime(folder, ns=(folder_mtime, folder_mtime))
    assert load_images(_cfg(tree, cache)).train_x[4].eq(3).all()  # cat is label 1: image 4 of the train set


def test_a_kill_during_the_cache_write_leaves_no_temp_file_after_the_next_run(tree, cache):
    """A process SIGKILLed half way through writing the cache leaves its temporary file; the next load
    takes the cache's lock, removes it and writes the cache whole."""
    import signal
    import subprocess
    import sys

    script = f"""
import os, signal, torch
import ablate.data as data
from ablate.config import DataConfig
def save(obj, f):
    f.write(b"half a cache")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
data.load_images(DataConfig(root={str(tree)!r}, cache_dir={str(cache)!r}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == -signal.SIGKILL
    [left] = list(cache.glob(".*.tmp"))
    assert left.read_bytes() == b"half a cache" and not list(cache.glob("*.pt"))
    assert load_images(_cfg(tree, cache)).train_x.shape == (9, 32, 32, 3)
    assert not list(cache.glob("*.tmp")) and len(list(cache.glob("*.pt"))) == 1


def test_parallel_loads_of_a_fresh_cache_decode_once(tree, cache, monkeypatch):
    """Two jobs asking for the same data at once: the second waits on the cache's lock for the first
    to decode and write, then reads the cache."""
    import threading
    import time

    real, calls = data._decode_files, []

    def slow_decode(paths, *done):
        calls.append(len(paths))
        time.sleep(0.5)  # long enough for the other job to ask meanwhile
        return real(paths, *done)
    monkeypatch.setattr(data, "_decode_files", slow_decode)
    results = []
    jobs = [threading.Thread(target=lambda: results.append(load_images(_cfg(tree, cache)))) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert calls == [9, 6] and len(results) == 2  # one decode of each split, by one job
    assert torch.equal(results[0].train_x, results[1].train_x)


def test_corrupt_cache_file_is_decoded_again(tree, cache):
    load_images(_cfg(tree, cache))
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"truncated")
    assert load_images(_cfg(tree, cache)).train_x.shape == (9, 32, 32, 3)
    assert path.stat().st_size > 1000


def test_env_variable_gives_the_root(tree, cache, monkeypatch):
    monkeypatch.setenv("ABLATE_DATA", str(tree))
    assert load_images(_cfg(None, cache, download=False)).source == str(tree)


@pytest.mark.parametrize("name,array,mode", [
    ("gray.png", np.zeros((32, 32), np.uint8), "L"),
    ("small.png", np.zeros((16, 16, 3), np.uint8), None),
    ("rgba.png", np.zeros((32, 32, 4), np.uint8), "RGBA"),
    ("corrupt.jpg", None, None),
])
def test_bad_image_names_the_file(tree, cache, name, array, mode):
    bad = tree / "train" / "dog" / name
    if array is None:
        bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    else:
        _write(bad, array, mode)
    with pytest.raises(DataError, match=str(bad)):
        load_images(_cfg(tree, cache, source="folder"))


def test_bad_image_in_a_large_set_names_the_file(tmp_path, cache, monkeypatch):
    """Through the worker pool too (forced by lowering its threshold)."""
    monkeypatch.setattr(data, "_POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(data, "_CHUNK", 2)
    root = _make_tree(tmp_path / "t")
    bad = root / "test" / "cat" / "0001.png"
    _write(bad, np.zeros((32, 32), np.uint8), "L")
    with pytest.raises(DataError, match=str(bad)):
        load_images(_cfg(root, cache))
    _write(bad, np.full((32, 32, 3), 5, np.uint8))
    assert load_images(_cfg(root, cache)).test_x[3].eq(5).all()


def test_missing_root_says_where_and_how(tmp_path, cache):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_images(_cfg(missing, cache, download=False))
    msg = str(e.value)
    assert str(missing) in msg and "ABLATE_DATA" in msg and "data.root" in msg
    assert "train/" in msg and "download" in msg
    with pytest.raises(DataError, match="ABLATE_DATA"):
        load_images(_cfg(missing, cache, source="folder"))


def test_no_root_and_failing_download_lists_every_place(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_images(_cfg(None, cache, download=True))
    msg = str(e.value)
    assert "ABLATE_DATA" in msg and "data.root" in msg
    assert str(cache / "cifar10" / "cifar-10-batches-py") in msg
    assert "URLError" in msg
    with pytest.raises(DataError, match="download: disabled"):
        load_images(_cfg(None, cache, download=False))


@pytest.mark.parametrize("source", ["auto", "folder"])
def test_empty_root(tmp_path, cache, source):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.*empty"):
        load_images(_cfg(empty, cache, source=source, download=False))


def test_wrong_layouts(tree, cache, tmp_path):
    import shutil

    shutil.rmtree(tree / "test")
    with pytest.raises(DataError, match=f"{tree} has no test/"):
        load_images(_cfg(tree, cache))  # auto must not fall back to a download into this tree

    other = _make_tree(tmp_path / "other")
    (other / "test" / "ant").rename(other / "test" / "bee")
    with pytest.raises(DataError, match="only in train: \\['ant'\\], only in test: \\['bee'\\]"):
        load_images(_cfg(other, cache))

    empty_class = _make_tree(tmp_path / "third")
    for f in (empty_class / "train" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=str(empty_class / "train" / "cat")):
        load_images(_cfg(empty_class, cache))

    no_classes = tmp_path / "fourth"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_images(_cfg(no_classes, cache))


# --------------------------------------------------------------------------------------------------
# torchvision CIFAR-10 route (with a stand-in for torchvision's class: no network, no 170 MB file)


def test_cifar10_route_and_cache(tmp_path, cache, monkeypatch):
    root = tmp_path / "tv"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for f in data._CIFAR_FILES:
        (batches / f).write_bytes(b"x")
    calls = []

    class FakeCIFAR10:
        classes = ["a", "b"]

        def __init__(self, path, train, download):
            calls.append((path, train, download))
            n = 4 if train else 2
            self.data = np.full((n, 32, 32, 3), 9 if train else 3, np.uint8)
            self.targets = [i % 2 for i in range(n)]

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    for given in (root, batches):  # the folder holding the batches, or the batches folder itself
        im = load_images(_cfg(given, cache, source="auto"))
        assert im.train_x.shape == (4, 32, 32, 3) and im.test_y.tolist() == [0, 1]
        assert im.classes == ["a", "b"] and "torchvision CIFAR-10" in im.source
    assert calls == [(str(root), True, False), (str(root), False, False)]  # second load came from the cache


# --------------------------------------------------------------------------------------------------
# synthetic, subsets, normalisation, padding


def test_synthetic_is_deterministic_and_balanced(cache):
    a = load_images(_cfg(None, cache, source="synthetic", synthetic_size=200))
    b = load_images(_cfg(None, cache, source="synthetic", synthetic_size=200))
    assert a.source == "synthetic" and len(a.classes) == 10
    assert a.train_x.shape == (200, 32, 32, 3) and a.train_x.dtype == torch.uint8
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, a.test_x)
    assert a.train_y.bincount().tolist() == [20] * 10
    assert not cache.exists()  # nothing to cache


def test_take_subset_is_class_balanced_first_k():
    y = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0, 2, 2, 0, 1])
    x = torch.arange(len(y)).view(-1, 1, 1, 1).expand(-1, 32, 32, 3).to(torch.uint8)
    im = Images(x, y, x[:6], y[:6], ["a", "b", "c"], "test")
    sub = take_subset(im, ScaleConfig(train_size=7, test_size=None))  # k = 7 // 3 = 2 per class
    assert sub.train_y.tolist() == [0, 1, 1, 2, 0, 2]  # first two of each class, in dataset order
    assert sub.train_x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(sub.test_x, im.test_x)
    assert take_subset(im, ScaleConfig()) is im
    sub = take_subset(im, ScaleConfig(train_size=9, test_size=3))
    assert sub.train_y.bincount().tolist() == [3, 3, 3] and sub.test_y.tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="scale.train_size=15"):
        take_subset(im, ScaleConfig(train_size=15))


def test_normalise_matches_constants():
    x = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalise(x)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 5, 6) and out.is_contiguous()
    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    expected = ((x.double() - mean.double()) / std.double()).permute(0, 3, 1, 2)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert out[1, 2, 3, 4].item() == pytest.approx((x[1, 3, 4, 2].item() - 113.87) / 66.70, abs=1e-6)
    assert CIFAR_MEAN == (125.31, 122.95, 113.87) and CIFAR_STD == (62.99, 62.09, 66.70)


def test_pad_reflect():
    x = torch.randn(2, 3, 8, 8)
    assert pad_reflect(x, 0) is x
    expected = np.pad(x.numpy(), [(0, 0), (0, 0), (4, 4), (4, 4)], mode="reflect")
    assert torch.equal(pad_reflect(x, 4), torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------------
# The real data set (decoded at most once per session)


def _real_root() -> Path:
    return Path(REAL_ROOT_ENV) if REAL_ROOT_ENV else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"


@pytest.fixture(scope="session")
def real_data(request, tmp_path_factory) -> tuple[Path, Path]:
    root = _real_root()
    if not (root / "train").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {root} (set ABLATE_DATA to an ImageFolder copy to run this test)")
    try:  # the suite's shared session cache (tests/conftest.py), so other modules reuse this decode
        cache = Path(request.getfixturevalue("cache_dir"))
    except pytest.FixtureLookupError:
        env_cache = os.environ.get("ABLATE_CACHE")
        cache = Path(env_cache) if env_cache else tmp_path_factory.mktemp("ablate-cache")
    return root, cache


def test_real_cifar10(real_data, monkeypatch):
    root, cache = real_data
    im = load_images(DataConfig(root=str(root), cache_dir=str(cache)))
    assert im.train_x.shape == (50000, 32, 32, 3) and im.test_x.shape == (10000, 32, 32, 3)
    assert im.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert im.train_y.bincount().tolist() == [5000] * 10 and im.test_y.bincount().tolist() == [1000] * 10
    means = im.train_x.reshape(-1, 3).double().mean(0)
    assert torch.allclose(means, torch.tensor([125.27, 122.93, 113.86], dtype=torch.float64), atol=0.1)

    monkeypatch.setattr(data, "_decode_files", lambda paths, *done: pytest.fail("the cache was not used"))
    again = load_images(DataConfig(root=str(root), cache_dir=str(cache)))
    assert torch.equal(again.test_x, im.test_x)
    sub = take_subset(again, ScaleConfig(train_size=500, test_size=200))
    assert sub.train_y.bincount().tolist() == [50] * 10 and sub.test_y.bincount().tolist() == [20] * 10
