"""The device check of issue "Test what users run": one paper row through every stage on CUDA, then the engine matrix.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU (bf16, NCCL), <= 8 minutes
    python benchmarks/gpu_check.py --dry      # the same script on the CPU with tiny sizes (a few minutes)

Part 1 runs ``configs/cifar10_resnet18.yaml`` (full-width ResNet-18, the paper's hyper-parameters) through
train -> MRC -> fine-tuning -> interpolation -> evaluation with shortened counts (printed), with the defaults
(``precision.autocast: auto`` = bf16 on a GPU that has it, ``channels_last: auto``, NCCL on one rank) via the
real CLI, and prints the stage times and the AT-vs-RiFT table.  Part 2 runs the engine matrix on one rank:
``distributed.engine`` ddp / deepspeed ZeRO 0, 1, 2 x ``precision.autocast`` auto / none x ``channels_last``
auto / on / off, each a tiny run through every stage, and prints one line per combination (wall time, chosen
module, alpha*, or the refusal message) and whether the chosen module equals the DDP-default one.

Every child has a hard time limit; the script prints the hardware line first and exits non-zero when any
part failed.  Data: the real CIFAR-10 archive (``--data-dir``, env RIFT_SHARED_DATA, or ../shared/data).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _data_dir(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("RIFT_SHARED_DATA"), str(ROOT.parent / "shared" / "data")):
        if cand and (Path(cand) / "cifar10-jpeg.tar.gz").is_file():
            return Path(cand)
    sys.exit("gpu_check: cifar10-jpeg.tar.gz not found (--data-dir, RIFT_SHARED_DATA or ../shared/data)")


def _rift(args: list[str], limit: int, env: dict) -> tuple[int, str, float]:
    """Run ``rift ARGS`` with a hard limit; returns (exit status, last output lines, seconds)."""
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "rift_dist.cli", *args, "--no-progress"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=limit)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n(time limit {limit}s)"
    return rc, out, time.time() - t0


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def paper_row(args, data: Path, work: Path, env: dict) -> bool:
    """Part 1: configs/cifar10_resnet18.yaml through every stage on the device, counts shortened."""
    dev = "cpu" if args.dry else "cuda"
    if args.dry:
        counts = ["model.width=8", "data.train_subset=256", "data.val_size=64", "data.test_subset=64",
                  "train.epochs=1", "train.max_steps_per_epoch=2", "train.attack.num_steps=2",
                  "train.eval_attack_steps=1", "mrc.num_examples=64", "mrc.batch_size=64", "mrc.num_iterations=1",
                  "finetune.epochs=1", "interpolation.alphas=[0.0,0.5,1.0]", "eval.restarts=1",
                  "eval.attack.num_steps=2", "eval.selection_attack_steps=1", "data.eval_batch_size=64",
                  "data.batch_size=64"]
    else:  # ~5 minutes on an H200 in bf16: 10k images x 3 epochs PGD-10, the whole MRC, the paper's sweep
        counts = ["data.train_subset=10000", "data.val_size=1000", "data.test_subset=2000", "train.epochs=3",
                  "train.milestones=[2]", "mrc.num_examples=2000", "finetune.epochs=2", "finetune.milestones=[1]"]
    common = [f"device={dev}", f"data.archive={data / 'cifar10-jpeg.tar.gz'}", "data.root=",
              "data.corruption_root=", "data.corruption_generate=true", "data.corruptions=[gaussian_noise,contrast]",
              "data.severities=[3]", "data.num_workers=4", "eval.autoattack=false", f"data.cache_dir={work / 'cache'}"]
    run_dir = work / "paper-row"
    cmd = ["run", "configs/cifar10_resnet18.yaml", "--run-dir", str(run_dir)]
    for s in counts + common:
        cmd += ["--set", s]
    print(f"== part 1: configs/cifar10_resnet18.yaml on {dev}, shortened: {' '.join(counts)}", flush=True)
    rc, out, secs = _rift(cmd, args.row_limit, env)
    for line in out.splitlines():
        if line.startswith(("[train]", "[mrc]", "[finetune]", "[interpolate]", "[evaluate]", "rift:", "|")):
            print("   ", line)
    s = _summary(run_dir)
    print(f"== part 1: exit {rc} after {secs:.0f}s" + (f"; module {s.get('modules')}, alpha* {s.get('alpha')}, "
                                                     f"AT {s['at']['clean_accuracy']:.4f}/{s['at']['robust_accuracy']:.4f}"
                                                     f" -> RiFT {s['rift']['clean_accuracy']:.4f}/"
                                                     f"{s['rift']['robust_accuracy']:.4f} (clean/robust)" if s else ""))
    if rc:
        print(out[-3000:])
    return rc == 0


def engine_matrix(args, data: Path, work: Path, env: dict) -> bool:
    """Part 2: engine x precision x layout on one rank, each a tiny run through every stage."""
    dev = "cpu" if args.dry else "cuda"
    engines = [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)]
    precisions, layouts = ["auto", "none"], ["auto", "on", "off"]
    combos = list(itertools.product(engines, precisions, layouts))
    if args.dry:  # the defaults of each engine and the explicit layouts of one
        combos = [(("ddp", 0), "auto", "auto"), (("deepspeed", 0), "auto", "auto"), (("deepspeed", 2), "auto", "on"),
                  (("ddp", 0), "none", "off")]
    tiny = [f"device={dev}", f"data.archive={data / 'cifar10-jpeg.tar.gz'}", "model.width=8", "data.train_subset=256",
            "data.val_size=64", "data.test_subset=64", "data.batch_size=64", "data.eval_batch_size=64",
            "train.epochs=1", "train.max_steps_per_epoch=2", "train.attack.num_steps=2", "train.eval_attack_steps=1",
            "mrc.num_examples=64", "mrc.batch_size=64", "mrc.num_iterations=2", "finetune.epochs=1",
            "interpolation.alphas=[0.0,1.0]", "eval.restarts=1", "eval.attack.num_steps=1",
            "eval.selection_attack_steps=1", "data.corruption_generate=false", "eval.sanity_checks=false",
            "eval.extra_pgd_steps=[]", "eval.margin_pgd_steps=0", "tracking.enabled=false",
            f"data.cache_dir={work / 'cache'}"]
    print(f"\n== part 2: engine matrix on one {dev} rank, {len(combos)} combinations", flush=True)
    reference, ok = None, True
    for (engine, zero), autocast, layout in combos:
        name = f"{engine}{'-zero' + str(zero) if engine == 'deepspeed' else ''} autocast={autocast} channels_last={layout}"
        run_dir = work / name.replace(" ", "_").replace("=", "-")
        cmd = ["run", "configs/default.yaml", "--run-dir", str(run_dir)]
        for s in tiny + [f"distributed.engine={engine}", f"distributed.zero_stage={zero}",
                         f"precision.autocast={autocast}", f"precision.channels_last={layout}"]:
            cmd += ["--set", s]
        rc, out, secs = _rift(cmd, args.combo_limit, env)
        s = _summary(run_dir)
        if rc == 0 and s:
            module = s.get("modules")
            reference = reference if reference is not None else module
            same = "same module as ddp default" if module == reference else f"DIFFERENT module from {reference}"
            print(f"   {name:<50} {secs:5.0f}s  module {module} alpha* {s.get('alpha')}  ({same})", flush=True)
        elif rc == 2 and "config error" in out:
            print(f"   {name:<50} refused at config time: {out.strip().splitlines()[-1][:160]}", flush=True)
        else:
            ok = False
            print(f"   {name:<50} FAILED (exit {rc}) after {secs:.0f}s:\n{out[-2000:]}", flush=True)
    return ok


def main() -> int:
    """Run both parts; returns 0 when both passed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="run on the CPU with tiny sizes (checks the script)")
    p.add_argument("--data-dir", help="folder with cifar10-jpeg.tar.gz")
    p.add_argument("--row-limit", type=int, default=None, help="seconds for part 1 (default 300; dry 400)")
    p.add_argument("--combo-limit", type=int, default=None, help="seconds per matrix combination (default 40; dry 200)")
    p.add_argument("--skip-row", action="store_true", help="run part 2 only")
    args = p.parse_args()
    args.row_limit = args.row_limit or (400 if args.dry else 300)
    args.combo_limit = args.combo_limit or (200 if args.dry else 40)
    sys.path.insert(0, str(ROOT))
    import torch

    from rift_dist.precision import hardware_summary

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; use --dry for the CPU check", file=sys.stderr)
        return 2
    print("== hardware:", hardware_summary("cpu" if args.dry else "cuda"), flush=True)
    data = _data_dir(args.data_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="rift-gpu-check-") as tmp:
        work = Path(tmp)
        row_ok = True if args.skip_row else paper_row(args, data, work, env)
        matrix_ok = engine_matrix(args, data, work, env)
    print(f"\n== gpu_check done in {time.time() - t0:.0f}s: paper row {'ok' if row_ok else 'FAILED'}, "
          f"engine matrix {'ok' if matrix_ok else 'FAILED'}")
    return 0 if row_ok and matrix_ok else 1


if __name__ == "__main__":
    sys.exit(main())
