"""Helpers shared by the ``bench_*.py`` scripts: real CIFAR-10 images, interleaved timing, headers.

Timing on a shared machine: every benchmark runs its contenders *interleaved* (A, B, A, B, ...)
in one process, repeats them, and reports the minimum and the median of both the wall time and
the process CPU time (``time.process_time``: all threads of this process).  With one intra-op
thread the CPU time is close to what an idle machine would show even when other jobs share the
cores; with several threads, OpenMP's spin-waiting makes it an upper bound.  On CUDA the wall
time is taken after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CIFAR_ARCHIVE = "cifar10-jpeg.tar.gz"


def add_common_args(parser) -> None:
    """Add --threads, --device, --data-dir, --cache-dir and --allow-synthetic to an argparse parser."""
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data-dir", default="", help="directory holding cifar10-jpeg.tar.gz "
                        "(default: env RIFT_SHARED_DATA, else ../shared/data beside the project)")
    parser.add_argument("--cache-dir", default="~/.cache/rift_dist", help="where the archive is unpacked and decoded")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="use uniform random images when the real data are missing (device machines)")


def setup(args) -> torch.device:
    """Apply --threads, print the hardware line, return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from rift_dist.precision import hardware_summary

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    print(f"# {hardware_summary(device)}", flush=True)
    if device.type == "cpu":
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        if load:
            print(f"# load average {load[0]:.1f} on {os.cpu_count()} logical CPUs at start "
                  f"(other jobs share them: timings are interleaved and repeated)", flush=True)
    return device


def find_data_dir(arg: str) -> Path | None:
    """The shared data directory: --data-dir, env RIFT_SHARED_DATA, or ../shared/data beside the project."""
    for cand in (arg, os.environ.get("RIFT_SHARED_DATA", ""), str(ROOT.parent / "shared" / "data")):
        if cand and (Path(cand) / CIFAR_ARCHIVE).is_file():
            return Path(cand)
    return None


def cifar10(args, n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` real CIFAR-10 images (seeded choice) as float32 [n, 3, 32, 32] in [0, 1] and int64 labels [n].

    Unpacks ``cifar10-jpeg.tar.gz`` once into ``--cache-dir`` (rift_dist.data.archive) and decodes it
    with rift_dist.data.sources (cached as .npy).  Returns (images, labels, description).

    Raises:
        SystemExit: when the archive is missing and --allow-synthetic is not given.
    """
    data = find_data_dir(args.data_dir)
    if data is None:
        if not args.allow_synthetic:
            raise SystemExit(f"{CIFAR_ARCHIVE} not found (--data-dir, env RIFT_SHARED_DATA or ../shared/data); "
                             f"pass --allow-synthetic to time on random images instead")
        g = torch.Generator().manual_seed(seed)
        print(f"# NOTE: real data not found; using {n} uniform random 32x32 images (timings only)", flush=True)
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "synthetic"
    from rift_dist.data.archive import data_dir_in, unpack_archive
    from rift_dist.data.sources import load_split

    cache = Path(args.cache_dir).expanduser()
    root = data_dir_in(unpack_archive(data / CIFAR_ARCHIVE, cache))
    ds = load_split("cifar10", root, split, cache_dir=cache)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds.labels), size=min(n, len(ds.labels)), replace=False))
    x = torch.from_numpy(np.ascontiguousarray(ds.images[idx])).permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(np.asarray(ds.labels[idx])).long()
    return x.contiguous(), y, f"CIFAR-10 {split}, {len(y)} images (seed {seed})"


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Wall and process-CPU seconds of repeated runs of one contender."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def best(self, kind: str = "wall") -> float:
        """Minimum seconds of ``kind`` (wall or cpu)."""
        return min(getattr(self, kind))

    def median(self, kind: str = "wall") -> float:
        """Median seconds of ``kind`` (wall or cpu)."""
        return statistics.median(getattr(self, kind))


def timed(fn, device: torch.device, timings: Timings):
    """Run ``fn()`` once, append its wall and CPU seconds to ``timings``, return its result."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    timings.wall.append(time.perf_counter() - w0)
    timings.cpu.append(time.process_time() - c0)
    return out


def interleave(contenders: dict, device: torch.device, reps: int, warmup: int = 1, log=print) -> dict[str, Timings]:
    """Run every contender ``reps`` times, round-robin, after ``warmup`` untimed rounds.

    Args:
        contenders: {name: zero-argument callable}; device: for synchronisation; log: progress printer.

    Returns:
        {name: Timings}.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
            sync(device)
    out = {name: Timings() for name in contenders}
    for r in range(reps):
        for name, fn in contenders.items():
            timed(fn, device, out[name])
            if log:
                log(f"#   rep {r + 1}/{reps} {name}: wall {out[name].wall[-1]:.2f} s, cpu {out[name].cpu[-1]:.2f} s")
    return out


def ratio_line(label: str, base: Timings, ours: Timings) -> str:
    """'label: x.xx (min wall) / x.xx (median wall) / x.xx (min cpu)' speed-up of ``ours`` over ``base``."""
    return (f"{label}: {base.best() / ours.best():.2f}x (min wall), {base.median() / ours.median():.2f}x (median wall), "
            f"{base.best('cpu') / ours.best('cpu'):.2f}x (min cpu)")


def cifar_model(width: int = 64, arch: str = "resnet18") -> torch.nn.Module:
    """The CIFAR ResNet of the paper with CIFAR-10 normalisation as its first layer (float32, NCHW, CPU)."""
    from rift_dist.data.datasets import dataset_spec
    from rift_dist.models import build_model_from

    spec = dataset_spec("cifar10")
    return build_model_from(arch, spec.num_classes, width, mean=spec.mean, std=spec.std)


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Set every BatchNorm's running statistics to the exact averages over ``images`` (train-mode passes).

    Leaves the model in eval mode.  Used to make an untrained model's eval-mode behaviour sane.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i:i + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
