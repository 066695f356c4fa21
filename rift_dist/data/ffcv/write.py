"""The ``.beton`` file format of rift_dist: write, verify and convert (FFCV, Leclerc et al., CVPR 2023).

Files
    Every ``.beton`` written here has two fields, in this order:

    ``image``  RGBImageField, ``raw`` (uint8 pixels, exact) or ``jpg`` (JPEG at
               ``jpeg_quality``, lossy) storage; all images of a file share one shape.
    ``label``  IntField, int64 class index in ``[0, num_classes)``.

    Beside each file lies a JSON sidecar ``<file>.beton.json`` (n, shape, classes,
    storage, JPEG quality, source description, data root, content hash, file size);
    :func:`verify_beton` needs it and the loader checks every file it opens with it.

Cache layout (``cfg.data.cache_dir`` and ``rift data convert --out`` use the same one)
    ``<dir>/<dataset>-<tag>/train.beton``          the full training split
    ``<dir>/<dataset>-<tag>/test.beton``           the full test split
    ``<dir>/<dataset>-<tag>/c/<name>-<s>.beton``   a corruption set: ONE FILE PER
                                                   corruption and severity (the same
                                                   two fields, so the evaluation loop
                                                   builds one loader per set, exactly as
                                                   on the torch path)
    ``<dir>/<dataset>-<tag>/sets/<hash>.beton``    any other ArrayDataset handed to the
                                                   loader, keyed by a hash of its content

    ``<tag>`` is ``raw`` or ``jpeg-q<quality>`` (the quality is part of the name so that
    two qualities never share a file).  Validation and training subsets are NOT separate
    files: they are FFCV ``indices=`` over the full ``train.beton``.  A split file whose
    sidecar sha256 (pixels + labels) differs from the loaded source's (the
    ``make_splits`` record) is stale and rewritten; a file that fails verification
    (truncated, wrong fields, ...) is an error naming the file: delete it to rebuild.

Writing is atomic (a temporary file in the same directory, then a rename; the sidecar is
renamed first, so an existing ``.beton`` is always complete); the loader guards it with a
lock file, so several ranks starting together write a missing file once.  FFCV's writer
forks worker processes; once numba's thread pool runs in the process (a loader was used),
forking is unsafe, so a writer thread is used instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from rift_dist.data.datasets import DATASETS, LAYOUTS
from rift_dist.data.ffcv import ffcv_available, keep_threads, require_ffcv
from rift_dist.data.sources import ArrayDataset, DataError

__all__ = [
    "FIELDS",
    "SIDECAR_FORMAT",
    "STORAGES",
    "write_beton",
    "verify_beton",
    "convert_dataset",
    "content_sha256",
    "beton_dir",
    "storage_tag",
    "sidecar_path",
    "add_convert_arguments",
    "convert_command",
    "add_verify_arguments",
    "verify_command",
]

FIELDS = ("image", "label")
"""Field names of every .beton written here, in file order."""
SIDECAR_FORMAT = "rift_dist.ffcv/1"
"""Value of the sidecar's ``format`` key."""
STORAGES = ("raw", "jpeg")
"""Storage modes of the image field: exact uint8 pixels or lossy JPEG."""

# --------------------------------------------------------------------------- paths


