"""The FFCV data path: write, verify and read ``.beton`` files.

FFCV (Leclerc et al., CVPR 2023) stores a data set as one ``.beton`` file and decodes
and augments whole batches in JIT-compiled (numba) code on a thread pool, instead of
per-item Python transforms in worker processes.  This module is the project's only
contact with FFCV; everything else sees the same loader interface as the torch path.

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
renamed first, so an existing ``.beton`` is always complete) and guarded by a lock file,
so several ranks starting together write a missing file once.  FFCV's writer forks
worker processes; once numba's thread pool runs in the process (a loader was used),
forking is unsafe, so a writer thread is used instead.

Reading: :class:`FFCVLoader` / :func:`build_ffcv_loader` have the interface and the
semantics of ``rift_dist.data.loaders.TorchLoader`` / ``build_loader``, batch for batch:
the same epoch plan (permutation and crop/flip draws from ``default_rng([seed, epoch,
stream])``, see :func:`epoch_plan`), the same global-batch sharding in training (rank r
takes its slice of every global batch; the last incomplete one is dropped), the same
contiguous shards in evaluation, and bit-identical outputs.  The reflect-pad crop and
flip run inside FFCV's pipeline as a numba operation (``CropFlipConvert`` in
:func:`_ops`) whose per-image parameters an FFCV epoch-iterator subclass writes into a
per-batch buffer from the plan (FFCV's own ``RandomTranslate`` pads with a constant
and draws its own randomness, so it can match neither).  On the CPU the same
operation also converts to float32 (fresh arrays; torch's permuting copy of a 3-channel
batch would cost more than the whole pipeline); for CUDA the uint8 batch is copied
non-blocking from FFCV's pinned buffer and converted on the device.  FFCV compiles
every loader's pipeline (~1 s); :func:`build_ffcv_loader` reuses loaders built with
the same arguments.

Threads: ``import ffcv`` sets torch's intra-op thread count to 1 and every FFCV Loader
sets it to its worker count; this module restores the caller's count after each import,
loader construction and epoch start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import DATASETS, LAYOUTS
from .sources import ArrayDataset, DataError

__all__ = [
    "ffcv_available",
    "write_beton",
    "verify_beton",
    "convert_dataset",
    "build_ffcv_loader",
    "check_ffcv_config",
    "FFCVLoader",
    "content_sha256",
    "epoch_plan",
    "split_indices",
    "beton_dir",
    "storage_tag",
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
_INSTALL_HINT = "run scripts/install_ffcv.sh .venv/bin/python, or set data.loader=torch"

# --------------------------------------------------------------------------- availability

_AVAILABLE: tuple[bool, str] | None = None
_AVAILABLE_LOCK = threading.Lock()


@contextlib.contextmanager
def _keep_threads() -> Iterator[None]:
    """Restore torch's (and numba's, if loaded) thread count of the calling thread on exit."""
    torch_threads = torch.get_num_threads()
    numba_mod = sys.modules.get("numba")
    numba_threads = numba_mod.get_num_threads() if numba_mod is not None else None
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        numba_mod = sys.modules.get("numba")
        if numba_mod is not None:
            want = numba_threads if numba_threads is not None else numba_mod.config.NUMBA_NUM_THREADS
            if numba_mod.get_num_threads() != want:
                numba_mod.set_num_threads(want)


def ffcv_available() -> tuple[bool, str]:
    """Whether FFCV can be used here.

    Imports ``ffcv`` (and its compiled extension) once; the result is cached.  Never
    raises.  Restores torch's thread count, which ``import ffcv`` sets to 1.

    Returns:
        ``(True, "")`` when FFCV imports, else ``(False, reason)`` where ``reason`` names
        the import error and the fix.
    """
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE
    with _AVAILABLE_LOCK:
        if _AVAILABLE is None:
            try:
                with _keep_threads():
                    import ffcv  # noqa: F401
                    import ffcv.libffcv  # noqa: F401
                    from ffcv.loader import Loader  # noqa: F401
                _AVAILABLE = (True, "")
            except BaseException as exc:  # noqa: BLE001 - an ImportError, OSError of a missing .so, ...
                if isinstance(exc, KeyboardInterrupt):
                    raise
                _AVAILABLE = (False, f"ffcv is not importable ({type(exc).__name__}: {exc}); {_INSTALL_HINT}")
    return _AVAILABLE


def _require_ffcv() -> None:
    ok, reason = ffcv_available()
    if not ok:
        raise DataError(reason)


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


def _sidecar(path: Path) -> Path:
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
    _require_ffcv()
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
            with _keep_threads(), _guard_writer(progress, f"writing {path.name}", threads=use_threads):
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
        os.replace(tmp_json, _sidecar(path))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_json):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return path


# --------------------------------------------------------------------------- verifying


def _read_sidecar(path: Path) -> dict:
    side = _sidecar(path)
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
    _require_ffcv()
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
    from .sources import load_split

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
        from .corruptions import load_corruption_set

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


# --------------------------------------------------------------------------- config checks


def _world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def check_ffcv_config(cfg: Any, world_size: int | None = None) -> None:
    """Reject FFCV settings that cannot work, before anything runs.

    Args:
        cfg: a ``RunConfig``.
        world_size: number of processes; None = from env WORLD_SIZE / SLURM_NTASKS (else 1).

    Raises:
        ConfigError: ``data.order=quasi_random`` with more than one process (FFCV's
            QUASI_RANDOM order cannot shard); ``data.loader=ffcv`` while FFCV is not
            importable (the message carries the reason); a bad storage or JPEG quality.
    """
    from ..config import ConfigError

    data = cfg.data
    ws = _world_size_from_env() if world_size is None else int(world_size)
    if data.order == "quasi_random" and ws > 1:
        raise ConfigError(
            f"'data.order' is quasi_random with {ws} processes: FFCV's QUASI_RANDOM order has no "
            f"distributed mode; use data.order=random"
        )
    if data.ffcv_storage not in STORAGES:
        raise ConfigError(f"'data.ffcv_storage' must be one of {', '.join(STORAGES)}, got {data.ffcv_storage!r}")
    if not 1 <= int(data.ffcv_jpeg_quality) <= 100:
        raise ConfigError(f"'data.ffcv_jpeg_quality' must be in 1..100, got {data.ffcv_jpeg_quality}")
    if data.loader == "ffcv":
        ok, reason = ffcv_available()
        if not ok:
            raise ConfigError(f"'data.loader' is ffcv but {reason}")


# --------------------------------------------------------------------------- the epoch plan


STREAM_ORDER, STREAM_AUGMENT = 0, 1
"""Random streams of the epoch plan: ``default_rng([seed, epoch, stream])`` (as ``loaders.TorchLoader``)."""


def crop_padding(image_size: int) -> int:
    """Reflect padding of the training crop for ``image_size`` pixels: ``size // 8`` (4 for 32, 8 for 64)."""
    return max(1, int(image_size) // 8)


def epoch_plan(n: int, seed: int, epoch: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The permutation and augmentation draws of one training epoch over ``n`` samples.

    Identical to ``loaders.TorchLoader.epoch_plan``: ``perm = default_rng([seed, epoch, 0])
    .permutation(n)``; from ``default_rng([seed, epoch, 1])``: crop offsets
    ``integers(0, 2 * pad + 1, (n, 2))`` (oy, ox in the padded frame) then flips
    ``random(n) < 0.5``.  Offsets and flips belong to permutation POSITIONS, so they do
    not depend on the rank or the world size.

    Returns:
        ``(perm int64 [n], offsets int64 [n, 2], flips bool [n])``.
    """
    perm = np.random.default_rng([seed, epoch, STREAM_ORDER]).permutation(n)
    aug = np.random.default_rng([seed, epoch, STREAM_AUGMENT])
    offsets = aug.integers(0, 2 * pad + 1, size=(n, 2))
    flips = aug.random(n) < 0.5
    return perm, offsets, flips


# --------------------------------------------------------------------------- numba kernels

# Plain Python here; compiled with numba (a serial and a parallel variant, the latter
# cached on disk) the first time an FFCV loader needs them, so that every loader of a
# process shares one compilation.  ``_prange`` becomes ``numba.prange`` then.
_prange = range
_KERNELS: dict[str, Any] = {}


def _crop_flip_u8(images, params, pad, augment, dst):  # pragma: no cover - runs compiled
    """uint8 [n,H,W,C] -> dst uint8 [>=n,H,W,C]: reflect-pad crop at params[i,:2] - pad, flip if params[i,2]."""
    n, h, w, c = images.shape
    for i in _prange(n):
        oy, ox, flip = 0, 0, False
        if augment:
            oy, ox, flip = params[i, 0] - pad, params[i, 1] - pad, params[i, 2] != 0
        for y in range(h):
            sy = y + oy
            sy = -sy if sy < 0 else (2 * (h - 1) - sy if sy >= h else sy)
            for x in range(w):
                sx = (w - 1 - x if flip else x) + ox
                sx = -sx if sx < 0 else (2 * (w - 1) - sx if sx >= w else sx)
                for ch in range(c):
                    dst[i, y, x, ch] = images[i, sy, sx, ch]
    return dst[:n]


def _crop_flip_f32(images, params, pad, augment, nchw, lut):  # pragma: no cover - runs compiled
    """As :func:`_crop_flip_u8`, into a new float32 array (lut[v] = v / 255), [n,C,H,W] or [n,H,W,C]."""
    n, h, w, c = images.shape
    if nchw:
        out = np.empty((n, c, h, w), dtype=np.float32)
    else:
        out = np.empty((n, h, w, c), dtype=np.float32)
    for i in _prange(n):
        oy, ox, flip = 0, 0, False
        if augment:
            oy, ox, flip = params[i, 0] - pad, params[i, 1] - pad, params[i, 2] != 0
        for y in range(h):
            sy = y + oy
            sy = -sy if sy < 0 else (2 * (h - 1) - sy if sy >= h else sy)
            for x in range(w):
                sx = (w - 1 - x if flip else x) + ox
                sx = -sx if sx < 0 else (2 * (w - 1) - sx if sx >= w else sx)
                if nchw:
                    for ch in range(c):
                        out[i, ch, y, x] = lut[images[i, sy, sx, ch]]
                else:
                    for ch in range(c):
                        out[i, y, x, ch] = lut[images[i, sy, sx, ch]]
    return out


def _kernels() -> dict[str, Any]:
    """The compiled kernels: ``u8``/``f32`` (serial) and ``u8_par``/``f32_par`` (numba parallel)."""
    global _prange
    if not _KERNELS:
        import numba

        _prange = numba.prange
        for name, fn in (("u8", _crop_flip_u8), ("f32", _crop_flip_f32)):
            # Only one variant per function may use numba's disk cache (its index does not
            # tell parallel from serial builds); the parallel one is the slow one to compile.
            _KERNELS[name] = numba.njit(nogil=True)(fn)
            _KERNELS[name + "_par"] = numba.njit(nogil=True, cache=True, parallel=True)(fn)
    return _KERNELS


# --------------------------------------------------------------------------- FFCV classes


_OPS: dict[str, Any] = {}


def _ops() -> dict[str, Any]:
    """Define (once) the FFCV subclasses of this module; needs ffcv importable."""
    if _OPS:
        return _OPS
    from dataclasses import replace

    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom

    class CropFlipConvert(Operation):
        """Reflect-pad crop + horizontal flip by the epoch plan, and/or conversion to float, in one numba pass.

        Input: a batch of uint8 [B, H, W, C] images.  Per image it reads int32
        ``(oy, ox, flip)`` from a buffer that :class:`PlannedEpochIterator` fills before
        each batch from the epoch plan; output pixel (y, x) is input pixel
        (reflect(y + oy - p), reflect(x' + ox - p)) with x' = W-1-x when flipped and a
        reflection that does not repeat the edge (numpy/torch ``reflect``, p < H, W) -- the
        result of ``loaders.gather_batch``.  ``augment=False`` copies the image as is.

        Output, ``to_float=False``: uint8 [B, H, W, C] in FFCV's (pinned) buffer, for
        the GPU path, which converts on the device.  ``to_float=True``: a NEW float32
        array per batch, value/255 by table lookup (bit-identical to torch's
        ``float().div(255)``), laid out [B, C, H, W], or [B, H, W, C] for
        ``channels_last`` (the loader returns its NCHW-permuted view).  Converting
        here, in parallel, is ~10x faster than torch's permuting copy of a C=3 batch.
        """

        def __init__(self, padding: int, augment: bool, to_float: bool, channels_last: bool = False):
            super().__init__()
            self.padding = int(padding) if augment else 0
            self.augment = bool(augment)
            self.to_float = bool(to_float)
            self.channels_last = bool(channels_last)

        def generate_code(self):
            kernels = _kernels()
            par = "_par" if Compiler.num_threads > 1 else ""
            pad, augment = self.padding, self.augment
            nchw = not self.channels_last
            lut = np.arange(256, dtype=np.float32) / np.float32(255.0)
            if self.to_float:
                kernel = kernels["f32" + par]

                def crop_flip_float(images, params):
                    return kernel(images, params, pad, augment, nchw, lut)

                return crop_flip_float
            kernel = kernels["u8" + par]

            def crop_flip(images, memory):
                return kernel(images, memory[1], pad, augment, memory[0])

            return crop_flip

        def declare_state_and_memory(self, previous_state):
            h, w, c = previous_state.shape
            if not 0 <= self.padding < min(h, w):
                raise ValueError(f"reflect padding {self.padding} must be below the image size {h}x{w}")
            params = AllocationQuery((3,), np.dtype("<i4"))
            if not self.to_float:
                return replace(previous_state, jit_mode=True), (
                    AllocationQuery(previous_state.shape, previous_state.dtype), params)
            shape = (h, w, c) if self.channels_last else (c, h, w)
            return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<f4")), params

    class PlannedOrder(TraversalOrder):
        """The traversal order of one :class:`FFCVLoader`: it asks the loader for the epoch's plan.

        FFCV's Loader calls an instance with itself (``order(loader)``) and then
        ``sample_order(epoch)`` at every epoch start; the plan's augmentation parameters
        are kept in ``current_params`` for the epoch iterator.
        """

        def __init__(self, owner: "FFCVLoader"):
            self.owner = owner
            self.loader = None
            self.indices = None
            self.seed = owner.seed
            self.distributed = False
            self.sampler = None
            self.quasi = None
            self.current_params = None

        def __call__(self, loader):
            self.loader = loader
            self.indices = np.asarray(loader.indices)
            if self.owner.quasi_random:
                self.quasi = QuasiRandom(loader)
                # FFCV shuffles this table in place on every call: keep the pristine one so that
                # the order is a function of (seed, epoch) only.
                self._pages = self.quasi.page_to_samples_array.copy()
            return self

        def quasi_order(self, epoch: int) -> np.ndarray:
            """FFCV's QUASI_RANDOM order of ``epoch`` (int64 file indices), reproducible."""
            self.quasi.page_to_samples_array[...] = self._pages
            return np.asarray(self.quasi.sample_order(epoch), dtype=np.int64)

        def sample_order(self, epoch: int):
            order, params = self.owner._iteration_plan(int(epoch))
            self.current_params = params
            return order

    class PlannedEpochIterator(EpochIterator):
        """FFCV's epoch thread, writing each batch's crop/flip parameters before running the pipeline."""

        def __init__(self, loader, order, params, params_node):
            self._plan_params = params
            self._params_node = params_node
            super().__init__(loader, order)

        def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
            if self._plan_params is not None:
                buf = self.memory_allocations["operation"][self._params_node]
                buf = buf[1] if isinstance(buf, tuple) else buf
                n = len(batch_indices)
                start = b_ix * self.loader.batch_size
                buf[batch_slot][:n] = self._plan_params[start : start + n]
            return super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)

    class PlannedLoader(Loader):
        """FFCV's Loader with :class:`PlannedEpochIterator` (its ``__iter__``, otherwise unchanged)."""

        params_node = None

        def __iter__(self):
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected = order[: len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            params = self.traversal_order.current_params if self.params_node is not None else None
            return PlannedEpochIterator(self, selected, params, self.params_node)

    _OPS.update(CropFlipConvert=CropFlipConvert, PlannedOrder=PlannedOrder, PlannedLoader=PlannedLoader)
    return _OPS


# --------------------------------------------------------------------------- the loader


class FFCVLoader:
    """Batches from a ``.beton`` file with the semantics of ``loaders.TorchLoader``.

    Order and sharding (``n`` = number of ``indices``):

    * training: global batch ``B`` (``batch_size``) divisible by ``world_size``; per-rank
      batch ``b = B // world_size``; epoch plan :func:`epoch_plan` (seed, epoch); global
      batch k is ``perm[k*B:(k+1)*B]``, rank r reads ``perm[k*B + r*b : k*B + (r+1)*b]``;
      the last incomplete global batch is dropped.  Augmentation: reflect-pad crop
      (pad ``crop_padding(H)``) and flip with the plan's parameters, applied in the FFCV
      pipeline by a numba operation.  With ``quasi_random`` (one rank only) FFCV's
      QUASI_RANDOM order replaces the permutation; the plan's augmentation stays.
    * evaluation: no augmentation, the order of ``indices``, rank r reads the contiguous
      shard ``np.array_split(arange(n), world_size)[r]``, all samples, last batch partial.

    Iterating yields ``(images, labels)``: images float32 [b, 3, H, W] in [0, 1]
    (``channels_last`` memory format when asked), labels int64 [b], on ``device``
    (uint8 is copied first -- ``non_blocking`` on CUDA -- and converted there).  Each
    yielded tensor is freshly allocated, so keeping a batch is safe.  The file is checked
    with :func:`verify_beton` when the loader is built.

    Args:
        path: the .beton file.
        batch_size: training: the GLOBAL batch B; evaluation: the per-rank batch.
        train: training (shuffle, augment, drop last) or evaluation mode.
        seed: seed of the epoch plan (``cfg.seed``).
        rank, world_size: this process's place among the data-parallel ranks.
        indices: sample indices into the file (int [n]); None = all.
        num_workers: FFCV threads (capped at numba's NUMBA_NUM_THREADS).
        os_cache: read through the OS page cache (True) or FFCV's process cache.
        quasi_random: FFCV's QUASI_RANDOM training order (world_size 1 only).
        device: where batches go (None = CPU).
        channels_last: deliver images in ``torch.channels_last`` memory format.
        padding: reflect padding of the crop (None = ``crop_padding(H)``).
        expected_len, num_classes: passed to :func:`verify_beton`.
        batches_ahead: batches FFCV prepares ahead of the consumer.
        convert_in_pipeline: convert to float32 in FFCV's numba pipeline (fresh arrays) and
            not on ``device``; None = True on the CPU, False on CUDA (uint8 travels, 4x less).

    Attributes:
        batch_size (per rank), global_batch_size, num_samples (per rank and epoch), epoch,
        start_batch, path, report (the :func:`verify_beton` report).

    Raises:
        DataError: the file fails verification; bad rank; B not divisible by world_size;
            fewer training samples than one global batch; an index out of range.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        indices: Sequence[int] | np.ndarray | None = None,
        num_workers: int = 1,
        os_cache: bool = True,
        quasi_random: bool = False,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        padding: int | None = None,
        expected_len: int | None = None,
        num_classes: int | None = None,
        batches_ahead: int = 3,
        convert_in_pipeline: bool | None = None,
    ):
        _require_ffcv()
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.transforms import ToTensor

        ops = _ops()
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if quasi_random and world_size > 1:
            raise DataError("FFCV's QUASI_RANDOM order cannot be sharded over ranks; use data.order=random")
        self.path = Path(path).expanduser()
        self.report = verify_beton(self.path, expected_len=expected_len, num_classes=num_classes)
        total = self.report["n"]
        if indices is None:
            self.index = np.arange(total, dtype=np.int64)
        else:
            self.index = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.index.size and (self.index.min() < 0 or self.index.max() >= total):
                raise DataError(f"{self.path}: loader indices must lie in [0, {total})")
        n = len(self.index)
        self.train = bool(train)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.quasi_random = bool(quasi_random) and self.train
        self.device = torch.device(device) if device is not None else None
        self.channels_last = bool(channels_last)
        self.epoch, self.start_batch = 0, 0
        height = self.report["shape"][0]
        self.pad = (crop_padding(height) if padding is None else int(padding)) if self.train else 0
        if self.train:
            if batch_size % world_size:
                raise DataError(
                    f"global batch size {batch_size} is not divisible by world_size {world_size}; set "
                    f"data.batch_size to a multiple of the number of ranks"
                )
            self.global_batch_size = int(batch_size)
            self.batch_size = int(batch_size) // world_size
            self._num_batches = n // self.global_batch_size
            if self._num_batches == 0:
                raise DataError(
                    f"{n} training samples are fewer than one global batch of {batch_size} ({self.path}); "
                    f"lower data.batch_size or use more data"
                )
            self.num_samples = self._num_batches * self.batch_size
            self._shard = None
        else:
            self.batch_size = int(batch_size)
            self.global_batch_size = self.batch_size * world_size
            self._shard = np.array_split(np.arange(n, dtype=np.int64), world_size)[rank]
            self.num_samples = len(self._shard)
            self._num_batches = math.ceil(self.num_samples / self.batch_size)

        workers = max(1, min(int(num_workers), numba.config.NUMBA_NUM_THREADS))
        # CPU: crop/flip and float conversion in FFCV's threads (fresh float32 batches).
        # GPU: crop/flip only; the uint8 batch travels from FFCV's pinned buffer and is
        # converted on the device.
        on_cpu = self.device is None or self.device.type == "cpu"
        self._float_in_pipeline = on_cpu if convert_in_pipeline is None else bool(convert_in_pipeline)
        image_pipe: list = [SimpleRGBImageDecoder()]
        crop = None
        if self.train or self._float_in_pipeline:
            crop = ops["CropFlipConvert"](self.pad, self.train, self._float_in_pipeline, self.channels_last)
            image_pipe.append(crop)
        image_pipe.append(ToTensor())
        pipelines = {"image": image_pipe, "label": [IntDecoder(), ToTensor()]}
        self._order = ops["PlannedOrder"](self)
        with _keep_threads():
            self._loader = ops["PlannedLoader"](
                str(self.path),
                batch_size=self.batch_size,
                num_workers=workers,
                os_cache=bool(os_cache),
                order=self._order,
                distributed=False,
                seed=self.seed,
                indices=self.index if len(self.index) else np.zeros(1, dtype=np.int64),
                pipelines=pipelines,
                drop_last=False,
                batches_ahead=batches_ahead,
            )
        if self.train:
            self._loader.params_node = self._loader.graph.operation_to_node[crop][0].id

    # ------------------------------------------------------------------ plan
    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use the order and augmentation of ``epoch`` for the next iteration.

        ``start_batch`` skips the first batches of that epoch (mid-epoch resumption); it
        applies to the next iteration only.
        """
        self.epoch = int(epoch)
        self.start_batch = max(0, int(start_batch))

    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(perm, offsets, flips)`` of ``epoch`` over positions into ``indices`` (as TorchLoader.epoch_plan).

        Evaluation: ``(arange(n), None, None)``.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.index)
        if not self.train:
            return np.arange(n, dtype=np.int64), None, None
        return epoch_plan(n, self.seed, epoch, self.pad)

    def _rank_positions(self) -> np.ndarray:
        """Permutation positions this rank reads in one training epoch, in order (int64 [num_samples])."""
        big, b = self.global_batch_size, self.batch_size
        starts = np.arange(self._num_batches, dtype=np.int64) * big + self.rank * b
        return (starts[:, None] + np.arange(b, dtype=np.int64)).reshape(-1)

    def _iteration_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """File indices of the next iteration and their int32 [m, 3] (oy, ox, flip) parameters."""
        skip = self.start_batch * self.batch_size
        if not self.train:
            return self.index[self._shard][skip:], None
        perm, offsets, flips = self.epoch_plan(epoch)
        positions = self._rank_positions()[skip:]
        params = np.empty((len(positions), 3), dtype=np.int32)
        params[:, :2] = offsets[positions]
        params[:, 2] = flips[positions]
        if self.quasi_random:
            qorder = self._order.quasi_order(epoch)
            return qorder[: self._num_batches * self.batch_size][skip:], params
        return self.index[perm[positions]], params

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """File indices this rank reads in ``epoch`` (from batch 0), in order (int64 [num_samples])."""
        saved = self.start_batch
        self.start_batch = 0
        try:
            return np.asarray(self._iteration_plan(self.epoch if epoch is None else int(epoch))[0], dtype=np.int64)
        finally:
            self.start_batch = saved

    # ------------------------------------------------------------------ iteration
    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels.view(-1)
        if self._float_in_pipeline:  # images: a fresh float32 batch, NCHW or NHWC (channels_last)
            return (images.permute(0, 3, 1, 2) if self.channels_last else images), y.clone()
        dev = self.device or torch.device("cpu")  # images: uint8 [b, H, W, 3] in FFCV's (pinned) buffer
        cuda = dev.type == "cuda"
        x = images.to(dev, non_blocking=cuda).permute(0, 3, 1, 2)  # contiguous NHWC copy, then a view
        y = y.to(dev, non_blocking=cuda) if dev.type != "cpu" else y.clone()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(x.shape, dtype=torch.float32, device=dev, memory_format=fmt)
        out.copy_(x).div_(255.0)
        return out, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.num_samples == 0:
            self.start_batch = 0
            return
        with _keep_threads():
            self._loader.next_epoch = self.epoch
            it = iter(self._loader)
        self.start_batch = 0
        finished = False
        try:
            for images, labels in it:
                yield self._finish(images, labels)
            finished = True
        finally:
            if finished:
                it.closed = True  # FFCV closed it at the end; keep its __del__ from closing twice
            else:
                _stop_epoch(it)

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"FFCVLoader({self.path}, {mode}, batch {self.batch_size}/rank, {self.num_samples} samples, "
                f"rank {self.rank}/{self.world_size})")


def _stop_epoch(it: Any) -> None:
    """Stop an FFCV epoch thread that the consumer left early, and wait for it to end."""
    import queue

    it.terminate_event.set()
    while it.is_alive():
        with contextlib.suppress(queue.Empty):
            it.output_queue.get(timeout=0.05)
        it.join(timeout=0.05)
    it.close()
    it.closed = True


# --------------------------------------------------------------------------- building from a config


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<path>.lock`` (serialises writers of one host)."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cache_dir(cfg: Any) -> Path:
    data = cfg.data
    return beton_dir(Path(data.cache_dir or "~/.cache/rift_dist").expanduser() / "ffcv", data.dataset,
                     data.ffcv_storage, data.ffcv_jpeg_quality)


def _sidecar_sha(path: Path) -> str:
    try:
        return str(json.loads(_sidecar(path).read_text()).get("content_sha256", ""))
    except (OSError, ValueError):
        return ""


def _ensure_file(cfg: Any, path: Path, want_sha: str, make_ds, rank: int, source_root: str = "") -> Path:
    """``path`` holding the data set whose content sha256 is ``want_sha``; (re)written when missing or stale."""
    if path.exists() and _sidecar_sha(path) == want_sha:
        return path
    with _file_lock(path):
        if not (path.exists() and _sidecar_sha(path) == want_sha):
            ds = make_ds()
            what = "stale, rewriting" if path.exists() else "writing"
            print(f"[ffcv] rank {rank}: {what} {path} ({len(ds)} images: {ds.description})", file=sys.stderr)
            data = cfg.data
            write_beton(ds, path, data.ffcv_storage, data.ffcv_jpeg_quality, overwrite=True, progress=rank == 0,
                        num_workers=max(1, data.num_workers), source_root=source_root, digest=want_sha)
    return path


def _find_by_sha(directory: Path, digest: str) -> Path | None:
    if not directory.is_dir():
        return None
    for side in sorted(directory.rglob("*.beton.json")):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(side.read_text()).get("content_sha256") == digest:
                beton = side.with_name(side.name[: -len(".json")])
                if beton.is_file():
                    return beton
    return None


def split_indices(data: Any, name: str, train_labels: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """Positions of split ``name`` in the full train (train, val) or test (test) split.

    Reproduces the selection of ``splits.make_splits`` (class-balanced, seeded by
    ``default_rng([split_seed, stream])``, stream 0 val, 1 train_subset, 2 test_subset);
    :func:`build_ffcv_loader` checks the result against ``make_splits``' recorded sha256.

    Returns:
        int64 sorted positions.

    Raises:
        DataError: sizes that ``make_splits`` also rejects.
    """
    from .splits import balanced_indices

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([data.split_seed, stream])

    if name == "test":
        if data.test_subset:
            return balanced_indices(test_labels, data.test_subset, rng(2), what="data.test_subset")
        return np.arange(len(test_labels), dtype=np.int64)
    val_idx = balanced_indices(train_labels, data.val_size, rng(0), what="data.val_size")
    if name == "val":
        return val_idx
    rest = np.setdiff1d(np.arange(len(train_labels), dtype=np.int64), val_idx, assume_unique=True)
    if data.train_subset:
        return rest[balanced_indices(train_labels[rest], data.train_subset, rng(1), what="data.train_subset")]
    return rest


def _split_file(cfg: Any, name: str, rank: int) -> tuple[Path, np.ndarray]:
    """The full-split .beton holding split ``name`` and the split's positions in it."""
    from .sources import load_split
    from .splits import indices_sha256, make_splits

    data = cfg.data
    record = make_splits(data).record  # memoised per process; the torch path loads the same
    root = record["root"]
    full_name = "test" if name == "test" else "train"

    def full(which: str) -> ArrayDataset:
        return load_split(data.dataset, root, which, data.layout, cache_dir=data.cache_dir or None)

    path = _ensure_file(cfg, _cache_dir(cfg) / f"{full_name}.beton", record[f"full_{full_name}_sha256"],
                        lambda: full(full_name), rank, source_root=root)
    idx = split_indices(data, name, full("train").labels, full("test").labels)
    if indices_sha256(idx) != record[f"{name}_indices_sha256"]:
        raise DataError(
            f"the FFCV loader's {name} indices differ from rift_dist.data.splits.make_splits' (sha256 mismatch): "
            f"split_indices() in ffcv_loader.py is out of date; set data.loader: torch until it is fixed"
        )
    return path, idx


def _dataset_file(cfg: Any, ds: ArrayDataset, rank: int) -> Path:
    """The .beton holding exactly ``ds``: any file in the cache with its content sha256, else sets/<sha>.beton."""
    digest = content_sha256(ds)
    directory = _cache_dir(cfg)
    found = _find_by_sha(directory, digest)
    if found is not None:
        return found
    return _ensure_file(cfg, directory / "sets" / f"{digest[:32]}.beton", digest, lambda: ds, rank)


_LOADERS: "dict[tuple, FFCVLoader]" = {}
_LOADERS_MAX = 16


def _cached_loader(key: tuple, make) -> FFCVLoader:
    """Reuse a loader built with the same arguments (FFCV compiles its pipeline per Loader, ~1-2 s)."""
    loader = _LOADERS.pop(key, None)
    if loader is None:
        loader = make()
    loader.set_epoch(0)
    _LOADERS[key] = loader
    while len(_LOADERS) > _LOADERS_MAX:
        _LOADERS.pop(next(iter(_LOADERS)))
    return loader


def build_ffcv_loader(
    cfg: Any,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    *,
    train: bool | None = None,
    dataset: ArrayDataset | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> FFCVLoader:
    """The FFCV loader of one split for this rank; same arguments and semantics as ``loaders.build_loader``.

    Files: the train, val and selection splits read ``<cache_dir>/ffcv/<dataset>-<tag>/train.beton``
    through the split's positions (``indices=`` of FFCV), test reads ``test.beton``; either
    is written on first use from the loaded source and rewritten when its content sha256
    differs from the source's (``make_splits`` record).  With ``dataset`` given, the file
    holding exactly that ArrayDataset (any cached file with its content sha256, else
    ``sets/<sha>.beton``, written now).  Every file is verified before use.  Loaders built
    twice with the same arguments are reused (no second numba compilation).

    Args:
        cfg: ``RunConfig``: data.* (dataset, cache_dir, ffcv_storage, ffcv_jpeg_quality,
            batch_size, eval_batch_size, num_workers, os_cache, order, split sizes),
            seed, selection_split, precision.channels_last.
        split: train, val, test or selection (ignored when ``dataset`` is given).
        rank, world_size: data-parallel position of this process.
        train: training mode (shuffle + crop/flip + drop last); None = ``split == "train"``.
        dataset: iterate over this ArrayDataset instead of the split.
        indices: positions into the split (or ``dataset``) to use.
        batch_size: training: global batch (default data.batch_size); eval: per-rank batch
            (default data.eval_batch_size).
        device: where batches go (None = CPU).

    Returns:
        :class:`FFCVLoader`.

    Raises:
        DataError: FFCV missing; unknown split; data missing; a file that fails verification;
            bad indices or batch size.
        ConfigError: data.order quasi_random with world_size > 1.
    """
    from ..config import ConfigError

    _require_ffcv()
    data = cfg.data
    if data.order == "quasi_random" and world_size > 1:
        raise ConfigError(
            f"'data.order' is quasi_random with {world_size} processes: FFCV's QUASI_RANDOM order has no "
            f"distributed mode; use data.order=random"
        )
    train = (split == "train") if train is None else bool(train)
    if dataset is not None:
        path = _dataset_file(cfg, dataset, rank)
        base = np.arange(len(dataset), dtype=np.int64)
        num_classes = len(dataset.classes) or None
    else:
        name = cfg.selection_split if split == "selection" else split
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {split!r}; choose train, val, test or selection")
        path, base = _split_file(cfg, name, rank)
        if name == "val" and len(base) == 0:
            raise DataError(
                "the validation split is empty because data.val_size is 0; set data.val_size > 0, or "
                "selection_split: test to select on the test set as the authors' code does"
            )
        num_classes = DATASETS[data.dataset].num_classes if data.dataset in DATASETS else None
    if indices is not None:
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= len(base)):
            raise DataError(f"loader indices must lie in [0, {len(base)}) (split {split!r}, {path})")
        base = base[pos]
    if batch_size is None:
        batch_size = data.batch_size if train else data.eval_batch_size
    dev = torch.device(device) if device is not None else None
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, train, int(batch_size), rank, world_size, int(cfg.seed),
           hashlib.sha1(base.tobytes()).hexdigest(), data.num_workers, data.os_cache, data.order, str(dev),
           cfg.precision.channels_last)
    return _cached_loader(key, lambda: FFCVLoader(
        path,
        batch_size=int(batch_size),
        train=train,
        seed=int(cfg.seed),
        rank=rank,
        world_size=world_size,
        indices=base,
        num_workers=max(1, data.num_workers),
        os_cache=data.os_cache,
        quasi_random=train and data.order == "quasi_random",
        device=dev,
        channels_last=cfg.precision.channels_last == "on",
        num_classes=num_classes,
    ))


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
