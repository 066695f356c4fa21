"""Read image classification data from disk into in-memory uint8 arrays.

Supported data sets and layouts (``layout`` names in brackets):

* CIFAR-10 / CIFAR-100 python pickles [pickle], as distributed by
  https://www.cs.toronto.edu/~kriz/cifar.html: ``cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` and ``cifar-100-python/{train, test, meta}`` (CIFAR-100 uses the 100 fine labels).
  The pickles are read with a restricted unpickler that only accepts numpy arrays and builtins, so a
  tampered file cannot run code.
* Image folders [folder]: ``<root>/{train,test}/<class>/*.jpg|png`` (``test`` may be called ``val``),
  e.g. ``../shared/data/cifar10-jpeg.tar.gz``. Files are found recursively inside each class folder
  and ordered by natural sort (``img2`` before ``img10``).
* Tiny-ImageNet-200, official layout [tiny-imagenet]: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` with labels in column 2 of ``val/val_annotations.txt`` (the val images are not
  in class folders). The "test" split is the official val split. Greyscale images become RGB.

Class order (label = index into ``classes``): CIFAR's standard order (which is alphabetical for both
CIFAR-10 and CIFAR-100); for image folders the natural sort of the folder names; for Tiny-ImageNet the
*sorted* wnids -- the order of torchvision's ``ImageFolder``, which the RiFT authors' code and the
Tiny-ImageNet-C folders use (``wnids.txt`` itself is not sorted).

Decoded image folders can be kept as ``.npy`` files in a cache directory (``load_split(cache_dir=...)``)
so that later runs and other ranks skip JPEG decoding; the cache key covers every file's path, size
and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from rift_dist.data.archive import DataError, data_dir_in, unpack_archive
from rift_dist.data.datasets import DATASETS, LAYOUTS, dataset_spec

if TYPE_CHECKING:  # pragma: no cover
    from rift_dist.config import DataConfig

__all__ = [
    "ArrayDataset",
    "DataError",
    "detect_layout",
    "load_split",
    "resolve_root",
    "clear_cache",
    "natural_key",
    "decode_image",
]

SPLITS = ("train", "test")
"""Split names accepted by :func:`load_split` (Tiny-ImageNet's test = official val)."""

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_DECODE_CACHE_VERSION = 1


# --------------------------------------------------------------------------- dataset


@dataclass
class ArrayDataset:
    """An in-memory labelled image set.

    Attributes:
        images: uint8 array ``[N, H, W, 3]``, RGB pixels 0..255 (greyscale sources converted to RGB).
        labels: int64 array ``[N]``, class indices into ``classes``.
        classes: class names (CIFAR names or Tiny-ImageNet wnids); ``classes[label]`` is the name.
        description: where the data came from (data set, split, path, layout, subset), for logs.

    Raises:
        DataError: on construction, when the arrays have the wrong dtype/shape or labels fall outside
            ``range(len(classes))``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise DataError(
                f"ArrayDataset.images must be a uint8 numpy array [N,H,W,3] (pixels 0..255), got "
                f"{type(self.images).__name__} {getattr(self.images, 'dtype', '')}; convert with .astype(np.uint8)"
            )
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"ArrayDataset.images must have shape [N,H,W,3], got {self.images.shape}")
        labels = np.asarray(self.labels)
        if labels.dtype != np.int64:
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"ArrayDataset.labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int64)
        self.labels = labels
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise DataError(
                f"ArrayDataset.labels must have shape [N] with N = {len(self.images)} images, got {labels.shape}"
            )
        self.classes = list(self.classes)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(
                f"ArrayDataset labels must lie in [0, {len(self.classes)}) (one per class name), "
                f"got min {labels.min()} max {labels.max()} ({self.description or 'no description'})"
            )

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images in pixels."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: Iterable[int] | np.ndarray) -> "ArrayDataset":
        """A new dataset holding ``images[indices]`` and ``labels[indices]`` (copies, in the given order).

        Args:
            indices: integer positions (any int array-like) or a boolean mask of length N.

        Raises:
            DataError: when an index is out of range.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"boolean subset mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset index out of range for a dataset of {len(self)} images ({self.description})")
        return ArrayDataset(
            images=np.asarray(self.images[idx]),  # a plain in-memory array, also for memory-mapped sources
            labels=np.asarray(self.labels[idx]),
            classes=list(self.classes),
            description=f"{self.description} [subset of {idx.size}]".strip(),
        )

    def class_counts(self) -> np.ndarray:
        """int64 ``[num_classes]``: number of images per class."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


# --------------------------------------------------------------------------- helpers


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``img2`` < ``img10``), case-insensitive."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def decode_image(path: str | Path) -> np.ndarray:
    """Decode one image file to a uint8 ``[H, W, 3]`` RGB array (greyscale/palette/CMYK converted).

    Raises:
        DataError: when the file cannot be opened or decoded (names the file).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); replace or delete the file") from exc


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES and not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(
            (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name)
        )
    except OSError:
        return []