def storage_tag(storage: str, jpeg_quality: int = 90) -> str:
    """Directory tag of a storage mode: ``raw`` or ``jpeg-q<quality>``.

    Raises:
        DataError: when ``storage`` is not raw or jpeg, or the quality is outside 1..100.
    """
    if storage not in STORAGES:
        raise DataError(f"FFCV storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage == "raw":
        return "raw"
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {jpeg_quality}")
    return f"jpeg-q{int(jpeg_quality)}"


def beton_dir(base: str | os.PathLike, dataset: str, storage: str = "raw", jpeg_quality: int = 90) -> Path:
    """The directory holding one data set's .beton files: ``<base>/<dataset>-<tag>``."""
    return Path(base).expanduser() / f"{dataset}-{storage_tag(storage, jpeg_quality)}"


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a ``.beton`` file: ``<file>.beton.json`` beside it."""
    return path.with_name(path.name + ".json")


def content_sha256(ds: ArrayDataset) -> str:
    """Hex sha256 of a data set's pixels (C-order uint8 bytes) followed by its labels (int64 little-endian).

    The same definition as ``splits.make_splits``' ``full_train_sha256`` / ``full_test_sha256``
    record entries, so a cached split file can be checked against the loaded source.
    About 0.3 s per 150 MB of pixels.
    """
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(ds.images)).cast("B"))
    h.update(np.asarray(ds.labels, dtype="<i8").tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def _numba_threads_started() -> bool:
    """Whether numba's parallel thread pool has been launched in this process (fork is unsafe then)."""
    mod = sys.modules.get("numba.np.ufunc.parallel")
    return bool(getattr(mod, "_is_initialized", False))


class _Samples:
    """Indexable view ``i -> (image uint8 [H,W,3], label int)`` that FFCV's writer reads."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def _check_arrays(ds: ArrayDataset, where: str) -> tuple[np.ndarray, np.ndarray]:
    images = ds.images
    labels = np.asarray(ds.labels)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{where}: images must be a uint8 array [N, H, W, 3], got {dtype} {shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{where}: labels must be a 1-D array of {len(images)} ints, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    if len(images) == 0:
        raise DataError(f"{where}: the data set is empty")
    if labels.min() < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}")
    if images.shape[1] > 65535 or images.shape[2] > 65535:
        raise DataError(f"{where}: images larger than 65535 pixels do not fit FFCV's metadata")
    return images, labels.astype(np.int64, copy=False)


class _WorkerThread(threading.Thread):
    """Stands in for ``multiprocessing.Process`` in FFCV's writer: the same job in a thread."""

    def __init__(self, target, args):
        super().__init__(target=target, args=args, daemon=True, name="ffcv-writer")


@contextlib.contextmanager
def _guard_writer(progress: bool, desc: str, threads: bool) -> Iterator[list]:
    """Patch ``ffcv.writer`` for one write: our progress bar, optional thread workers, no endless wait.

    FFCV's writer polls a shared counter until every sample is written; if a worker dies
    it would poll forever.  Its ``sleep`` is swapped for one that raises DataError when
    no worker is alive on three polls in a row while the count is short.  With
    ``threads`` the workers are threads of this process instead of forked processes.
    Yields the list that collects the thread workers.
    """
    import multiprocessing
    import time
    from functools import partial

    import ffcv.writer as fw
    from tqdm import tqdm

    saved = fw.tqdm, fw.sleep, fw.Process, fw.Queue
    started: list[threading.Thread] = []
    queues: list = []
    idle = [0]

    def make_queue(*args, **kwargs):
        q = saved[3](*args, **kwargs)
        queues.append(q)
        return q

    def make_thread(target, args):
        t = _WorkerThread(target, args)
        started.append(t)
        return t

    def sleep(seconds: float) -> None:
        time.sleep(seconds)
        alive = any(t.is_alive() for t in started) if threads else bool(multiprocessing.active_children())
        idle[0] = 0 if alive else idle[0] + 1
        if idle[0] > 2:
            raise DataError(f"{desc}: an FFCV writer worker died before writing every sample (see its error above)")

    fw.tqdm = partial(tqdm, desc=desc, unit="img", disable=not progress, leave=False)
    fw.sleep = sleep
    fw.Queue = make_queue
    if threads:
        fw.Process = make_thread
    try:
        yield started
    except BaseException:
        for q in queues:  # unread work items must not block interpreter exit
            q.cancel_join_thread()
        raise
    finally:
        fw.tqdm, fw.sleep, fw.Process, fw.Queue = saved


def write_beton(
    ds: ArrayDataset,
    path: str | os.PathLike,
    storage: str = "raw",
    jpeg_quality: int = 90,
    overwrite: bool = False,
    progress: bool = True,
    *,
    num_workers: int = 0,
    source_root: str = "",
    digest: str = "",
    worker_threads: bool | None = None,
) -> Path:
    """Write an ArrayDataset to an FFCV ``.beton`` file plus its JSON sidecar, atomically.

    Args:
        ds: images uint8 [N, H, W, 3] (one shape for all), labels int [N] >= 0,
            ``classes`` (list of N_classes names), ``description`` (str).
        path: the ``.beton`` file to create; its directory is created if needed.
        storage: ``raw`` (exact uint8 pixels, 3*H*W bytes per image) or ``jpeg``
            (lossy, ~5-10x smaller, decoded with libjpeg-turbo when read).
        jpeg_quality: JPEG quality 1..100 (used with ``storage="jpeg"``).
        overwrite: replace an existing file; otherwise an existing file is an error.
        progress: show a tqdm progress bar (on stderr).
        num_workers: writer processes (0 = min(CPU count, 8)).
        source_root: the data root the images came from, recorded in the sidecar.
        digest: :func:`content_sha256` of ``ds`` when the caller has it (else computed).
        worker_threads: run FFCV's writer workers as threads of this process instead of
            forked processes (then one worker).  None = a thread once numba's thread pool
            runs in this process (forking then is unsafe: TBB warns "Unable to join threads
            to shut down before fork()" and children may hang), else processes.

    Returns:
        The path of the written file.

    Raises:
        DataError: FFCV missing; wrong dtypes/shapes; the file exists and ``overwrite`` is
            False; a writer process failed.  No partial file is left behind.
    """
    require_ffcv()
    path = Path(path).expanduser()
    storage_tag(storage, jpeg_quality)  # validates storage and quality
    images, labels = _check_arrays(ds, f"write_beton({path})")
    classes = [str(c) for c in getattr(ds, "classes", [])]
    if classes and int(labels.max()) >= len(classes):
        raise DataError(f"write_beton({path}): label {int(labels.max())} but only {len(classes)} classes")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    n, height, width, _ = images.shape
    use_threads = _numba_threads_started() if worker_threads is None else bool(worker_threads)
    workers = num_workers if num_workers > 0 else min(os.cpu_count() or 1, 8)
    # (Thread workers would share one page allocator in FFCV's writer: one thread only.)
    workers = 1 if use_threads else max(1, min(workers, math.ceil(n / 100)))
    # Small pages for small sets (every writer process pads its last page).
    page_size = MIN_PAGE_SIZE if images.nbytes < (256 << 20) else 4 * MIN_PAGE_SIZE
    fields = {
        "image": RGBImageField(write_mode="raw" if storage == "raw" else "jpg", jpeg_quality=int(jpeg_quality)),
        "label": IntField(),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_json = tmp.with_name(tmp.name + ".json")
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=workers)
        try:
            with keep_threads(), _guard_writer(progress, f"writing {path.name}", threads=use_threads):
                writer.from_indexed_dataset(_Samples(images, labels), chunksize=100)
        except BaseException:
            shm = getattr(writer, "metadata_sm", None)  # FFCV frees it only on success
            if shm is not None and not isinstance(shm, int):
                with contextlib.suppress(Exception):
                    shm.unlink()
                try:
                    shm.close()
                except BufferError:  # a dead worker's traceback still views it; GC unmaps it later
                    shm.close = lambda: None
            raise
        meta = {
            "format": SIDECAR_FORMAT,
            "file": path.name,
            "size_bytes": tmp.stat().st_size,
            "n": int(n),
            "shape": [int(height), int(width), 3],
            "num_classes": len(classes) if classes else int(labels.max()) + 1,
            "classes": classes,
            "storage": storage,
            "jpeg_quality": int(jpeg_quality) if storage == "jpeg" else None,
            "fields": {"image": "RGBImageField", "label": "IntField"},
            "source": str(getattr(ds, "description", "")),
            "source_root": str(Path(source_root).expanduser().resolve()) if source_root else "",
            "content_sha256": digest or content_sha256(ds),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp_json.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp_json, sidecar_path(path))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_json):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return path


