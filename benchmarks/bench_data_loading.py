"""Data path throughput: FFCV (.beton + numba pipeline) versus torch DataLoader with per-item transforms.

Measures images per second of one full training epoch of the data path only -- read/decode,
reflect-padded random crop, horizontal flip, collate into float32 [B, 3, H, W] in [0, 1] and
int64 labels -- with no model.  Both loaders use the same number of workers (FFCV: threads;
torch: worker processes), the same batch size and the same real images, and each gets one
warm-up epoch first (numba compiles FFCV's pipeline on its first epoch; torch starts its
workers), then ``--epochs`` timed epochs.

Data sets (from ``--data-dir``, env RIFT_SHARED_DATA, or ``../shared/data`` beside the project):

* CIFAR-10 train split, 50,000 images 32x32 (``cifar10-jpeg.tar.gz``); FFCV raw storage; torch
  reads the same decoded uint8 arrays from memory (``Image.fromarray`` per item) -- the project's
  torch path.
* Tiny-ImageNet train split of the sub-sampled archive, 20,000 images 64x64
  (``tiny-imagenet-200-sub100.tar.gz``); FFCV JPEG storage, quality 90 (decoded every epoch
  by libjpeg-turbo), and raw storage for comparison; torch reads decoded arrays from memory
  and, as a second baseline, decodes the JPEG files with PIL per item (``ImageFolder``-style).

Torch transforms: ``RandomCrop(S, padding=S // 8, padding_mode="reflect")``,
``RandomHorizontalFlip()``, ``ToTensor()`` (padding 4 for 32x32, 8 for 64x64).

Usage:  .venv/bin/python benchmarks/bench_data_loading.py [--workers 2] [--batch-size 256]
        [--epochs 1] [--datasets cifar10 tiny-imagenet] [--data-dir D] [--work-dir W]
Prints one line per loader and the FFCV / torch ratio (goal: >= 5x).  Exit status 0 unless
something fails to run (the ratio itself is reported, not enforced); exit 0 with a note when
FFCV or the data are not available.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHIVES = {"cifar10": "cifar10-jpeg.tar.gz", "tiny-imagenet": "tiny-imagenet-200-sub100.tar.gz"}
STORAGE = {"cifar10": "raw", "tiny-imagenet": "jpeg"}
EXTRA_STORAGE = {"tiny-imagenet": "raw"}  # also measured, for the storage choice


def find_data_dir(arg: str) -> Path:
    """The shared data directory: --data-dir, env RIFT_SHARED_DATA, or ../shared/data beside the project."""
    for cand in (arg, os.environ.get("RIFT_SHARED_DATA", ""), str(ROOT.parent / "shared" / "data")):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise SystemExit(f"no data directory: pass --data-dir or set RIFT_SHARED_DATA (tried {ROOT.parent / 'shared' / 'data'})")


class ArrayImages(torch.utils.data.Dataset):
    """Per-item torch dataset over in-memory uint8 [N, H, W, 3] images: PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class JpegFiles(torch.utils.data.Dataset):
    """Per-item torch dataset over JPEG files: PIL decode (RGB) -> transform."""

    def __init__(self, files: list[str], labels: np.ndarray, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), int(self.labels[i])


def time_epochs(loader, epochs: int, set_epoch: bool) -> tuple[float, int, float]:
    """(images/s over the timed epochs, images seen, warm-up seconds); one warm-up epoch first."""
    t0 = time.perf_counter()
    for _ in loader:
        pass
    warm = time.perf_counter() - t0
    seen = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        if set_epoch:
            loader.set_epoch(e + 1)
        for images, labels in loader:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            seen += labels.numel()
    return seen / (time.perf_counter() - t0), seen, warm


def torch_loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=False)


