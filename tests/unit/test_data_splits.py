"""rift_dist.data.splits: disjoint, seeded, class-balanced, recorded, memoised."""

from __future__ import annotations

import numpy as np
import pytest

from rift_dist.config import DataConfig
from rift_dist.data.datasets import CIFAR10_CLASSES
from rift_dist.data.sources import DataError
from rift_dist.data.splits import balanced_indices, indices_sha256, make_splits
from tests.conftest import image_ids, write_image_folder


@pytest.fixture(autouse=True)
def _fresh(fresh_data_cache):
    yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """10 classes; train: 12 images per class (ids 0..119), test: 5 per class (ids 120..169)."""
    return write_image_folder(tmp_path_factory.mktemp("splits"), CIFAR10_CLASSES, 12, 5)


def cfg(root, **kw) -> DataConfig:
    c = DataConfig(dataset="cifar10", root=str(root), decode_cache=False, val_size=20)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_val_carved_from_train_disjoint_balanced(root):
    s = make_splits(cfg(root, val_size=30))
    train_ids, val_ids, test_ids = image_ids(s.train.images), image_ids(s.val.images), image_ids(s.test.images)
    assert len(val_ids) == 30 and len(train_ids) == 90 and len(test_ids) == 50
    assert set(train_ids).isdisjoint(val_ids)
    assert set(train_ids) | set(val_ids) == set(range(120)) and set(test_ids) == set(range(120, 170))
    assert list(s.val.class_counts()) == [3] * 10 and list(s.train.class_counts()) == [9] * 10
    # labels travel with their images: id // 12 is the class of a train image in this fixture
    np.testing.assert_array_equal(s.val.labels, val_ids // 12)
    assert not s.train.images.flags.writeable


def test_split_is_seeded(root):
    a = make_splits(cfg(root, split_seed=1))
    b_ids = image_ids(make_splits(cfg(root, split_seed=1)).val.images)
    c_ids = image_ids(make_splits(cfg(root, split_seed=2)).val.images)
    assert list(image_ids(a.val.images)) == list(b_ids)
    assert set(c_ids) != set(b_ids)


def test_uneven_val_size_and_subsets_balanced(root):
    s = make_splits(cfg(root, val_size=25, train_subset=33, test_subset=20))
    assert sorted(s.val.class_counts()) == [2] * 5 + [3] * 5  # 25 = 10 x 2 + 5 extra classes
    assert sorted(s.train.class_counts()) == [3] * 7 + [4] * 3
    assert list(s.test.class_counts()) == [2] * 10
    assert set(image_ids(s.train.images)).isdisjoint(image_ids(s.val.images))


def test_record_has_seeds_sizes_and_hashes(root):
    s = make_splits(cfg(root, val_size=10, split_seed=5))
    r = s.record
    assert (r["split_seed"], r["train_size"], r["val_size"], r["test_size"]) == (5, 110, 10, 50)
    assert (r["full_train_size"], r["full_test_size"], r["num_classes"]) == (120, 50, 10)
    # val indices are positions in the full train split; in this fixture position == id
    assert r["val_indices_sha256"] == indices_sha256(np.sort(image_ids(s.val.images)))
    assert r["test_indices_sha256"] == indices_sha256(np.arange(50))
    assert len(r["full_train_sha256"]) == 64 and r["train_indices_sha256"] != r["val_indices_sha256"]
    other = make_splits(cfg(root, val_size=10, split_seed=6)).record
    assert other["val_indices_sha256"] != r["val_indices_sha256"]
    assert other["full_train_sha256"] == r["full_train_sha256"]


def test_memoised_per_process(root):
    assert make_splits(cfg(root)) is make_splits(cfg(root))
    assert make_splits(cfg(root)) is not make_splits(cfg(root, val_size=10))


def test_size_errors(root):
    with pytest.raises(DataError, match="data.val_size = 120 leaves no training images"):
        make_splits(cfg(root, val_size=120))
    with pytest.raises(DataError, match="data.test_subset = 60 must lie in \\[0, 50\\]"):
        make_splits(cfg(root, test_subset=60))
    assert len(make_splits(cfg(root, val_size=0)).val) == 0


def test_balanced_indices_class_shortage():
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match="needs 4 images of class 1 but only 2"):
        balanced_indices(labels, 8, np.random.default_rng(0), what="n")
    idx = balanced_indices(labels, 4, np.random.default_rng(0))
    assert list(np.bincount(labels[idx])) == [2, 2] and list(idx) == sorted(idx)


def test_train_and_test_class_mismatch(tmp_path):
    write_image_folder(tmp_path, CIFAR10_CLASSES, 2, 0)
    names = CIFAR10_CLASSES[:9] + ["zebra"]
    write_image_folder(tmp_path / "x", names, 0, 1)
    (tmp_path / "test").rename(tmp_path / "old_test") if (tmp_path / "test").exists() else None
    (tmp_path / "x" / "test").rename(tmp_path / "test")
    with pytest.raises(DataError, match="different classes.*truck.*zebra"):
        make_splits(cfg(tmp_path, val_size=0))