def _list_entries(path: Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(empty)"


def _expected_class_count(dataset: str) -> int | None:
    """Class folders an image-folder copy must hold: fixed when the release names its classes (CIFAR)."""
    spec = DATASETS.get(dataset)
    return spec.num_classes if spec is not None and spec.classes is not None else None


def _expected_desc(dataset: str) -> str:
    pickle_layout = dataset_spec(dataset).pickle
    if pickle_layout is not None:
        return (
            f"{dataset} as python pickles ({pickle_layout.directory}/) or image folders (train/<class>/*.jpg, "
            f"test/<class>/*.jpg)"
        )
    return "Tiny-ImageNet-200 (wnids.txt, train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt)"


# --------------------------------------------------------------------------- pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR pickle needs (numpy arrays, bytes decoding)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR data pickle")
        if module.startswith("numpy._core") and not hasattr(np, "_core"):  # numpy < 2
            module = "numpy.core" + module[len("numpy._core") :]
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path}: not a readable CIFAR python pickle ({exc}); re-download the 'python version' of CIFAR "
            f"from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and labels, got {type(obj).__name__}")
    return obj


def _pget(d: dict, key: str, path: Path):
    if key in d:
        return d[key]
    if key.encode() in d:
        return d[key.encode()]
    have = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))
    raise DataError(f"{path}: missing key '{key}' (keys present: {have}); is this the right CIFAR variant?")


def _load_pickle(dataset: str, base: Path, split: str) -> ArrayDataset:
    spec = dataset_spec(dataset)
    layout = spec.pickle
    if layout is None:
        with_pickles = "/".join(s.name for s in DATASETS.values() if s.pickle is not None)
        raise DataError(f"the pickle layout exists only for {with_pickles}, not {dataset}; set data.layout: auto")
    names = list(layout.train_files if split == "train" else layout.test_files)
    meta_name, label_key, names_key = layout.meta_file, layout.label_key, layout.names_key
    side = spec.image_size
    missing = [str(base / n) for n in names + [meta_name] if not (base / n).is_file()]
    if missing:
        raise DataError(
            f"{base}: incomplete {dataset} pickle directory; missing {', '.join(missing)}. Unpack the complete "
            f"{layout.directory} archive there."
        )
    meta = _read_pickle(base / meta_name)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _pget(meta, names_key, base / meta_name)]
    images, labels = [], []
    for n in names:
        d = _read_pickle(base / n)
        data = np.asarray(_pget(d, "data", base / n), dtype=np.uint8)
        lab = np.asarray(_pget(d, label_key, base / n), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * side * side or len(data) != len(lab):
            raise DataError(
                f"{base / n}: expected 'data' of shape [N, {3 * side * side}] (3x{side}x{side}, channel-major) and N labels, "
                f"got data {data.shape} and {len(lab)} labels"
            )
        images.append(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))
        labels.append(lab)
    expected = spec.num_classes
    if len(classes) != expected:
        raise DataError(f"{base / meta_name}: {len(classes)} class names, expected {expected} for {dataset}")
    return ArrayDataset(
        images=np.ascontiguousarray(np.concatenate(images)),
        labels=np.concatenate(labels),
        classes=classes,
        description=f"{dataset} {split} from {base} (pickle layout)",
    )


