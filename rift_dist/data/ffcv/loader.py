"""The FFCV loader: :class:`FFCVLoader` / :func:`build_ffcv_loader`, with the torch loader's semantics.

:class:`FFCVLoader` / :func:`build_ffcv_loader` have the interface and the semantics of
``rift_dist.data.loaders.TorchLoader`` / ``build_loader``, batch for batch: the same epoch
plan (permutation and crop/flip draws from ``default_rng([seed, epoch, stream])``, see
:func:`epoch_plan`), the same global-batch sharding in training (rank r takes its slice of
every global batch; the last incomplete one is dropped), the same contiguous shards in
evaluation, and bit-identical outputs.  The reflect-pad crop and flip run inside FFCV's
pipeline as the numba operation of :mod:`rift_dist.data.ffcv.ops`; its per-image parameters
are written into a per-batch buffer from the plan by a subclass of FFCV's ``EpochIterator``
(``PlannedEpochIterator``, returned by ``PlannedLoader.__iter__``; the order itself comes
from ``PlannedOrder``, a ``TraversalOrder`` that asks the loader).  On the CPU the same
operation also converts to float32 (fresh arrays); for CUDA the uint8 batch is copied
non-blocking from FFCV's pinned buffer and converted on the device.  FFCV compiles every
loader's pipeline (~1 s); :func:`build_ffcv_loader` reuses loaders built with the same
arguments.  Files are those of :mod:`rift_dist.data.ffcv.write`, written on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rift_dist.data.datasets import DATASETS
from rift_dist.data.ffcv import ffcv_available, keep_threads, require_ffcv
from rift_dist.data.ffcv.ops import crop_flip_convert
from rift_dist.data.ffcv.write import STORAGES, beton_dir, content_sha256, sidecar_path, verify_beton, write_beton
from rift_dist.data.sources import ArrayDataset, DataError

__all__ = [
    "build_ffcv_loader",
    "check_ffcv_config",
    "FFCVLoader",
    "epoch_plan",
    "split_indices",
]

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
    from rift_dist.config import ConfigError

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


# --------------------------------------------------------------------------- FFCV subclasses


_CLASSES: dict[str, Any] = {}


def _planned_classes() -> dict[str, Any]:
    """Define (once) ``PlannedOrder`` and ``PlannedLoader`` (with its ``PlannedEpochIterator``); needs ffcv."""
    if _CLASSES:
        return _CLASSES
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.traversal_order.quasi_random import QuasiRandom

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

    _CLASSES.update(PlannedOrder=PlannedOrder, PlannedLoader=PlannedLoader)
    return _CLASSES


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
        require_ffcv()
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.transforms import ToTensor

        planned = _planned_classes()
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
            crop = crop_flip_convert()(self.pad, self.train, self._float_in_pipeline, self.channels_last)
            image_pipe.append(crop)
        image_pipe.append(ToTensor())
        pipelines = {"image": image_pipe, "label": [IntDecoder(), ToTensor()]}
        self._order = planned["PlannedOrder"](self)
        with keep_threads():
            self._loader = planned["PlannedLoader"](
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
        with keep_threads():
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
        return str(json.loads(sidecar_path(path).read_text()).get("content_sha256", ""))
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
    from rift_dist.data.splits import balanced_indices

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
    from rift_dist.data.sources import load_split
    from rift_dist.data.splits import indices_sha256, split_record

    data = cfg.data
    record = split_record(data, name)  # this split's alone (memoised per process; the torch path loads the same)
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
            f"split_indices() in rift_dist/data/ffcv/loader.py is out of date; set data.loader: torch until it is fixed"
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
    from rift_dist.config import ConfigError

    require_ffcv()
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
