"""The MRC stage on 1 rank versus 2 ranks (one module per rank, contiguous and cost-balanced).

ResNet-18 at full width (64), CIFAR-10, one thread per process, the SAME fixed adversarial set
for both runs (``--examples`` real CIFAR-10 training images, PGD against the model, made once
and copied into both run directories, so only the MRC search itself is timed).  The model is a
seeded initialisation: the cost of the search does not depend on the weights' values.

Runs ``rift mrc CONFIG`` in one process, then under torchrun with 2 processes, and prints:

* the stage's wall time on each (from "[mrc] finished in ...") and their ratio (the speed-up),
* each rank's MRC time (``mrc/mrc.json`` rank_seconds) and the load imbalance
  max(rank time) / mean(rank time) (1.0 = perfect),
* the modules per rank and whether the two tables are identical,
* the load average before and after (the machine may be shared: the ratio is only meaningful
  when two cores were actually free).

Usage:  .venv/bin/python benchmarks/bench_mrc_ranks.py [--examples 128] [--iterations 2]
        [--width 64] [--data-dir D] [--work-dir W] [--keep]
``--iterations`` is the number of ascent passes per module (10 in the paper; fewer keep the
run short; the ratio is about the same since every module's cost scales with it).
Exit status 0 unless something fails to run; exit 0 with a note when the data are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(path: Path, archive: Path, cache: Path, args) -> Path:
    import yaml

    cfg = {
        "name": "bench-mrc-ranks", "seed": 0,
        "data": {"dataset": "cifar10", "archive": str(archive), "cache_dir": str(cache), "train_subset": 1000,
                 "val_size": 100, "test_subset": 100, "loader": "torch"},
        "model": {"arch": "resnet18", "width": args.width},
        "mrc": {"num_examples": args.examples, "batch_size": max(args.examples, 128), "num_iterations": args.iterations},
        "precision": {"threads": 1},
        "tracking": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _make_inputs(cfg_path: Path, run_dirs: list[Path]) -> None:
    """Write the seeded model as train/model.pt and the fixed adversarial set into every run dir."""
    import torch

    from rift_dist.config import load_config
    from rift_dist.parallel.runtime import Runtime
    from rift_dist.pipeline import configure_torch, make_context
    from rift_dist.stages import criticality
    from rift_dist.stages.context import new_model

    cfg = load_config(str(cfg_path))
    first = run_dirs[0]
    cfg.run_dir = str(first)
    configure_torch(cfg)
    torch.manual_seed(0)
    from rift_dist.models import build_model

    state = build_model(cfg).state_dict()
    for d in run_dirs:
        (d / "train").mkdir(parents=True, exist_ok=True)
        torch.save(state, d / "train" / "model.pt")
    with Runtime(cfg) as rt:
        ctx = make_context(cfg, first, rt, progress=False)
        model = new_model(ctx, state)
        model.eval()
        (first / "mrc").mkdir(parents=True, exist_ok=True)
        criticality.build_adversarial_set(ctx, model)
        ctx.tracker.finish("FINISHED")
    for d in run_dirs[1:]:
        (d / "mrc").mkdir(parents=True, exist_ok=True)
        shutil.copy(first / "mrc" / "adversarial_set.pt", d / "mrc" / "adversarial_set.pt")


def _run(cfg_path: Path, run_dir: Path, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cli = ["-m", "rift_dist.cli", "mrc", str(cfg_path), "--run-dir", str(run_dir), "--no-progress"]
    cmd = [sys.executable, *cli] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = re.search(r"\[mrc\] finished in ([0-9.]+)s", proc.stdout)
    info = json.loads((run_dir / "mrc" / "mrc.json").read_text())
    return {"stage_s": float(m.group(1)) if m else float("nan"), "process_s": wall,
            "rank_s": info["rank_seconds"], "groups": info["assignment"], "table": (run_dir / "mrc.csv").read_text()}


def main() -> int:
    """Run the benchmark; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--data-dir", default=os.environ.get("RIFT_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--work-dir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    archive = Path(args.data_dir) / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        print(f"bench_mrc_ranks: {archive} not found; nothing measured")
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_mrc_ranks_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg_path = _config(work / "bench.yaml", archive, ROOT / ".cache" / "test-data", args)
        dirs = [work / "one", work / "two"]
        load0 = os.getloadavg()
        print(f"MRC stage, ResNet-18 width {args.width}, {args.examples} fixed adversarial CIFAR-10 images, "
              f"{args.iterations} ascent passes per module, 1 thread per process; load average {load0[0]:.2f}")
        _make_inputs(cfg_path, dirs)
        one = _run(cfg_path, dirs[0], 1)
        two = _run(cfg_path, dirs[1], 2)
        load1 = os.getloadavg()
        mean = sum(two["rank_s"]) / len(two["rank_s"])
        print(f"  1 rank : stage {one['stage_s']:.1f}s (process {one['process_s']:.1f}s), MRC {one['rank_s'][0]:.1f}s")
        print(f"  2 ranks: stage {two['stage_s']:.1f}s (process {two['process_s']:.1f}s), MRC per rank "
              f"{', '.join(f'{s:.1f}s' for s in two['rank_s'])} ({', '.join(str(len(g)) for g in two['groups'])} modules)")
        print(f"  speed-up (1-rank stage time / 2-rank stage time): {one['stage_s'] / two['stage_s']:.2f}x")
        print(f"  load imbalance (max rank time / mean rank time): {max(two['rank_s']) / mean:.2f}")
        print(f"  tables identical: {one['table'] == two['table']}; load average after {load1[0]:.2f} "
              f"(2 cores: a load above ~2 means other work shared them)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