# --------------------------------------------------------------------------- image layouts (listing)


@dataclass
class _Listing:
    files: list[str]
    labels: np.ndarray
    classes: list[str]
    description: str


def _order_classes(dataset: str, names: list[str], where: Path) -> list[str]:
    expected = _expected_class_count(dataset)
    if expected is not None and len(names) != expected:
        raise DataError(
            f"{where}: found {len(names)} class folders ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}), "
            f"expected {expected} for {dataset}; point data.root at the directory holding train/ and test/"
        )
    standard = DATASETS[dataset].classes if dataset in DATASETS else None
    if standard is not None and set(names) == set(standard):
        return list(standard)
    return sorted(names, key=natural_key)


def _images_under(d: Path) -> list[str]:
    """Image files below ``d`` (recursive), as path strings in natural order of their relative paths."""
    found: list[tuple[list, str]] = []
    top = str(d)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        rel = os.path.relpath(dirpath, top)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in _IMAGE_SUFFIXES:
                continue
            found.append((natural_key(name if rel == "." else os.path.join(rel, name)), os.path.join(dirpath, name)))
    found.sort(key=lambda t: t[0])
    return [path for _, path in found]


def _list_folder(dataset: str, base: Path, split: str) -> _Listing:
    candidates = ["train"] if split == "train" else ["test", "val"]
    split_dir = next((base / c for c in candidates if _subdirs(base / c)), None)
    if split_dir is None:
        raise DataError(
            f"{base}: no {'/'.join(candidates)} directory with class sub-folders for the {split} split; expected "
            f"{base}/{candidates[0]}/<class>/*.jpg (found: {_list_entries(base)})"
        )
    class_dirs = {d.name: d for d in _subdirs(split_dir)}
    classes = _order_classes(dataset, list(class_dirs), split_dir)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_under(class_dirs[name])
        if not found:
            raise DataError(f"{class_dirs[name]}: class folder holds no images (*.jpg, *.jpeg, *.png)")
        files += found
        labels += [label] * len(found)
    return _Listing(files, np.asarray(labels, dtype=np.int64), classes, f"{dataset} {split} from {split_dir} (folder layout)")


def _read_wnids(base: Path) -> list[str]:
    try:
        wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    except OSError as exc:
        raise DataError(f"{base / 'wnids.txt'}: unreadable ({exc})") from exc
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{base / 'wnids.txt'}: expected one unique wnid per line, got {len(wnids)} lines")
    return sorted(wnids)


def _list_tiny(base: Path, split: str) -> _Listing:
    classes = _read_wnids(base)
    index = {w: i for i, w in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    if split == "train":
        missing = []
        for w in classes:
            d = base / "train" / w / "images"
            d = d if d.is_dir() else base / "train" / w
            found = _images_under(d) if d.is_dir() else []
            if not found:
                missing.append(str(d))
            files += found
            labels += [index[w]] * len(found)
        if missing:
            raise DataError(
                f"{base}/train: no images for {len(missing)} of the {len(classes)} wnids in wnids.txt, e.g. "
                f"{', '.join(missing[:5])}; expected train/<wnid>/images/*.JPEG"
            )
        return _Listing(files, np.asarray(labels, dtype=np.int64), classes, f"tiny-imagenet train from {base} (tiny-imagenet layout)")
    val = base / "val"
    ann = val / "val_annotations.txt"
    if ann.is_file():
        img_dir = val / "images"
        entries = []
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) < 2 or cols[1] not in index:
                raise DataError(
                    f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt, got {line[:80]!r}"
                )
            entries.append((cols[0], index[cols[1]]))
        entries.sort(key=lambda e: natural_key(e[0]))
        present = set(os.listdir(img_dir)) if img_dir.is_dir() else set()
        missing = [str(img_dir / f) for f, _ in entries if f not in present]
        if missing:
            raise DataError(
                f"{img_dir}: {len(missing)} images listed in {ann.name} are missing, e.g. {', '.join(missing[:5])}"
            )
        listed = {f for f, _ in entries}
        extra = sorted(n for n in present if _is_image(Path(n)) and n not in listed)
        if extra:
            raise DataError(
                f"{img_dir}: {len(extra)} images have no label in {ann}, e.g. {', '.join(extra[:5])}; "
                f"add them to val_annotations.txt or remove them"
            )
        files = [os.path.join(img_dir, f) for f, _ in entries]
        labels = [lab for _, lab in entries]
        return _Listing(files, np.asarray(labels, dtype=np.int64), classes,
                        f"tiny-imagenet test (official val) from {base} (tiny-imagenet layout, labels from {ann.name})")
    if _subdirs(val):  # val re-arranged into class folders by some scripts
        for w in classes:
            d = val / w
            found = _images_under(d) if d.is_dir() else []
            files += found
            labels += [index[w]] * len(found)
        if files:
            return _Listing(files, np.asarray(labels, dtype=np.int64), classes,
                            f"tiny-imagenet test (official val, class folders) from {val}")
    raise DataError(
        f"{val}: expected val/images/*.JPEG with labels in {ann} (column 2 = wnid), as in the official "
        f"tiny-imagenet-200.zip; found: {_list_entries(val) if val.is_dir() else 'no val directory'}"
    )


