"""Write a re-generated common-corruption set, find the sets a run evaluates, and ``rift data corrupt``.

:func:`generate_corruption_set` writes the CIFAR layout (``<corruption>.npy`` + ``labels.npy``) plus
``metadata.json`` that states the set is a RE-GENERATION, not the official release (Hendrycks &
Dietterich 2019), with its source, seed, constants, implementation notes, fallbacks and library
versions. The images come from :func:`rift_dist.data.corruptions.kernels.corrupt_batch`.
:func:`get_corruption_sets` is what a run uses: load ``data.corruption_root``, or generate a set
from the test split first when ``data.corruption_generate`` is on.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from rift_dist.data.corruptions import AUTHORS_CORRUPTIONS, AUTHORS_USED_CORRUPTIONS, CIFAR_CORRUPTIONS, upstream
from rift_dist.data.corruptions.kernels import SEVERITY_PARAMS, corrupt_batch, corruption_context, pick_params
from rift_dist.data.corruptions.load import METADATA, load_corruption_set, read_metadata, subset_positions
from rift_dist.data.datasets import DATASETS, LAYOUTS
from rift_dist.data.sources import ArrayDataset, DataError, load_split, resolve_root

if TYPE_CHECKING:  # pragma: no cover
    from rift_dist.config import RunConfig

__all__ = ["generate_corruption_set", "get_corruption_sets", "add_corrupt_arguments", "corrupt_command"]

_FORMAT = "rift_dist corruption set v1"


def _versions() -> dict:
    vers = {"python": platform.python_version(), "numpy": np.__version__}
    for mod, key in (("scipy", "scipy"), ("skimage", "scikit-image"), ("cv2", "opencv"), ("PIL", "pillow")):
        try:
            vers[key] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001
            vers[key] = None
    vers["imagecorruptions"] = upstream._IC.load().version
    try:
        from importlib.metadata import version

        vers["rift_dist"] = version("rift_dist")
    except Exception:  # noqa: BLE001
        vers["rift_dist"] = None
    return vers


def _dataset_sha256(ds: ArrayDataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.images).data)
    h.update(np.asarray(ds.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def generate_corruption_set(
    test: ArrayDataset,
    out_dir: str | Path,
    corruptions: Sequence[str] = CIFAR_CORRUPTIONS,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    progress: bool = True,
    *,
    params: str = "auto",
    source: dict | None = None,
) -> Path:
    """Write a re-generated CIFAR-10-C style set built from ``test``.

    Output (``out_dir``): ``<c>.npy`` uint8 ``[len(severities) * n, H, W, 3]`` (severities stacked in
    the given order), ``labels.npy`` (test labels tiled once per severity; uint8 when there are at
    most 256 classes, as in the release) and ``metadata.json``: ``regenerated: true`` and a note
    that this is NOT the official release, the source split and its sha256, n, seed, severities,
    parameter set, per-corruption implementation, which corruptions used a fallback (and why),
    library versions, the imagecorruptions probe, and timings.

    The directory is written atomically (temporary sibling, then rename). When ``out_dir`` already
    holds a complete set from the same source, seed, severities and parameters that includes the
    requested corruptions, nothing is done.

    Args:
        test: the clean images (uint8 ``[n, H, W, 3]``) and labels.
        out_dir: where the set goes.
        corruptions: names from :data:`AUTHORS_CORRUPTIONS`.
        severities: subset of 1..5.
        seed: seed; corruption ``c`` at severity ``s`` uses ``default_rng([seed, index of c in
            AUTHORS_CORRUPTIONS, s])``.
        progress: print one line per corruption and severity to stderr.
        params: severity constants: auto (by image size), cifar or tiny-imagenet.
        source: extra provenance merged into metadata["source"] (e.g. data set, root, indices sha256).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: empty input, unknown corruption/severity, ``out_dir`` holding something else.
    """
    out_dir = Path(out_dir).expanduser()
    corruptions = list(corruptions) or list(CIFAR_CORRUPTIONS)
    severities = [int(s) for s in severities]
    unknown = [c for c in corruptions if c not in AUTHORS_CORRUPTIONS]
    if unknown:
        raise DataError(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(AUTHORS_CORRUPTIONS)}")
    if not severities or any(s not in (1, 2, 3, 4, 5) for s in severities) or len(set(severities)) != len(severities):
        raise DataError(f"severities must be distinct values in 1..5, got {severities}")
    if len(test) == 0:
        raise DataError("cannot generate a corruption set from an empty test split")
    params = pick_params(test.image_size, params)
    fingerprint = _dataset_sha256(test)
    existing = read_metadata(out_dir)
    if existing is not None:
        same = (
            existing.get("complete")
            and existing.get("source", {}).get("sha256") == fingerprint
            and existing.get("seed") == seed
            and existing.get("severities") == severities
            and existing.get("params") == params
        )
        if same and set(corruptions) <= set(existing.get("corruptions", [])):
            if progress:
                print(f"[corrupt] {out_dir} is complete; skipping", file=sys.stderr, flush=True)
            return out_dir
        raise DataError(
            f"{out_dir} already holds a different corruption set (seed {existing.get('seed')}, severities "
            f"{existing.get('severities')}, corruptions {len(existing.get('corruptions', []))}, source "
            f"{str(existing.get('source', {}).get('sha256'))[:12]}); choose another output directory or delete it"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not a corruption set made by rift_dist; choose an empty or new directory")

    started = time.time()
    ctx, impl, fallback = corruption_context(corruptions, params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        n = len(test)
        label_dtype = np.uint8 if test.num_classes <= 256 else np.int64
        np.save(tmp / "labels.npy", np.tile(test.labels, len(severities)).astype(label_dtype))
        for name in corruptions:
            t0 = time.time()
            arr = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8,
                                            shape=(len(severities) * n,) + test.images.shape[1:])
            for k, s in enumerate(severities):
                rng = np.random.default_rng([seed, AUTHORS_CORRUPTIONS.index(name), s])
                for lo in range(0, n, 1000):  # bounded memory for large sets
                    batch = np.asarray(test.images[lo : lo + 1000])
                    arr[k * n + lo : k * n + lo + len(batch)] = corrupt_batch(batch, name, s, rng, params, _ctx=ctx)
                if progress:
                    print(f"[corrupt] {name} severity {s}: {n} images, {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
            arr.flush()
            del arr
            timings[name] = round(time.time() - t0, 3)
        status = upstream.imagecorruptions_status(probe=True)
        meta = {
            "format": _FORMAT,
            "regenerated": True,
            "note": (
                "RE-GENERATION with rift_dist.data.corruptions -- NOT the official CIFAR-10-C/CIFAR-100-C/"
                "Tiny-ImageNet-C release (Hendrycks & Dietterich 2019). Same corruption types and severity "
                "constants, but different random draws, a different source copy of the test images and "
                "re-implemented operations; accuracies are not directly comparable with published numbers."
            ),
            "complete": True,
            "source": {"description": test.description, "n": n, "sha256": fingerprint, **(source or {})},
            "n": n,
            "seed": seed,
            "severities": severities,
            "corruptions": corruptions,
            "params": params,
            "constants_source": "hendrycks/robustness ImageNet-C/create_c/"
            + ("make_cifar_c.py" if params == "cifar" else "make_tinyimagenet_c.py"),
            "image_size": list(test.image_size),
            "classes": list(test.classes),
            "layout": "<corruption>.npy = severities stacked in the order of 'severities', n images each; labels.npy tiled",
            "implementation": impl,
            "fallback": fallback,
            "imagecorruptions": status,
            "versions": _versions(),
            "seconds": timings,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"[corrupt] wrote {out_dir} in {time.time() - started:.1f}s", file=sys.stderr, flush=True)
    return out_dir


# =========================================================================== config-driven entry


def get_corruption_sets(cfg: "RunConfig") -> list[tuple[str, int, ArrayDataset]]:
    """The corruption sets a run evaluates, from ``cfg.data``.

    ``data.corruption_root`` is loaded when it holds a set; otherwise, with
    ``data.corruption_generate``, a set is re-generated from the run's test split (class-balanced
    ``data.corruption_subset`` images, 0 = all; seed ``data.corruption_seed``) into
    ``data.corruption_root`` (when set) or ``<data.cache_dir>/corruptions/<name>``, then loaded.
    Corruptions: ``data.corruptions`` (empty = the standard 15); severities: ``data.severities``.

    Raises:
        DataError: no set and generation off (says which settings to change); anything
            :func:`load_corruption_set` or :func:`generate_corruption_set` raises.
    """
    from rift_dist.data.splits import indices_sha256, make_splits

    d = cfg.data
    names = list(d.corruptions) or list(CIFAR_CORRUPTIONS)
    if d.corruption_root:
        root = Path(d.corruption_root).expanduser()
        try:
            return load_corruption_set(root, d.dataset, names, d.severities, d.corruption_subset, seed=d.corruption_seed)
        except DataError:
            if not d.corruption_generate or (root.is_dir() and any(root.iterdir())):
                raise
    elif not d.corruption_generate:
        raise DataError(
            "no corruption set configured: set data.corruption_root to a CIFAR-10-C style directory, or "
            "data.corruption_generate: true to re-generate one from the test split"
        )
    test = make_splits(d).test
    pick = subset_positions(test.labels, d.corruption_subset, d.corruption_seed)
    sub = test if len(pick) == len(test) else test.subset(pick)
    key = hashlib.sha256(
        json.dumps([_dataset_sha256(sub), d.corruption_seed, sorted(d.severities), sorted(names)]).encode()
    ).hexdigest()[:12]
    out = Path(d.corruption_root).expanduser() if d.corruption_root else Path(d.cache_dir).expanduser() / "corruptions" / f"{d.dataset}-{key}"
    generate_corruption_set(
        sub, out, names, sorted(d.severities), seed=d.corruption_seed, progress=True,
        source={"dataset": d.dataset, "test_positions_sha256": indices_sha256(pick)},
    )
    return load_corruption_set(out, d.dataset, names, d.severities, 0, seed=d.corruption_seed)


# =========================================================================== CLI


def add_corrupt_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``rift data corrupt`` to ``parser`` (returns it)."""
    parser.add_argument("--dataset", default="cifar10", choices=list(DATASETS),
                        help="data set of the clean images")
    parser.add_argument("--root", default="", help="data directory (else env RIFT_DATA_ROOT)")
    parser.add_argument("--archive", default="", help="a .tar.gz of the data, unpacked into --cache-dir")
    parser.add_argument("--cache-dir", default="~/.cache/rift_dist", help="where --archive is unpacked")
    parser.add_argument("--layout", default="auto", choices=list(LAYOUTS))
    parser.add_argument("--split", default="test", choices=["train", "test"], help="split to corrupt (test)")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--n", type=int, default=0, help="class-balanced subset of N images (0 = the whole split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of the corruptions")
    parser.add_argument("--corruptions", nargs="+", default=None,
                        help="corruption names, 'all' for the 19 files, 'authors' for the RiFT code's 18 "
                             "(default: the standard 15)")
    parser.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="severities (1..5)")
    parser.add_argument("--params", default="auto", choices=["auto", *SEVERITY_PARAMS],
                        help="severity constants (auto: by image size)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def corrupt_command(args: argparse.Namespace) -> int:
    """Run ``rift data corrupt``: load the split, take the subset, generate the set; returns the exit code
    (0 done, 2 data error, with the message on stderr)."""
    from rift_dist.config import DataConfig
    from rift_dist.data.splits import indices_sha256

    names = args.corruptions or list(CIFAR_CORRUPTIONS)
    if names == ["all"]:
        names = list(AUTHORS_CORRUPTIONS)
    elif names == ["authors"]:
        names = list(AUTHORS_USED_CORRUPTIONS)
    if not (args.root or args.archive or os.environ.get("RIFT_DATA_ROOT")):  # the config's message names config keys
        print("rift data corrupt: no data location: give --root DIR (the clean data set) or --archive FILE.tar.gz "
              "(e.g. ../shared/data/cifar10-jpeg.tar.gz), or set env RIFT_DATA_ROOT", file=sys.stderr)
        return 2
    try:
        dcfg = DataConfig(dataset=args.dataset, root=args.root, archive=args.archive,
                          cache_dir=args.cache_dir, layout=args.layout)
        root = resolve_root(dcfg)
        split = load_split(args.dataset, root, args.split, args.layout)
        pick = subset_positions(split.labels, args.n, args.seed)
        data = split if len(pick) == len(split) else split.subset(pick)
        out = generate_corruption_set(
            data, args.out, names, args.severities, seed=args.seed, progress=not args.quiet, params=args.params,
            source={"dataset": args.dataset, "root": str(root), "split": args.split,
                    "positions_sha256": indices_sha256(pick)},
        )
    except DataError as exc:
        print(f"rift data corrupt: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
