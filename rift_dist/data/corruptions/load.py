"""Read a common-corruption test set: CIFAR-10-C / CIFAR-100-C, Tiny-ImageNet-C, or one re-generated here.

Layouts read by :func:`load_corruption_set`:

* CIFAR-10-C / CIFAR-100-C: ``<corruption>.npy`` uint8 ``[5n, 32, 32, 3]`` = severities 1..5 stacked
  in order (n = 10000 in the release), ``labels.npy`` ``[5n]`` (the test labels tiled 5 times).
  Smaller re-generated sets (any n) are accepted: n = len(labels) / number of severities stored.
* Tiny-ImageNet-C: ``<corruption>/<severity>/<wnid>/*.JPEG`` (labels = index of the wnid among the
  sorted wnid folders, as torchvision's ImageFolder and the RiFT authors' code do).

A set written by :mod:`rift_dist.data.corruptions.generate` has the CIFAR layout plus
``metadata.json`` (:data:`METADATA`), which says that it is a RE-GENERATION and which severities it
stores. The names of each data set's release folder come from :data:`rift_dist.data.datasets.DATASETS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS, CIFAR_CORRUPTIONS
from rift_dist.data.datasets import DATASETS, dataset_spec
from rift_dist.data.sources import ArrayDataset, DataError, decode_image

__all__ = ["METADATA", "load_corruption_set", "read_metadata", "subset_positions"]

METADATA = "metadata.json"
"""File name of a re-generated set's provenance (JSON), beside its .npy files."""


def _classes_for(dataset: str, meta: dict | None) -> list[str] | None:
    if meta and meta.get("classes"):
        return list(meta["classes"])
    spec = DATASETS.get(dataset)
    return list(spec.classes) if spec is not None and spec.classes is not None else None


def _find_npy_root(root: Path, dataset: str) -> Path | None:
    if (root / "labels.npy").is_file():
        return root
    preferred = DATASETS[dataset].corruption_set if dataset in DATASETS else ""
    children = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.name != preferred, p.name))
    for child in children:
        if (child / "labels.npy").is_file():
            return child
    return None


def _find_tiny_root(root: Path, dataset: str, corruptions: Sequence[str]) -> Path | None:
    if any((root / c).is_dir() for c in corruptions):
        return root
    spec = dataset_spec(dataset)
    for name in (spec.corruption_set, *spec.corruption_dirs):
        if (root / name).is_dir():
            return root / name
    return None


def read_metadata(d: Path) -> dict | None:
    """The ``metadata.json`` of a set in ``d`` as a dict, or None when absent or unreadable."""
    try:
        return json.loads((d / METADATA).read_text())
    except (OSError, ValueError):
        return None


def subset_positions(labels: np.ndarray, subset: int, seed: int) -> np.ndarray:
    """int64 positions of a class-balanced subset of ``subset`` images (0 or >= n: all, in order), drawn from
    ``default_rng([seed, 4])``; the same positions for every corruption and severity."""
    from rift_dist.data.splits import balanced_indices

    if not subset or subset >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    return balanced_indices(labels, subset, np.random.default_rng([seed, 4]), what="data.corruption_subset")