# --------------------------------------------------------------------------- decoding (+ cache)


def _decode_all(listing: _Listing) -> np.ndarray:
    """Decode every image of a listing into one uint8 [N, H, W, 3] array.

    Raises:
        DataError: when the split is empty, or when its images do not all have one size: the
            message blames the images of the minority size(s) (not whichever sorts first) and
            names the majority size.
    """
    if not listing.files:
        raise DataError(f"no images found for {listing.description}")
    first = decode_image(listing.files[0])
    out = np.empty((len(listing.files),) + first.shape, dtype=np.uint8)
    out[0] = first
    by_shape: dict[tuple, list] = {first.shape: [listing.files[0]]}
    for i, path in enumerate(listing.files[1:], 1):
        img = decode_image(path)
        by_shape.setdefault(img.shape, []).append(path)
        if img.shape == first.shape:
            out[i] = img
    if len(by_shape) > 1:
        common = max(by_shape, key=lambda shape: len(by_shape[shape]))
        odd = [(p, shape) for shape, paths in by_shape.items() if shape != common for p in paths]
        shown = ", ".join(f"{p} ({shape[1]}x{shape[0]})" for p, shape in odd[:5])
        raise DataError(
            f"{len(odd)} image(s) of {listing.description} differ in size from the other "
            f"{len(by_shape[common])}, which are {common[1]}x{common[0]}: {shown}"
            f"{' ...' if len(odd) > 5 else ''}; all images of a split must have one size (resize the odd ones)"
        )
    return out


def _listing_key(dataset: str, split: str, listing: _Listing) -> str:
    h = hashlib.sha256()
    base = Path(os.path.commonpath([str(p) for p in listing.files[:1] + listing.files[-1:]])).resolve()
    h.update(json.dumps([_DECODE_CACHE_VERSION, dataset, split, str(base), listing.classes]).encode())
    for path, label in zip(listing.files, listing.labels.tolist()):
        st = os.stat(path)
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    return h.hexdigest()[:16]


def _decode_cached(dataset: str, split: str, listing: _Listing, cache_dir: Path) -> np.ndarray:
    key = _listing_key(dataset, split, listing)
    target = cache_dir / "decoded" / f"{dataset}-{split}-{key}"
    done = target / "done.json"
    if done.is_file():
        try:
            images = np.load(target / "images.npy", mmap_mode="r")
            if images.shape[0] == len(listing.files):
                return images
        except (OSError, ValueError):
            pass
    images = _decode_all(listing)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        np.save(tmp / "images.npy", images)
        (tmp / "done.json").write_text(json.dumps({"n": len(images), "description": listing.description}))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except OSError:
        pass  # the cache is an optimisation only
    return images