# --------------------------------------------------------------------------- verifying


def _read_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file() and path.suffix != ".beton":
        # not "delete it so that it is rebuilt": `rift data verify configs/x.yaml` must not advise deleting a config
        raise DataError(f"{path}: not a .beton file (and no {side.name} beside it); rift data verify checks the "
                        f"FFCV files that `rift data convert` writes (<split>.beton)")
    if not side.is_file():
        raise DataError(
            f"{path}: its sidecar {side.name} is missing (the file was not written by rift_dist, or was "
            f"copied without it); re-create it with `rift data convert ... --overwrite` or delete {path} "
            f"so that it is rebuilt"
        )
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{side}: unreadable sidecar ({exc}); delete {path} and its sidecar to rebuild") from exc
    need = ("format", "n", "shape", "storage", "size_bytes", "classes")
    missing = [k for k in need if k not in meta]
    if missing or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(
            f"{side}: not a {SIDECAR_FORMAT} sidecar (missing {', '.join(missing) or 'format'}); "
            f"delete {path} and its sidecar to rebuild"
        )
    return meta


def verify_beton(path: str | os.PathLike, expected_len: int | None = None, num_classes: int | None = None) -> dict:
    """Check a ``.beton`` file written by :func:`write_beton` before it is used.

    Checks: the sidecar exists and matches the file's size (a truncated or partly copied
    file fails here); the header parses; the fields are exactly ``image`` (RGBImageField)
    and ``label`` (IntField); the sample count equals the sidecar's (and
    ``expected_len``); every image has the sidecar's shape and storage mode and its bytes
    lie inside the file; labels lie in ``[0, num_classes)``; the first, middle and last
    images decode to [H, W, 3] uint8.  Reads only metadata and three images (~10 ms
    for 50,000 samples).

    Args:
        path: the .beton file.
        expected_len: required number of samples, or None.
        num_classes: labels must be < this; None = the sidecar's class count.

    Returns:
        A report: ``path``, ``n``, ``shape`` [H, W, 3], ``num_classes``, ``classes``,
        ``storage``, ``jpeg_quality``, ``size_bytes``, ``label_counts`` (list, per class),
        ``source``, ``source_root``, ``content_sha256``, ``decoded`` (indices checked).

    Raises:
        DataError: naming the file and what is wrong (missing, missing sidecar, truncated,
            wrong fields, wrong length, label out of range, undecodable image).
    """
    require_ffcv()
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such .beton file (create it with `rift data convert`)")
    meta = _read_sidecar(path)
    size = path.stat().st_size
    if size != meta["size_bytes"]:
        what = "truncated" if size < meta["size_bytes"] else "longer than written"
        raise DataError(
            f"{path}: {what} ({size} bytes, its sidecar says {meta['size_bytes']}); the file is damaged "
            f"or partly copied: delete it (it is rebuilt on next use) or re-run `rift data convert --overwrite`"
        )

    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure of a damaged file
        raise DataError(f"{path}: not a readable FFCV file ({type(exc).__name__}: {exc}); delete it to rebuild") from exc

    kinds = [type(h).__name__ for h in reader.handlers.values()]
    if list(reader.field_names) != list(FIELDS) or not (
        isinstance(reader.handlers.get("image"), RGBImageField) and isinstance(reader.handlers.get("label"), IntField)
    ):
        got = ", ".join(f"{n} ({k})" for n, k in zip(reader.field_names, kinds))
        raise DataError(
            f"{path}: wrong fields [{got}]; expected [image (RGBImageField), label (IntField)]: "
            f"write it with rift_dist (`rift data convert`)"
        )
    n = int(reader.num_samples)
    if n != int(meta["n"]) or len(reader.metadata) != n:
        raise DataError(f"{path}: header says {n} samples, metadata holds {len(reader.metadata)}, sidecar {meta['n']}")
    if expected_len is not None and n != int(expected_len):
        raise DataError(f"{path}: holds {n} samples, expected {expected_len}; delete it to rebuild")

    names = reader.metadata.dtype.names
    img_meta = reader.metadata[names[0]]
    labels = np.asarray(reader.metadata[names[1]])
    h, w, _ = (int(v) for v in meta["shape"])
    if (img_meta["height"] != h).any() or (img_meta["width"] != w).any():
        raise DataError(f"{path}: image sizes differ from the sidecar's {h}x{w}")
    want_mode = 1 if meta["storage"] == "raw" else 0  # FFCV IMAGE_MODES: jpg 0, raw 1
    if (img_meta["mode"] != want_mode).any():
        raise DataError(f"{path}: images are not all stored as {meta['storage']}, as the sidecar says")

    classes = list(meta.get("classes") or [])
    k = int(num_classes) if num_classes is not None else int(meta.get("num_classes") or len(classes))
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= k:
        raise DataError(
            f"{path}: labels span [{lo}, {hi}] but the data set has {k} classes (labels must lie in [0, {k})); "
            f"the file belongs to another data set or is damaged"
        )

    alloc = reader.alloc_table
    ptr_to_size = dict(zip(alloc["ptr"].tolist(), alloc["size"].tolist()))
    ptrs = img_meta["data_ptr"]
    sizes = np.array([ptr_to_size.get(int(p), -1) for p in ptrs], dtype=np.int64)
    if (sizes < 0).any():
        bad = int(np.flatnonzero(sizes < 0)[0])
        raise DataError(f"{path}: sample {bad} has no entry in the allocation table (damaged file)")
    if int((ptrs.astype(np.int64) + sizes).max()) > size:
        raise DataError(f"{path}: image data runs past the end of the file (truncated)")
    if meta["storage"] == "raw" and (sizes != h * w * 3).any():
        raise DataError(f"{path}: raw images are not {h}x{w}x3 bytes each")

    import cv2

    checked = sorted({0, n // 2, n - 1})
    with open(path, "rb") as fh:
        for i in checked:
            fh.seek(int(ptrs[i]))
            buf = np.frombuffer(fh.read(int(sizes[i])), dtype=np.uint8)
            if meta["storage"] == "raw":
                img = buf.reshape(h, w, 3) if buf.size == h * w * 3 else None
            else:
                img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if img is None or img.shape != (h, w, 3):
                raise DataError(f"{path}: image {i} does not decode to {h}x{w}x3")

    return {
        "path": str(path),
        "n": n,
        "shape": [h, w, 3],
        "num_classes": k,
        "classes": classes,
        "storage": meta["storage"],
        "jpeg_quality": meta.get("jpeg_quality"),
        "size_bytes": size,
        "label_counts": np.bincount(labels, minlength=k).tolist(),
        "source": meta.get("source", ""),
        "source_root": meta.get("source_root", ""),
        "content_sha256": meta.get("content_sha256", ""),
        "decoded": checked,
    }


# --------------------------------------------------------------------------- conversion


def _corruption_name(name: str, severity: int) -> str:
    return f"c/{name}-{int(severity)}"


def convert_dataset(
    dataset: str,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: str = "auto",
    storage: str = "raw",
    jpeg_quality: int = 90,
    overwrite: bool = False,
    *,
    corruption_root: str | os.PathLike | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    corruption_subset: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Convert a data set's train and test splits (and optionally its -C sets) to .beton files.

    Files go to ``<out_dir>/<dataset>-<tag>/`` (see the module docstring); with ``out_dir``
    = ``<cache_dir>/ffcv`` this fills the loader's cache.  Existing files are kept (and
    verified) unless ``overwrite``.

    Args:
        dataset: cifar10, cifar100 or tiny-imagenet.
        root: directory of the source data (CIFAR pickles, image folders, Tiny-ImageNet).
        out_dir: base output directory.
        layout: auto, pickle, folder or tiny-imagenet (see ``sources.load_split``).
        storage, jpeg_quality: as in :func:`write_beton`.
        overwrite: rewrite existing files.
        corruption_root: directory of a CIFAR-10-C style set; None = no corruption files.
        corruptions: corruption names (None/empty = all that ``load_corruption_set`` offers).
        severities: severities 1..5.
        corruption_subset: images per corruption and severity (0 = all).
        num_workers, progress: as in :func:`write_beton`.

    Returns:
        ``{"train": path, "test": path, "c/<corruption>-<severity>": path, ...}``.

    Raises:
        DataError: from loading the source or writing/verifying a file.
    """
    from rift_dist.data.sources import load_split

    out = beton_dir(out_dir, dataset, storage, jpeg_quality)
    root_s = str(root)
    paths: dict[str, Path] = {}
    # load (and so validate) every split to be written before the first file is written: a refused
    # split (e.g. a Tiny-ImageNet val/ without val_annotations.txt) must not leave a train.beton behind
    todo = {}
    for split in ("train", "test"):
        path = out / f"{split}.beton"
        if path.exists() and not overwrite:
            verify_beton(path, num_classes=DATASETS[dataset].num_classes if dataset in DATASETS else None)
            print(f"[ffcv] {path} exists and verifies; kept (pass --overwrite to rewrite)")
        else:
            todo[split] = load_split(dataset, root_s, split, layout=layout)
        paths[split] = path
    for split, ds in todo.items():
        write_beton(ds, paths[split], storage, jpeg_quality, overwrite=overwrite, progress=progress,
                    num_workers=num_workers, source_root=root_s)
        print(f"[ffcv] wrote {paths[split]} ({len(ds)} images)")
    if corruption_root:
        from rift_dist.data.corruptions.load import load_corruption_set

        sets = load_corruption_set(str(corruption_root), dataset, list(corruptions or []), list(severities),
                                   int(corruption_subset))
        for name, severity, ds in sets:
            key = _corruption_name(name, severity)
            path = out / f"{key}.beton"
            if path.exists() and not overwrite:
                verify_beton(path, expected_len=len(ds))
            else:
                write_beton(ds, path, storage, jpeg_quality, overwrite=overwrite, progress=progress,
                            num_workers=num_workers, source_root=str(corruption_root))
                print(f"[ffcv] wrote {path} ({len(ds)} images)")
            paths[key] = path
    return paths



# --------------------------------------------------------------------------- CLI helpers


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``rift data convert DATASET --root R --out O [...]`` to ``parser``."""
    parser.add_argument("dataset", choices=sorted(DATASETS), help="data set to convert")
    parser.add_argument("--root", required=True,
                        help="directory of the source data (CIFAR pickles, image folders, Tiny-ImageNet)")
    parser.add_argument("--out", required=True,
                        help="base output directory; files go to OUT/<dataset>-<raw|jpeg-qQ>/ "
                             "(<data.cache_dir>/ffcv is where the loader looks)")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--storage", default="raw", choices=STORAGES, help="raw (exact pixels) or jpeg (smaller, lossy)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (with --storage jpeg)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    parser.add_argument("--corruptions-root", default="", help="directory of a CIFAR-10-C style set to convert too")
    parser.add_argument("--corruptions", nargs="*", default=[], help="corruption names (default: all)")
    parser.add_argument("--severities", nargs="*", type=int, default=[1, 2, 3, 4, 5], help="severities 1..5")
    parser.add_argument("--workers", type=int, default=0, help="writer processes (0 = min(CPUs, 8))")
    return parser


def convert_command(args: argparse.Namespace) -> int:
    """Run ``rift data convert``; prints the files written.  Returns 0, or 2 on a data error."""
    ok, reason = ffcv_available()
    if not ok:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:
        paths = convert_dataset(
            args.dataset, args.root, args.out, layout=args.layout, storage=args.storage,
            jpeg_quality=args.quality, overwrite=args.overwrite,
            corruption_root=args.corruptions_root or None, corruptions=args.corruptions,
            severities=args.severities, num_workers=args.workers,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def add_verify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``rift data verify FILE [FILE ...]`` to ``parser``."""
    parser.add_argument("files", nargs="+", help=".beton files to check")
    parser.add_argument("--num-classes", type=int, default=None, help="labels must lie below this (default: the sidecar's)")
    parser.add_argument("--expected-len", type=int, default=None, help="required number of samples")
    return parser


def verify_command(args: argparse.Namespace) -> int:
    """Run ``rift data verify``; prints one report per file.  Returns 0 when all pass, 1 if any fails, 2 without FFCV."""
    ok, reason = ffcv_available()
    if not ok:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    failed = 0
    for name in args.files:
        try:
            r = verify_beton(name, expected_len=args.expected_len, num_classes=args.num_classes)
        except DataError as exc:
            failed += 1
            print(f"FAIL {name}\n  {exc}")
            continue
        counts = r["label_counts"]
        quality = f", JPEG quality {r['jpeg_quality']}" if r["storage"] == "jpeg" else ""
        print(f"OK   {r['path']}")
        print(f"  samples   {r['n']} images {r['shape'][0]}x{r['shape'][1]}x3, {r['storage']} storage{quality}, "
              f"{r['size_bytes'] / 2**20:.1f} MiB")
        print(f"  labels    {r['num_classes']} classes, {min(counts)}..{max(counts)} images per class")
        print(f"  source    {r['source'] or '-'}" + (f" (root {r['source_root']})" if r["source_root"] else ""))
        print(f"  sha256    {r['content_sha256'] or '-'}")
        print(f"  decoded   images {', '.join(map(str, r['decoded']))} OK")
    return 1 if failed else 0
