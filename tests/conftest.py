"""Shared pytest fixtures and small-fixture builders for rift_dist's tests.

* ``shared_data_dir()``: the real data (``../shared/data`` beside the checkout, or env RIFT_SHARED_DATA).
* ``real_cifar_root`` / ``real_tiny_root`` (session): the real archives unpacked once per session
  into a temporary cache through :func:`rift_dist.data.sources.resolve_root` (skipped when absent).
* Builders that write tiny data sets in every supported layout: CIFAR pickles (both CIFAR-10 and
  CIFAR-100 formats, bytes or str keys), image folders, a Tiny-ImageNet tree with
  ``val_annotations.txt`` and a greyscale JPEG, a CIFAR-10-C style ``.npy`` set and a
  Tiny-ImageNet-C tree. Images encode their identity (see :func:`id_images`) so tests can tell
  which sample ended up where.
* The ``slow`` marker (tests taking more than ~20 s); deselect with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (deselect with -m 'not slow')")


# --------------------------------------------------------------------------- real data


def shared_data_dir() -> Path | None:
    """Directory of the real data archives: env RIFT_SHARED_DATA, else ``<project>/../shared/data``;
    None when neither exists."""
    for cand in (os.environ.get("RIFT_SHARED_DATA", ""), str(PROJECT_ROOT.parent / "shared" / "data")):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def shared_archive(name: str) -> Path:
    """Path of a real archive in the shared data directory, or skip the test."""
    data = shared_data_dir()
    if data is None or not (data / name).is_file():
        pytest.skip(f"real data {name} not found (../shared/data or env RIFT_SHARED_DATA)")
    return data / name


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data directory (skips when absent)."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data not found (set RIFT_SHARED_DATA)")
    return data


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    """One temporary cache directory per session for unpacked archives and decoded arrays."""
    return tmp_path_factory.mktemp("rift_cache")


def _unpack(name: str, cache: Path) -> Path:
    from rift_dist.config import DataConfig
    from rift_dist.data.sources import resolve_root

    return resolve_root(DataConfig(archive=str(shared_archive(name)), cache_dir=str(cache)))


@pytest.fixture(scope="session")
def real_cifar_root(real_cache_dir) -> Path:
    """The real CIFAR-10 JPEG archive unpacked (``.../cifar10-jpeg``)."""
    return _unpack("cifar10-jpeg.tar.gz", real_cache_dir)


@pytest.fixture(scope="session")
def real_tiny_root(real_cache_dir) -> Path:
    """The real Tiny-ImageNet-200 (100 train images per class) archive unpacked (``.../tiny-imagenet-200``)."""
    return _unpack("tiny-imagenet-200-sub100.tar.gz", real_cache_dir)


# --------------------------------------------------------------------------- synthetic images


def id_images(ids, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 ``[len(ids), size, size, 3]`` images that carry their id: pixel (0, 0) holds
    ``(id % 256, id // 256 % 256, 7)``; the rest is a smooth, id-dependent colour gradient (so that
    JPEG and blur-type corruptions behave as on photos). Deterministic per (id, seed)."""
    ids = np.asarray(list(ids), dtype=np.int64)
    t = np.linspace(0.0, 1.0, size)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    phase = (ids[:, None] * np.array([0.7, 1.3, 2.1]) + seed) % (2 * np.pi)  # a function of the id only
    img = np.empty((len(ids), size, size, 3), dtype=np.float64)
    for ch in range(3):
        img[..., ch] = 127 + 100 * np.sin(3 * xx[None] + 2 * yy[None] * (ch + 1) + phase[:, ch, None, None])
    img = img.astype(np.uint8)
    img[:, 0, 0, 0] = ids % 256
    img[:, 0, 0, 1] = (ids // 256) % 256
    img[:, 0, 0, 2] = 7
    return img


def image_ids(images: np.ndarray) -> np.ndarray:
    """Inverse of :func:`id_images` for lossless images: int64 ``[N]`` ids from pixel (0, 0)."""
    px = np.asarray(images)[:, 0, 0].astype(np.int64)
    return px[:, 0] + 256 * px[:, 1]


# --------------------------------------------------------------------------- layout builders


def write_cifar_pickles(root: Path, dataset: str = "cifar10", per_class_train: int = 2, per_class_test: int = 2,
                        bytes_keys: bool = True) -> Path:
    """Write a tiny CIFAR python-pickle directory under ``root``; returns it.

    CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (each train batch
    holds ``per_class_train`` images per class). CIFAR-100: ``cifar-100-python/{train, test, meta}``
    with ``fine_labels`` and (decoy) ``coarse_labels``. ``data`` is ``[N, 3072]`` channel-major as in
    the release; ``bytes_keys`` mimics the Python-2 pickles (keys are bytes).
    Image ids: train ids count from 0 over the whole split in file order, test ids from 10000.
    """
    from rift_dist.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES

    classes = CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    n_cls = len(classes)

    def batch(per_class: int, first_id: int, label_key: str):
        labels = np.tile(np.arange(n_cls), per_class)
        imgs = id_images(range(first_id, first_id + len(labels)))
        d = {k("data"): imgs.transpose(0, 3, 1, 2).reshape(len(labels), -1), k(label_key): labels.tolist()}
        if dataset == "cifar100":
            d[k("coarse_labels")] = (labels // 5).tolist()
        return d

    if dataset == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        per = per_class_train * n_cls
        for i in range(5):
            (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch(per_class_train, i * per, "labels"), protocol=2))
        (d / "test_batch").write_bytes(pickle.dumps(batch(per_class_test, 10000, "labels"), protocol=2))
        (d / "batches.meta").write_bytes(pickle.dumps({k("label_names"): [k(c) if bytes_keys else c for c in classes]}))
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True, exist_ok=True)
        (d / "train").write_bytes(pickle.dumps(batch(per_class_train, 0, "fine_labels")))
        (d / "test").write_bytes(pickle.dumps(batch(per_class_test, 10000, "fine_labels")))
        meta = {k("fine_label_names"): list(classes), k("coarse_label_names"): [f"super{i}" for i in range(20)]}
        (d / "meta").write_bytes(pickle.dumps(meta))
    return d