# --------------------------------------------------------------------------- layout detection


def _is_pickle_dir(dataset: str, d: Path) -> bool:
    layout = dataset_spec(dataset).pickle
    if layout is None:
        return False
    return any(all((d / name).is_file() for name in group) for group in layout.detect)


def _is_tiny_dir(d: Path) -> bool:
    return (d / "wnids.txt").is_file()


def _is_folder_dir(d: Path, dataset: str = "") -> bool:
    if _is_tiny_dir(d):
        return False
    expected = _expected_class_count(dataset) if dataset else None
    for name in ("train", "test", "val"):
        sub = _subdirs(d / name)
        if sub and (expected is None or len(sub) == expected):
            return True
    return False


def detect_layout(dataset: str, root: str | Path, layout: str = "auto") -> tuple[str, Path]:
    """Find which layout ``root`` holds for ``dataset`` and the directory that holds it.

    ``root`` may be the data directory itself or its parent (e.g. a directory containing
    ``cifar-10-batches-py/`` or ``cifar10-jpeg/``); its immediate sub-directories are searched too.

    Returns:
        ``(layout, directory)`` with layout one of pickle, folder, tiny-imagenet.

    Raises:
        DataError: root missing, not a directory, or holding no data of this data set in that layout
            (the message lists what was looked for and what is there).
    """
    spec = dataset_spec(dataset)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)} (data.layout)")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"data root {root} does not exist; set data.root (or env RIFT_DATA_ROOT) to the directory holding "
            f"{_expected_desc(dataset)}, or set data.archive to a .tar.gz of it"
        )
    if not root.is_dir():
        raise DataError(f"data root {root} is a file, not a directory; if it is an archive, set data.archive: {root}")
    checks = []
    if "pickle" in spec.layouts and layout in ("auto", "pickle"):
        checks.append(("pickle", lambda d: _is_pickle_dir(dataset, d)))
    if "tiny-imagenet" in spec.layouts and layout in ("auto", "tiny-imagenet"):
        checks.append(("tiny-imagenet", _is_tiny_dir))
    if layout in ("auto", "folder"):
        checks.append(("folder", lambda d: _is_folder_dir(d, dataset)))
    if not checks:
        raise DataError(f"layout {layout!r} does not exist for {dataset}; use data.layout: auto")
    candidates = [root] + _subdirs(root)
    for name, pred in checks:  # a data-set specific layout anywhere beats a generic image folder
        for cand in candidates:
            if pred(cand):
                return name, cand
    hints = []
    others = [s for s in DATASETS.values() if s.name != dataset]
    for other in others:
        if other.pickle is not None and any(_is_pickle_dir(other.name, c) for c in candidates):
            hints.append(f"it holds {other.name} pickles ({other.pickle.directory}); set data.dataset: {other.name}")
    if "tiny-imagenet" not in spec.layouts and any(_is_tiny_dir(c) for c in candidates):
        tiny = next(s for s in DATASETS.values() if "tiny-imagenet" in s.layouts)
        hints.append(f"it holds {tiny.title}; set data.dataset: {tiny.name}")
    for other in others:
        count = _expected_class_count(other.name)
        if count is not None and any(_is_folder_dir(c, other.name) for c in candidates):
            hints.append(f"it holds image folders with {count} classes ({other.name}?)")
    hint = ("; " + "; ".join(hints)) if hints else ""
    raise DataError(
        f"no {dataset} data found at {root} (layout {layout}); expected {_expected_desc(dataset)} in that "
        f"directory or one of its sub-directories; found: {_list_entries(root)}{hint}"
    )


# --------------------------------------------------------------------------- public loading

_LOAD_CACHE: dict[tuple, ArrayDataset] = {}
_DERIVED_CACHES: list[dict] = []  # memos built from loaded splits (``splits.make_splits`` registers its own)


def register_derived_cache(cache: dict) -> dict:
    """Have :func:`clear_cache` also empty ``cache`` (a memo of something built from loaded data); returns it."""
    _DERIVED_CACHES.append(cache)
    return cache


