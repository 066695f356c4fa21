"""Batches for training and evaluation, sharded across ranks.

``build_loader`` is the one entry point. It dispatches on ``cfg.data.loader``: ``ffcv`` / ``auto``
try :mod:`rift_dist.data.ffcv.loader` (same signature); ``torch`` -- and ``auto`` when FFCV is not
usable -- give :class:`TorchLoader`, which works on the in-memory uint8 arrays of
:class:`~rift_dist.data.sources.ArrayDataset`.

TorchLoader semantics (what distributed parity relies on):

* Epoch order: ``perm = default_rng([seed, epoch, 0]).permutation(N)``, the same on every rank and
  for every world size.
* Training (``train=True``): global batch ``B`` must be divisible by ``world_size``; per-rank batch
  ``b = B // world_size``; global batch ``k`` is ``perm[k*B:(k+1)*B]`` and rank ``r`` takes
  ``perm[k*B + r*b : k*B + (r+1)*b]``; the last incomplete global batch is dropped. One rank with
  batch ``2b`` therefore sees exactly the union of what two ranks with batch ``b`` see.
* Augmentation (training only): reflect-pad random crop (pad ``H // 8``: 4 for 32x32, 8 for 64x64)
  and horizontal flip with p = 0.5 (Madry et al.; RiFT §5.1). Crop offsets ``(oy, ox)`` in
  ``[0, 2*pad]`` and flips for all N positions of the epoch's permutation are drawn from
  ``default_rng([seed, epoch, 1])`` -- a function of (seed, epoch, position), not of the rank.
  Cropping reads reflected pixel indices straight from the uint8 array (one vectorised gather per
  batch; identical to padding with mode "reflect" and cropping).
* Evaluation (``train=False``): fixed order, no augmentation, all samples kept; rank ``r`` gets the
  contiguous shard ``np.array_split(arange(N), world_size)[r]`` (possibly empty), so per-rank counts
  add up to the one-process counts.
* Output: ``images`` float32 ``[B, 3, H, W]`` in [0, 1] (no normalisation; the model does it),
  ``channels_last`` memory format when ``cfg.precision.channels_last == "on"``; ``labels`` int64
  ``[B]``; both on ``device`` (uint8 is copied to the device first, non-blocking from pinned memory
  on CUDA, and converted there).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from rift_dist.data.sources import ArrayDataset, DataError
from rift_dist.data.splits import split_dataset

if TYPE_CHECKING:  # pragma: no cover
    from rift_dist.config import RunConfig

__all__ = ["Loader", "TorchLoader", "get_dataset", "build_loader", "build_torch_loader", "crop_padding"]

_log = logging.getLogger(__name__)
_STREAM_ORDER, _STREAM_AUGMENT = 0, 1


@runtime_checkable
class Loader(Protocol):
    """What every loader returned by :func:`build_loader` provides.

    ``__iter__`` yields ``(images, labels)``: float32 ``[B, 3, H, W]`` in [0, 1] and int64 ``[B]``
    on the loader's device. ``__len__`` is the number of batches per epoch on this rank;
    ``num_samples`` the number of samples per epoch on this rank; ``set_epoch`` selects the epoch
    whose order and augmentation the next iteration uses.
    """

    num_samples: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def crop_padding(image_size: int) -> int:
    """Reflect padding of the random crop for square images of ``image_size`` pixels: ``size // 8``
    (4 for CIFAR's 32x32, 8 for Tiny-ImageNet's 64x64, as in the RiFT authors' code)."""
    return max(1, image_size // 8)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Map indices in [-size+1, 2*size-2] into [0, size-1] by reflection without repeating the edge."""
    index = np.abs(index)
    return np.where(index > size - 1, 2 * (size - 1) - index, index)


def gather_batch(
    images: np.ndarray,
    sample_idx: np.ndarray,
    pad: int = 0,
    offsets: np.ndarray | None = None,
    flips: np.ndarray | None = None,
) -> np.ndarray:
    """Gather (and optionally crop/flip) a batch from a uint8 ``[N, H, W, 3]`` array.

    Args:
        images: uint8 ``[N, H, W, 3]``.
        sample_idx: int ``[b]`` rows of ``images``.
        pad: reflect padding of the crop (0 = no augmentation).
        offsets: int ``[b, 2]`` crop offsets ``(oy, ox)`` in ``[0, 2*pad]`` in the padded frame.
        flips: bool ``[b]``, mirror left-right after cropping.

    Returns:
        uint8 ``[b, H, W, 3]``, equal to ``pad(images[i], pad, "reflect")[oy:oy+H, ox:ox+W]`` (then
        ``[:, ::-1]`` when flipped) for every sample.
    """
    sample_idx = np.asarray(sample_idx, dtype=np.int64)
    if not pad:
        return images[sample_idx]
    h, w = images.shape[1:3]
    rows = _reflect(offsets[:, 0:1] - pad + np.arange(h), h)  # [b, H]
    cols_base = np.arange(w)
    cols = np.where(flips[:, None], w - 1 - cols_base, cols_base)
    cols = _reflect(offsets[:, 1:2] - pad + cols, w)  # [b, W]
    if not images.flags.c_contiguous:
        return images[sample_idx[:, None, None], rows[:, :, None], cols[:, None, :]]
    # one flat take over pixels: about 4x faster than 3-axis fancy indexing
    flat = (sample_idx[:, None, None] * (h * w) + rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
    return np.take(images.reshape(-1, images.shape[3]), flat, axis=0).reshape(len(sample_idx), h, w, images.shape[3])


class _BatchGather(torch.utils.data.Dataset):
    """Map-style dataset whose "index" is a whole batch plan; used with DataLoader workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pad: int):
        self.images, self.labels, self.pad = images, labels, pad

    def __len__(self) -> int:  # pragma: no cover - not used by the batch sampler path
        return len(self.labels)

    def __getitem__(self, plan):
        idx, offsets, flips = plan
        batch = gather_batch(self.images, idx, self.pad if offsets is not None else 0, offsets, flips)
        return torch.from_numpy(np.ascontiguousarray(batch)), torch.from_numpy(self.labels[idx].astype(np.int64))


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the current epoch's batch plans of a :class:`TorchLoader` (read in the main process)."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader._plans())

    def __len__(self) -> int:
        return len(self.loader)


class TorchLoader:
    """Batches from an in-memory :class:`ArrayDataset` (see the module docstring for the semantics).

    Args:
        dataset: the images and labels.
        train: training mode (shuffle, augment, drop the last incomplete global batch) or eval mode.
        batch_size: training: the GLOBAL batch size B (split across ranks); eval: the per-rank batch.
        rank, world_size: this process's position among the data-parallel ranks.
        seed: seed of the epoch order and augmentation (``cfg.seed``).
        indices: optional positions into ``dataset`` to iterate over instead of all of it.
        device: where batches are put (None = stay on the CPU).
        channels_last: return images in ``torch.channels_last`` memory format.
        num_workers: DataLoader worker processes for the gather (0 = in this process).

    Attributes:
        num_samples: samples this rank sees per epoch.
        batch_size: per-rank batch size; ``global_batch_size``: B (training) or the per-rank
            batch times world_size (eval).

    Raises:
        DataError: bad rank/world_size, B not divisible by world_size, fewer training samples than
            one global batch, indices out of range.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        train: bool,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        indices=None,
        device=None,
        channels_last: bool = False,
        num_workers: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.train = bool(train)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device) if device is not None else None
        self.channels_last = channels_last
        self.num_workers = max(0, int(num_workers))
        n_total = len(dataset)
        if indices is None:
            self.index = np.arange(n_total, dtype=np.int64)
        else:
            self.index = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.index.size and (self.index.min() < 0 or self.index.max() >= n_total):
                raise DataError(f"loader indices must lie in [0, {n_total}) ({dataset.description})")
        n = len(self.index)
        self.pad = crop_padding(dataset.image_size[0]) if self.train else 0
        self.epoch = 0
        self.start_batch = 0
        if self.train:
            if batch_size % world_size:
                raise DataError(
                    f"global batch size {batch_size} is not divisible by world_size {world_size}; set "
                    f"data.batch_size to a multiple of the number of ranks"
                )
            self.global_batch_size = batch_size
            self.batch_size = batch_size // world_size
            self._num_batches = n // batch_size
            if self._num_batches == 0:
                raise DataError(
                    f"{n} training samples are fewer than one global batch of {batch_size} "
                    f"({dataset.description}); lower data.batch_size or use more data"
                )
            self.num_samples = self._num_batches * self.batch_size
        else:
            self.batch_size = batch_size
            self.global_batch_size = batch_size * world_size
            self._shard = np.array_split(np.arange(n, dtype=np.int64), world_size)[rank]
            self.num_samples = len(self._shard)
            self._num_batches = math.ceil(self.num_samples / batch_size)
        self._worker_loader = None

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use the order and augmentation of ``epoch`` for the next iteration.

        ``start_batch`` skips the first batches of that epoch (exact mid-epoch resumption); it
        applies to the next iteration only.
        """
        self.epoch = int(epoch)
        self.start_batch = max(0, int(start_batch))

    # ------------------------------------------------------------------ plans
    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The epoch's permutation of positions and augmentation draws (for tests and debugging).

        Returns:
            ``(perm, offsets, flips)``: int64 ``[N]`` positions into ``indices``; int64 ``[N, 2]``
            crop offsets and bool ``[N]`` flips for every permutation position (None in eval mode).
        """
        epoch = self.epoch if epoch is None else epoch
        n = len(self.index)
        if not self.train:
            return np.arange(n, dtype=np.int64), None, None
        perm = np.random.default_rng([self.seed, epoch, _STREAM_ORDER]).permutation(n)
        aug = np.random.default_rng([self.seed, epoch, _STREAM_AUGMENT])
        offsets = aug.integers(0, 2 * self.pad + 1, size=(n, 2))
        flips = aug.random(n) < 0.5
        return perm, offsets, flips

    def _plans(self):
        """Per-batch plans ``(sample indices into dataset, offsets or None, flips or None)`` of this rank."""
        start = self.start_batch
        self.start_batch = 0
        if self.train:
            perm, offsets, flips = self.epoch_plan()
            big, b = self.global_batch_size, self.batch_size
            for k in range(start, self._num_batches):
                lo = k * big + self.rank * b
                pos = slice(lo, lo + b)
                yield self.index[perm[pos]], offsets[pos], flips[pos]
        else:
            for k in range(start, self._num_batches):
                pos = self._shard[k * self.batch_size : (k + 1) * self.batch_size]
                yield self.index[pos], None, None

    # ------------------------------------------------------------------ iteration
    def _finish(self, images_u8: torch.Tensor, labels: torch.Tensor):
        dev = self.device
        if dev is not None and dev.type != "cpu":
            cuda = dev.type == "cuda"
            if cuda and not images_u8.is_pinned():
                images_u8, labels = images_u8.pin_memory(), labels.pin_memory()
            images_u8 = images_u8.to(dev, non_blocking=cuda)
            labels = labels.to(dev, non_blocking=cuda)
        images = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.contiguous(memory_format=fmt), labels

    def __iter__(self):
        if self.num_workers == 0:
            images, labels = self.dataset.images, self.dataset.labels
            for idx, offsets, flips in self._plans():
                batch = gather_batch(images, idx, self.pad if offsets is not None else 0, offsets, flips)
                yield self._finish(torch.from_numpy(np.ascontiguousarray(batch)), torch.from_numpy(labels[idx]))
            return
        if self._worker_loader is None:
            self._worker_loader = torch.utils.data.DataLoader(
                _BatchGather(self.dataset.images, self.dataset.labels, self.pad),
                batch_size=None,
                sampler=_PlanSampler(self),
                num_workers=self.num_workers,
                pin_memory=self.device is not None and self.device.type == "cuda",
                persistent_workers=False,
            )
        for images_u8, labels in self._worker_loader:
            yield self._finish(images_u8, labels)


# --------------------------------------------------------------------------- entry points


def get_dataset(cfg: "RunConfig", split: str) -> ArrayDataset:
    """One split of the experiment's data (see :func:`rift_dist.data.splits.make_splits`; built by
    :func:`~rift_dist.data.splits.split_dataset`, which reads only that split's settings).

    Args:
        split: train, val, test, or selection (= ``cfg.selection_split``: val by default, test to
            reproduce the authors' test-set selection).

    Returns:
        :class:`ArrayDataset` (uint8 ``[N, H, W, 3]``, int64 labels), memoised per process.

    Raises:
        DataError: unknown split; selection on an empty validation split (``data.val_size = 0``);
            anything ``make_splits`` raises.
    """
    name = cfg.selection_split if split == "selection" else split
    if name not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; choose train, val, test or selection")
    ds = split_dataset(cfg.data, name)  # only the settings of this split are read (stage keys)
    if name == "val" and len(ds) == 0:
        raise DataError(
            "the validation split is empty because data.val_size is 0; set data.val_size > 0, or "
            "selection_split: test to select on the test set as the authors' code does"
        )
    return ds


def build_torch_loader(
    cfg: "RunConfig",
    split: str,
    rank: int = 0,
    world_size: int = 1,
    *,
    train: bool | None = None,
    dataset: ArrayDataset | None = None,
    indices=None,
    batch_size: int | None = None,
    device=None,
) -> TorchLoader:
    """The in-memory torch loader (same arguments as :func:`build_loader`)."""
    train = (split == "train") if train is None else bool(train)
    dataset = dataset if dataset is not None else get_dataset(cfg, split)
    if batch_size is None:
        batch_size = cfg.data.batch_size if train else cfg.data.eval_batch_size
    return TorchLoader(
        dataset,
        train=train,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        indices=indices,
        device=device,
        channels_last=cfg.precision.channels_last == "on",
        num_workers=cfg.data.num_workers,
    )


def _ffcv_builder():
    """``(usable, reason, build_ffcv_loader or None)`` without ever raising."""
    try:
        from rift_dist.data.ffcv.loader import build_ffcv_loader, ffcv_available
    except ImportError as exc:
        return False, f"rift_dist.data.ffcv.loader cannot be imported ({exc})", None
    try:
        res = ffcv_available()
    except Exception as exc:  # noqa: BLE001 - a broken probe must not break loading
        return False, f"ffcv_available() failed ({type(exc).__name__}: {exc})", None
    if isinstance(res, tuple):
        ok = bool(res[0])
        reason = str(res[1]) if len(res) > 1 else ""
    else:
        ok, reason = bool(res), ""
    return ok, reason or "ffcv_available() returned False", build_ffcv_loader if ok else None


def build_loader(
    cfg: "RunConfig",
    split: str,
    rank: int = 0,
    world_size: int = 1,
    *,
    train: bool | None = None,
    dataset: ArrayDataset | None = None,
    indices=None,
    batch_size: int | None = None,
    device=None,
) -> Loader:
    """A loader over one split for this rank.

    Args:
        cfg: the run config (``data.*``, ``seed``, ``precision.channels_last``, ``selection_split``).
        split: train, val, test or selection (see :func:`get_dataset`).
        rank, world_size: data-parallel position of this process.
        train: training mode (shuffle + crop/flip + drop_last); None means ``split == "train"``.
        dataset: iterate over this dataset instead of the split's (e.g. adversarial examples).
        indices: positions into the dataset to use (e.g. the first ``eval.n_examples``).
        batch_size: training: global batch (default ``data.batch_size``); eval: per-rank batch
            (default ``data.eval_batch_size``).
        device: torch device for the batches (None = CPU).

    Returns:
        A :class:`Loader`: FFCV's when ``data.loader`` is ffcv, or auto and FFCV is usable; else
        :class:`TorchLoader`.

    Raises:
        DataError: ``data.loader`` is ffcv and FFCV is not usable (with the reason); anything the
            chosen loader raises.
    """
    kind = cfg.data.loader
    if kind not in ("auto", "ffcv", "torch"):
        raise DataError(f"data.loader is {kind!r}; choose auto, ffcv or torch")
    args = dict(train=train, dataset=dataset, indices=indices, batch_size=batch_size, device=device)
    if kind != "torch":
        ok, reason, builder = _ffcv_builder()
        if ok:
            try:
                return builder(cfg, split, rank, world_size, **args)
            except ImportError as exc:
                ok, reason = False, f"building the FFCV loader failed ({exc})"
        if kind == "ffcv":
            raise DataError(
                f"data.loader is 'ffcv' but FFCV cannot be used: {reason}; install FFCV (see README) or set "
                f"data.loader: torch (or auto)"
            )
        _log.info("data.loader auto: using the torch loader (%s)", reason)
    return build_torch_loader(cfg, split, rank, world_size, **args)