def write_image_folder(root: Path, classes, n_train, n_test, size: int = 32, ext: str = "png",
                       start_id: int = 0) -> Path:
    """Write ``root/{train,test}/<class>/<i>.<ext>``; ``n_train``/``n_test`` are ints or per-class lists.

    File names are unpadded numbers (``0.png``, ``1.png``, ..., ``10.png``) to exercise natural
    sorting. Ids (see :func:`id_images`) run over train then test, class by class. Returns ``root``.
    """
    from PIL import Image

    next_id = start_id
    for split, counts in (("train", n_train), ("test", n_test)):
        counts = counts if isinstance(counts, (list, tuple)) else [counts] * len(classes)
        for name, count in zip(classes, counts):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            imgs = id_images(range(next_id, next_id + count), size=size)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(d / f"{i}.{ext}")
            next_id += count
    return root


def write_tiny_imagenet(root: Path, wnids=("n03", "n01", "n02"), n_train: int = 3, n_val_per_class: int = 2,
                        size: int = 64) -> Path:
    """Write a miniature Tiny-ImageNet-200 tree under ``root/tiny-imagenet-200``; returns that directory.

    ``wnids.txt`` lists ``wnids`` in the given (unsorted) order; train images live in
    ``train/<wnid>/images/<wnid>_<i>.JPEG`` (+ a ``<wnid>_boxes.txt`` decoy); val images in
    ``val/images/val_<j>.JPEG`` interleaved across classes, labels in ``val/val_annotations.txt``.
    Images are PNG-encoded content with a .JPEG name (lossless, so pixels can be checked) except
    ``val_0.JPEG``, which is a real greyscale (mode L) JPEG. Pixel (1, 1) of every image holds the
    index of its wnid in ``sorted(wnids)`` times 40 in all channels (val_0: greyscale anyway).
    """
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    sorted_w = sorted(wnids)

    def image(label: int, seed: int) -> np.ndarray:
        img = id_images([seed], size=size, seed=seed)[0]
        img[1, 1] = 40 * label
        return img

    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True, exist_ok=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(n_train):
            Image.fromarray(image(sorted_w.index(w), i)).save(d / f"{w}_{i}.JPEG", format="PNG")
    lines = []
    j = 0
    for rep in range(n_val_per_class):
        for w in wnids:
            label = sorted_w.index(w)
            path = base / "val" / "images" / f"val_{j}.JPEG"
            if j == 0:
                grey = np.full((size, size), 40 * label, dtype=np.uint8)
                Image.fromarray(grey, mode="L").save(path, format="JPEG", quality=95)
            else:
                Image.fromarray(image(label, 100 + j)).save(path, format="PNG")
            lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
            j += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def write_c_npy(root: Path, corruptions, n: int = 7, num_classes: int = 10, size: int = 32,
                severities: int = 5) -> tuple[Path, np.ndarray]:
    """Write a CIFAR-10-C style set: ``<c>.npy`` uint8 ``[severities*n, size, size, 3]`` and ``labels.npy``.

    Pixel values encode (corruption index, severity, position): channel 0 = corruption index,
    channel 1 = severity (1-based), channel 2 = position within the severity block. Returns
    ``(root, labels of one severity block)``.
    """
    root.mkdir(parents=True, exist_ok=True)
    labels = np.arange(n) % num_classes
    np.save(root / "labels.npy", np.tile(labels, severities).astype(np.uint8))
    for ci, name in enumerate(corruptions):
        arr = np.zeros((severities * n, size, size, 3), dtype=np.uint8)
        for s in range(severities):
            arr[s * n : (s + 1) * n, :, :, 0] = ci
            arr[s * n : (s + 1) * n, :, :, 1] = s + 1
            arr[s * n : (s + 1) * n, :, :, 2] = np.arange(n)[:, None, None]
        np.save(root / f"{name}.npy", arr)
    return root, labels


def write_tiny_c(root: Path, corruptions, severities, wnids=("n01", "n02"), per_class: int = 2, size: int = 64) -> Path:
    """Write a Tiny-ImageNet-C tree ``root/<c>/<s>/<wnid>/<i>.JPEG`` (PNG content; pixel (0,0,0) =
    severity, (0,0,1) = class index). Returns ``root``."""
    from PIL import Image

    for c in corruptions:
        for s in severities:
            for li, w in enumerate(wnids):
                d = root / c / str(s) / w
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    img = np.zeros((size, size, 3), dtype=np.uint8)
                    img[0, 0, 0], img[0, 0, 1], img[0, 0, 2] = s, li, i
                    Image.fromarray(img).save(d / f"{w}_{i}.JPEG", format="PNG")
    return root


@pytest.fixture(autouse=False)
def fresh_data_cache():
    """Clear rift_dist.data's per-process memo before and after a test."""
    from rift_dist.data.sources import clear_cache

    clear_cache()
    yield
    clear_cache()