def clear_cache() -> None:
    """Forget the per-process memo of :func:`load_split` and every registered derived memo (the splits')."""
    _LOAD_CACHE.clear()
    for cache in _DERIVED_CACHES:
        cache.clear()


def load_split(
    dataset: str,
    root: str | Path,
    split: str,
    layout: str = "auto",
    *,
    cache_dir: str | Path | None = None,
) -> ArrayDataset:
    """Load one split of a data set into memory.

    Args:
        dataset: cifar10, cifar100 or tiny-imagenet.
        root: data directory or its parent (see :func:`detect_layout`).
        split: train or test (Tiny-ImageNet: test = the official val split, labels from
            ``val/val_annotations.txt`` column 2).
        layout: auto (detect), pickle, folder or tiny-imagenet.
        cache_dir: when given, decoded image folders are kept there as ``decoded/*/images.npy``
            (memory-mapped on later loads); pickles are not cached (they load fast).

    Returns:
        :class:`ArrayDataset` with uint8 ``[N, H, W, 3]`` images (0..255, RGB) and int64 labels.
        The result is memoised per process; its arrays are read-only -- use ``subset`` for a copy.

    Raises:
        DataError: unknown data set/split/layout, missing or unreadable files, wrong class count,
            images of mixed sizes; the message names the path and the fix.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or test (Tiny-ImageNet's test = its official val split)")
    found_layout, base = detect_layout(dataset, root, layout)
    key = (dataset, str(base.resolve()), split, found_layout)
    if key in _LOAD_CACHE:
        return _LOAD_CACHE[key]
    if found_layout == "pickle":
        ds = _load_pickle(dataset, base, split)
    else:
        listing = _list_folder(dataset, base, split) if found_layout == "folder" else _list_tiny(base, split)
        if cache_dir:
            images = _decode_cached(dataset, split, listing, Path(cache_dir).expanduser())
        else:
            images = _decode_all(listing)
        h, w = images.shape[1:3]
        ds = ArrayDataset(images, listing.labels, listing.classes, f"{listing.description}, {len(images)} images {h}x{w}")
    ds.images.flags.writeable = False
    ds.labels.flags.writeable = False
    _LOAD_CACHE[key] = ds
    return ds


def resolve_root(cfg: "DataConfig") -> Path:
    """The data directory for a :class:`~rift_dist.config.DataConfig`.

    Order: ``data.archive`` (unpacked once into ``data.cache_dir``, atomically, see
    :mod:`rift_dist.data.archive`; the archive's single top-level directory is returned, and a
    relative ``data.root`` then names a sub-directory inside it), else ``data.root``, else env
    ``RIFT_DATA_ROOT``.

    Raises:
        DataError: nothing configured, the path does not exist, the archive is missing or unsafe, or
            ``data.root`` is absolute while ``data.archive`` is set.
    """
    if cfg.archive:
        unpacked = unpack_archive(cfg.archive, cfg.cache_dir or "~/.cache/rift_dist")
        base = data_dir_in(unpacked)
        if cfg.root:
            sub = Path(cfg.root)
            if sub.is_absolute():
                raise DataError(
                    f"data.archive ({cfg.archive}) and an absolute data.root ({cfg.root}) are both set; set only "
                    f"one, or make data.root a path relative to the archive's contents"
                )
            base = base / sub
            if not base.is_dir():
                raise DataError(f"data.root {cfg.root!r} names no directory inside the archive {cfg.archive} ({base})")
        return base
    root = cfg.root or os.environ.get("RIFT_DATA_ROOT", "")
    if not root:
        raise DataError(
            "no data location: set data.root in the config (or --set data.root=DIR), env RIFT_DATA_ROOT, or "
            "data.archive (e.g. ../shared/data/cifar10-jpeg.tar.gz)"
        )
    path = Path(root).expanduser()
    if not path.exists():
        src = "data.root" if cfg.root else "env RIFT_DATA_ROOT"
        raise DataError(f"{src} = {path} does not exist; point it at the directory holding the {cfg.dataset} data")
    return path.resolve()