def load_corruption_set(
    root: str | Path,
    dataset: str,
    corruptions: Sequence[str],
    severities: Sequence[int],
    subset: int = 0,
    *,
    seed: int = 0,
) -> list[tuple[str, int, ArrayDataset]]:
    """Load a common-corruption test set.

    Args:
        root: the directory holding the files (``<c>.npy`` + ``labels.npy``, or Tiny-ImageNet-C's
            ``<c>/<s>/<wnid>/``), or its parent (a ``CIFAR-10-C``/``CIFAR-100-C``/``Tiny-ImageNet-C``
            sub-directory is found).
        dataset: cifar10, cifar100 or tiny-imagenet (names the classes; tiny-imagenet also accepts
            the .npy layout written by :func:`generate_corruption_set`).
        corruptions: names from :data:`AUTHORS_CORRUPTIONS` (empty = :data:`CIFAR_CORRUPTIONS`).
        severities: subset of 1..5.
        subset: images per corruption and severity (0 = all): a class-balanced choice seeded by
            ``seed``, the same positions for every corruption and severity.

    Returns:
        ``[(corruption, severity, ArrayDataset)]`` in the order corruptions x severities; images
        uint8 ``[n, H, W, 3]`` (memory-mapped, read-only, when no subset is taken), labels int64.

    Raises:
        DataError: root missing; unknown corruption or severity; ONE error listing every missing
            file or directory; arrays with the wrong dtype/shape or a length not divisible by the
            number of stored severities.
    """
    corruptions = list(corruptions) or list(CIFAR_CORRUPTIONS)
    unknown = [c for c in corruptions if c not in AUTHORS_CORRUPTIONS]
    if unknown:
        raise DataError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(AUTHORS_CORRUPTIONS)}")
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad or not severities:
        raise DataError(f"severities must be a non-empty subset of 1..5, got {list(severities)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"corruption set directory {root} does not exist; set data.corruption_root to a CIFAR-10-C style "
            f"directory (<corruption>.npy + labels.npy) or Tiny-ImageNet-C, or set data.corruption_generate: true"
        )
    npy_root = _find_npy_root(root, dataset)
    if npy_root is None and "tiny-imagenet" in dataset_spec(dataset).layouts:
        tiny = _find_tiny_root(root, dataset, corruptions)
        if tiny is not None:
            return _load_tiny_c(tiny, corruptions, severities, subset, seed)
    base = npy_root or root
    meta = read_metadata(base)
    missing = [str(base / f"{c}.npy") for c in corruptions if not (base / f"{c}.npy").is_file()]
    if not (base / "labels.npy").is_file():
        missing.insert(0, str(base / "labels.npy"))
    if missing:
        raise DataError(
            f"corruption set at {base} is incomplete: missing {len(missing)} file(s): {', '.join(missing)}. "
            f"Download the official set (CIFAR-10-C: https://zenodo.org/records/2535967) or generate one with "
            f"`rift data corrupt --out {base}`"
        )
    stored = list(meta.get("severities", [1, 2, 3, 4, 5])) if meta else [1, 2, 3, 4, 5]
    absent = [s for s in severities if s not in stored]
    if absent:
        raise DataError(f"{base}: severities {absent} are not in this set (it stores {stored}); regenerate with them")
    labels_all = np.load(base / "labels.npy").astype(np.int64)
    if len(labels_all) % len(stored):
        raise DataError(
            f"{base / 'labels.npy'}: {len(labels_all)} labels is not a multiple of the {len(stored)} stored severities"
        )
    n = len(labels_all) // len(stored)
    classes = _classes_for(dataset, meta)
    if classes is None:
        classes = [str(i) for i in range(int(labels_all.max()) + 1)]
    if labels_all.size and labels_all.max() >= len(classes):
        raise DataError(f"{base / 'labels.npy'}: label {labels_all.max()} but {dataset} has {len(classes)} classes")
    pick = subset_positions(labels_all[:n], subset, seed)
    kind = "RE-GENERATED (not the official release)" if meta and meta.get("regenerated") else "official layout"
    out = []
    for name in corruptions:
        path = base / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from exc
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] != len(labels_all):
            raise DataError(
                f"{path}: expected uint8 [{len(labels_all)}, H, W, 3] (severities x {n} images, matching labels.npy), "
                f"got {arr.dtype} {list(arr.shape)}"
            )
        for s in severities:
            lo = stored.index(s) * n
            block = arr[lo : lo + n]
            images = block if len(pick) == n else np.ascontiguousarray(block[pick])
            labels = labels_all[lo : lo + n][pick]
            desc = f"{name} severity {s} from {path} ({kind}, {len(pick)} of {n} images)"
            out.append((name, s, ArrayDataset(images=images, labels=labels, classes=classes, description=desc)))
    return out


def _load_tiny_c(base: Path, corruptions, severities, subset: int, seed: int) -> list[tuple[str, int, ArrayDataset]]:
    missing = [str(base / c / str(s)) for c in corruptions for s in severities if not (base / c / str(s)).is_dir()]
    if missing:
        raise DataError(
            f"Tiny-ImageNet-C at {base} is incomplete: missing {len(missing)} director(ies): {', '.join(missing)}; "
            f"expected <corruption>/<severity>/<wnid>/*.JPEG"
        )
    from rift_dist.data.sources import _images_under  # shared listing helper

    out = []
    classes_ref: list[str] | None = None
    for c in corruptions:
        for s in severities:
            d = base / c / str(s)
            classes = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            if classes_ref is None:
                classes_ref = classes
            elif classes != classes_ref:
                raise DataError(f"{d}: class folders differ from {base / corruptions[0] / str(severities[0])}")
            files, labels = [], []
            for i, w in enumerate(classes):
                found = _images_under(d / w)
                files += found
                labels += [i] * len(found)
            if not files:
                raise DataError(f"{d}: no images found (expected {d}/<wnid>/*.JPEG)")
            labels = np.asarray(labels, dtype=np.int64)
            pick = subset_positions(labels, subset, seed)
            images = np.stack([decode_image(files[i]) for i in pick])
            desc = f"{c} severity {s} from {d} (Tiny-ImageNet-C folders, {len(pick)} of {len(files)} images)"
            out.append((c, s, ArrayDataset(images=images, labels=labels[pick], classes=classes, description=desc)))
    return out
