"""rift_dist.data.sources / archive: every layout, error messages, archives, decode cache."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from rift_dist.config import DataConfig
from rift_dist.data import archive as archive_mod
from rift_dist.data import sources
from rift_dist.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES
from rift_dist.data.sources import (
    ArrayDataset,
    DataError,
    detect_layout,
    load_split,
    resolve_root,
)
from tests.conftest import (
    id_images,
    image_ids,
    write_cifar_pickles,
    write_image_folder,
    write_tiny_imagenet,
)


@pytest.fixture(autouse=True)
def _fresh(fresh_data_cache):
    yield


# --------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_validates_and_subsets():
    imgs = id_images(range(6))
    ds = ArrayDataset(imgs, np.array([0, 1, 2, 0, 1, 2], dtype=np.int32), ["a", "b", "c"], "six")
    assert ds.labels.dtype == np.int64 and len(ds) == 6 and ds.image_size == (32, 32)
    sub = ds.subset([4, 1])
    assert list(image_ids(sub.images)) == [4, 1] and list(sub.labels) == [1, 1]
    assert sub.images.base is not imgs  # a copy
    assert list(ds.subset(np.array([True, False] * 3)).labels) == [0, 2, 1]
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(imgs.astype(np.float32), ds.labels, ds.classes)
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        ArrayDataset(imgs, np.array([0, 1, 2, 3, 0, 0]), ds.classes)
    with pytest.raises(DataError, match="out of range"):
        ds.subset([6])


# --------------------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_pickles(tmp_path, bytes_keys):
    d = write_cifar_pickles(tmp_path, "cifar10", per_class_train=2, per_class_test=1, bytes_keys=bytes_keys)
    train = load_split("cifar10", d, "train")
    test = load_split("cifar10", tmp_path, "test")  # the parent directory works too
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.classes == CIFAR10_CLASSES and train.labels.dtype == np.int64
    assert list(image_ids(train.images)) == list(range(100))  # batch 1..5 in order
    assert list(train.labels[:12]) == list(range(10)) + [0, 1]
    np.testing.assert_array_equal(train.images, id_images(range(100)))  # channel-major -> HWC correct
    assert len(test) == 10 and list(image_ids(test.images)) == list(range(10000, 10010))
    assert "pickle layout" in train.description
    assert not train.images.flags.writeable  # memoised arrays are read-only


def test_cifar100_pickles_use_fine_labels(tmp_path):
    write_cifar_pickles(tmp_path, "cifar100", per_class_train=1, per_class_test=1, bytes_keys=False)
    ds = load_split("cifar100", tmp_path, "train")
    assert ds.classes == CIFAR100_CLASSES and len(ds) == 100
    assert list(ds.labels) == list(range(100))  # fine labels, not the decoy coarse labels (0..19)


def test_pickle_with_foreign_global_is_refused(tmp_path):
    d = write_cifar_pickles(tmp_path, "cifar10", 1, 1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match="test_batch.*not allowed"):
        load_split("cifar10", d, "test")
    assert not marker.exists()


def test_incomplete_pickle_dir_lists_every_missing_file(tmp_path):
    d = write_cifar_pickles(tmp_path, "cifar10", 1, 1)
    (d / "data_batch_3").unlink()
    (d / "batches.meta").unlink()
    with pytest.raises(DataError) as err:
        load_split("cifar10", d, "train")
    assert "data_batch_3" in str(err.value) and "batches.meta" in str(err.value) and str(d) in str(err.value)


def test_wrong_dataset_gives_a_hint(tmp_path):
    write_cifar_pickles(tmp_path, "cifar100", 1, 1)
    with pytest.raises(DataError, match="cifar100 pickles.*data.dataset: cifar100"):
        load_split("cifar10", tmp_path, "train")


# --------------------------------------------------------------------------- image folders


def test_image_folder_layout(tmp_path):
    root = write_image_folder(tmp_path / "cifar10-jpeg", CIFAR10_CLASSES, n_train=12, n_test=[1] * 9 + [3])
    train = load_split("cifar10", tmp_path, "train")  # parent of cifar10-jpeg/
    assert detect_layout("cifar10", tmp_path) == ("folder", root)
    assert train.images.shape == (120, 32, 32, 3) and train.classes == CIFAR10_CLASSES
    # natural order inside a class: 0,1,2,...,10,11 (not 0,1,10,11,2,...)
    assert list(image_ids(train.images[:12])) == list(range(12))
    assert list(np.bincount(train.labels)) == [12] * 10
    test = load_split("cifar10", root, "test")
    assert list(test.labels) == list(range(9)) + [9, 9, 9]


def test_numeric_class_folders_sort_numerically(tmp_path):
    names = [str(i) for i in range(10)]
    write_image_folder(tmp_path, list(reversed(names)), 1, 1)
    ds = load_split("cifar10", tmp_path, "train", layout="folder")
    assert ds.classes == names


def test_folder_wrong_class_count_names_the_path(tmp_path):
    write_image_folder(tmp_path, ["a", "b", "c"], 1, 1)
    with pytest.raises(DataError) as err:
        load_split("cifar10", tmp_path, "train", layout="folder")
    assert str(tmp_path) in str(err.value) and "cifar10" in str(err.value)


def test_mixed_image_sizes_and_broken_files_are_errors(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path, CIFAR10_CLASSES, 2, 1)
    odd = tmp_path / "train" / "cat" / "9.png"
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match=r"9\.png.*one size"):
        load_split("cifar10", tmp_path, "train")
    odd.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"9\.png: cannot decode"):
        load_split("cifar10", tmp_path, "train")


# --------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_layout(tmp_path):
    base = write_tiny_imagenet(tmp_path, wnids=("n03", "n01", "n02"), n_train=3, n_val_per_class=2)
    train = load_split("tiny-imagenet", tmp_path, "train")
    test = load_split("tiny-imagenet", base, "test")
    assert train.classes == ["n01", "n02", "n03"]  # sorted wnids (ImageFolder order), not wnids.txt order
    assert train.images.shape == (9, 64, 64, 3) and list(train.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(train.images[:, 1, 1, 0], 40 * train.labels)
    # val labels come from val_annotations.txt column 2: val_j is class order n03, n01, n02, ...
    assert list(test.labels) == [2, 0, 1, 2, 0, 1]
    np.testing.assert_array_equal(test.images[1:, 1, 1, 0], 40 * test.labels[1:])
    grey = test.images[0]  # val_0 is a mode-L JPEG: converted to RGB with equal channels
    assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 0], grey[..., 1]) and abs(int(grey[5, 5, 0]) - 80) <= 2
    assert "val_annotations" in test.description


def test_tiny_imagenet_annotation_errors(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    (base / "val" / "images" / "val_3.JPEG").unlink()
    (base / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(DataError) as err:
        load_split("tiny-imagenet", base, "test")
    assert "val_3.JPEG" in str(err.value) and "val_4.JPEG" in str(err.value) and "2 images" in str(err.value)
    base2 = write_tiny_imagenet(tmp_path / "b")
    (base2 / "val" / "images" / "extra.JPEG").write_bytes((base2 / "val" / "images" / "val_1.JPEG").read_bytes())
    with pytest.raises(DataError, match="1 images have no label.*extra.JPEG"):
        load_split("tiny-imagenet", base2, "test")
    ann = base2 / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:7"):
        load_split("tiny-imagenet", base2, "test")


def test_tiny_imagenet_missing_train_class(tmp_path):
    base = write_tiny_imagenet(tmp_path)
    for f in (base / "train" / "n02" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"n02.*train/<wnid>/images"):
        load_split("tiny-imagenet", base, "train")


# --------------------------------------------------------------------------- detection / errors


def test_bad_roots_and_names_are_explained(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist.*data.root"):
        load_split("cifar10", tmp_path / "nope", "train")
    f = tmp_path / "data.tar.gz"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="is a file.*data.archive"):
        load_split("cifar10", f, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no cifar10 data found at .*empty.*cifar-10-batches-py"):
        load_split("cifar10", tmp_path / "empty", "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split("cifar10", tmp_path, "val")
    with pytest.raises(DataError, match="unknown data set"):
        load_split("mnist", tmp_path, "train")
    with pytest.raises(DataError, match="layout 'pickle' does not exist for tiny-imagenet"):
        load_split("tiny-imagenet", tmp_path, "train", layout="pickle")
    write_image_folder(tmp_path / "imgs", CIFAR10_CLASSES, 1, 1)
    with pytest.raises(DataError, match="no cifar10 data found"):
        load_split("cifar10", tmp_path / "imgs", "train", layout="pickle")


# --------------------------------------------------------------------------- resolve_root / archives


def _make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_resolve_root_from_root_env_and_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("RIFT_DATA_ROOT", raising=False)
    assert resolve_root(DataConfig(root=str(tmp_path))) == tmp_path.resolve()
    with pytest.raises(DataError, match="no data location.*RIFT_DATA_ROOT"):
        resolve_root(DataConfig())
    monkeypatch.setenv("RIFT_DATA_ROOT", str(tmp_path))
    assert resolve_root(DataConfig()) == tmp_path.resolve()
    monkeypatch.setenv("RIFT_DATA_ROOT", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="env RIFT_DATA_ROOT.*gone.*does not exist"):
        resolve_root(DataConfig())


def test_archive_unpacked_once_atomically(tmp_path, monkeypatch):
    src = write_image_folder(tmp_path / "src" / "mini", CIFAR10_CLASSES, 1, 1)
    arc = tmp_path / "mini.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src, arcname="mini")
    cache = tmp_path / "cache"
    cfg = DataConfig(archive=str(arc), cache_dir=str(cache))
    root = resolve_root(cfg)
    assert root.name == "mini" and (root / "train" / "cat" / "0.png").is_file()
    marker = archive_mod.read_marker(root.parent)
    assert marker["sha256"] == archive_mod.file_sha256(arc) and marker["members"] > 20
    assert load_split("cifar10", root, "train").images.shape == (10, 32, 32, 3)

    # second call: no extraction at all
    def boom(*a, **k):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(archive_mod, "_extract", boom)
    assert resolve_root(cfg) == root
    monkeypatch.undo()

    # a killed unpack: target without marker and a temp dir of a dead process -> both redone/cleaned
    (root.parent / archive_mod.MARKER).unlink()
    dead = cache / f".{root.parent.name}.tmp-{__import__('socket').gethostname()}-999999999-abcd1234"
    dead.mkdir()
    assert resolve_root(cfg) == root and archive_mod.read_marker(root.parent) is not None
    assert not dead.exists()
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []

    # a relative data.root names a sub-directory inside the archive; an absolute one conflicts
    assert resolve_root(DataConfig(archive=str(arc), cache_dir=str(cache), root="train")) == root / "train"
    with pytest.raises(DataError, match="both set"):
        resolve_root(DataConfig(archive=str(arc), cache_dir=str(cache), root=str(tmp_path)))


def test_archive_errors(tmp_path):
    with pytest.raises(DataError, match=r"archive .*missing.tar.gz does not exist"):
        resolve_root(DataConfig(archive=str(tmp_path / "missing.tar.gz"), cache_dir=str(tmp_path / "c")))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="not a readable tar archive"):
        resolve_root(DataConfig(archive=str(bad), cache_dir=str(tmp_path / "c")))
    evil = _make_tar(tmp_path / "evil.tar.gz", {"../escape.txt": b"x"})
    with pytest.raises(DataError, match="evil.tar.gz: unsafe .*refusing to unpack"):
        resolve_root(DataConfig(archive=str(evil), cache_dir=str(tmp_path / "c")))
    assert not (tmp_path / "escape.txt").exists()
    linky = tmp_path / "linky.tar.gz"
    with tarfile.open(linky, "w:gz") as tf:
        info = tarfile.TarInfo("top/passwd")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    assert not archive_mod._plain_and_safe(tarfile.open(linky).getmembers())  # -> Python's "data" filter
    with pytest.raises(DataError, match="linky.tar.gz: unsafe"):
        resolve_root(DataConfig(archive=str(linky), cache_dir=str(tmp_path / "c")))
    assert [p for p in (tmp_path / "c").iterdir() if "evil" in p.name and not p.name.endswith(".lock")] == []


# --------------------------------------------------------------------------- decode cache


def test_decode_cache_reused_and_invalidated(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", CIFAR10_CLASSES, 2, 1)
    cache = tmp_path / "cache"
    first = load_split("cifar10", root, "train", cache_dir=cache)
    assert len(list((cache / "decoded").iterdir())) == 1
    sources.clear_cache()
    calls = []
    real = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda p: calls.append(p) or real(p))
    again = load_split("cifar10", root, "train", cache_dir=cache)
    assert calls == [] and np.array_equal(again.images, first.images)
    # change one file: the key changes and the split is decoded again
    from PIL import Image

    target = root / "train" / "dog" / "1.png"
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    sources.clear_cache()
    third = load_split("cifar10", root, "train", cache_dir=cache)
    assert len(calls) == 20 and (third.images == 9).all(axis=(1, 2, 3)).sum() == 1


def test_load_split_is_memoised(tmp_path):
    write_cifar_pickles(tmp_path, "cifar10", 1, 1)
    assert load_split("cifar10", tmp_path, "test") is load_split("cifar10", tmp_path, "test")


def test_odd_sized_image_that_sorts_first_is_the_one_blamed(tmp_path):
    """Tiny-ImageNet with one odd image whose name sorts first: blame it (the minority size), not a good image."""
    from PIL import Image

    base = write_tiny_imagenet(tmp_path, wnids=("n01", "n02"), n_train=3)
    odd = base / "train" / "n01" / "images" / "n01_0.JPEG"  # the first file of the split
    Image.fromarray(np.zeros((60, 64, 3), np.uint8)).save(odd, format="PNG")
    with pytest.raises(DataError) as info:
        load_split("tiny-imagenet", tmp_path, "train")
    msg = str(info.value)
    assert "1 image(s)" in msg and "n01_0.JPEG (64x60)" in msg and "which are 64x64" in msg
    assert "n01_1.JPEG" not in msg and "n02_" not in msg