def transforms_for(size: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=size // 8, padding_mode="reflect"), T.RandomHorizontalFlip(), T.ToTensor()])


def prepare(name: str, data_dir: Path, work: Path, args):
    """Unpack and decode the train split (cached under ``work``); returns (ArrayDataset, data root) or None."""
    from rift_dist.data.archive import data_dir_in, unpack_archive
    from rift_dist.data.sources import load_split

    archive = data_dir / ARCHIVES[name]
    if not archive.is_file():
        print(f"[{name}] skipped: {archive} not found")
        return None
    t0 = time.perf_counter()
    root = data_dir_in(unpack_archive(archive, work / "unpacked"))
    ds = load_split(name, root, "train", cache_dir=work)
    print(f"[{name}] {len(ds)} train images {ds.images.shape[1]}x{ds.images.shape[2]} from {archive.name} "
          f"(unpack + decode {time.perf_counter() - t0:.1f} s, cached in {work} for reruns)")
    return ds, root


def bench_torch(name: str, ds, root: Path, args) -> dict[str, float]:
    """images/s of torch DataLoaders with per-item torchvision transforms."""
    from rift_dist.data.sources import _list_folder, _list_tiny, detect_layout

    size = ds.images.shape[1]
    tf = transforms_for(size)
    out = {}
    rate, seen, warm = time_epochs(torch_loader(ArrayImages(ds.images, ds.labels, tf), args.batch_size, args.workers),
                                   args.epochs, set_epoch=False)
    print(f"[{name}] torch (arrays in memory, {args.workers} workers)    {rate:10.0f} img/s ({seen} images; warm-up {warm:.1f} s)")
    out["torch-arrays"] = rate
    if STORAGE[name] == "jpeg":
        _, base = detect_layout(name, root)
        listing = _list_tiny(base, "train") if name == "tiny-imagenet" else _list_folder(name, base, "train")
        rate, seen, warm = time_epochs(
            torch_loader(JpegFiles(listing.files, listing.labels, tf), args.batch_size, args.workers),
            args.epochs, set_epoch=False)
        print(f"[{name}] torch (JPEG files + PIL, {args.workers} workers)  {rate:10.0f} img/s ({seen} images; warm-up {warm:.1f} s)")
        out["torch-jpeg-files"] = rate
    return out


def bench_ffcv(name: str, ds, work: Path, args, storage: str) -> float:
    """images/s of the FFCV training loader (reflect-pad crop + flip + float conversion in numba)."""
    from rift_dist.data.ffcv.loader import FFCVLoader
    from rift_dist.data.ffcv.write import beton_dir, write_beton

    path = beton_dir(work / "ffcv", name, storage, 90) / "train.beton"
    if not path.exists():
        t0 = time.perf_counter()
        write_beton(ds, path, storage=storage, jpeg_quality=90, progress=False, num_workers=args.workers)
        print(f"[{name}] wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    threads = torch.get_num_threads()
    loader = FFCVLoader(path, batch_size=args.batch_size, train=True, seed=0, num_workers=args.workers)
    assert torch.get_num_threads() == threads
    rate, seen, warm = time_epochs(loader, args.epochs, set_epoch=True)
    print(f"[{name}] ffcv  ({storage} storage, {args.workers} threads)      {rate:10.0f} img/s "
          f"({seen} images; warm-up epoch incl. numba compile {warm:.1f} s)")
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="FFCV threads = torch DataLoader workers (2)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs after one warm-up epoch")
    p.add_argument("--datasets", nargs="+", default=["cifar10", "tiny-imagenet"], choices=sorted(ARCHIVES))
    p.add_argument("--data-dir", default="", help="directory of the archives (default: env RIFT_SHARED_DATA or ../shared/data)")
    p.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench"), help="unpacked data, decode cache and .beton files")
    args = p.parse_args(argv)

    from rift_dist.data.ffcv import ffcv_available

    ok, reason = ffcv_available()
    if not ok:
        print(f"FFCV benchmark skipped: {reason}")
        return 0
    data_dir = find_data_dir(args.data_dir)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    print(f"data path benchmark: batch {args.batch_size}, {args.workers} workers, {args.epochs} timed epoch(s) after "
          f"1 warm-up; torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    # Torch first: its DataLoader forks workers, which is unsafe once numba's thread pool runs.
    prepared = {name: prepare(name, data_dir, work, args) for name in args.datasets}
    prepared = {k: v for k, v in prepared.items() if v is not None}
    torch_rates = {name: bench_torch(name, ds, root, args) for name, (ds, root) in prepared.items()}
    ffcv_rates = {name: bench_ffcv(name, ds, work, args, STORAGE[name]) for name, (ds, _) in prepared.items()}
    extra = {name: bench_ffcv(name, ds, work, args, EXTRA_STORAGE[name])
             for name, (ds, _) in prepared.items() if name in EXTRA_STORAGE}
    print(f"\nsummary: images/s of one training epoch's data path (batch {args.batch_size}, {args.workers} workers)")
    for name in prepared:
        f = ffcv_rates[name]
        print(f"  {name:14s} {'ffcv-' + STORAGE[name]:17s} {f:10.0f}")
        for label, rate in torch_rates[name].items():
            print(f"  {name:14s} {label:17s} {rate:10.0f}   ffcv-{STORAGE[name]} / {label} = {f / rate:.1f}x")
        if name in extra:
            e = extra[name]
            base = torch_rates[name]["torch-arrays"]
            print(f"  {name:14s} {'ffcv-' + EXTRA_STORAGE[name]:17s} {e:10.0f}   "
                  f"ffcv-{EXTRA_STORAGE[name]} / torch-arrays = {e / base:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
