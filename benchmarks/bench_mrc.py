"""MRC search: rift_dist's engine versus the authors' way (``reference_mrc.py``), side by side.

Setting (the paper's): the full-width CIFAR ResNet-18 (width 64, CIFAR-10 normalisation as its first
layer), a FIXED adversarial set of 512 real CIFAR-10 training images (PGD-10, 8/255, step 2/255,
against the model; made once and cached under .cache/bench_mrc), all 21 modules, eps_w = 0.1 (L2),
10 passes of lr-1 gradient ascent in mini-batches of 512.

The model is UNTRAINED but BatchNorm-calibrated: the running statistics are the exact averages over
2,000 real CIFAR-10 training images (``--train-steps N`` instead trains it for N clean SGD steps in
bf16 first).  Timing does not depend on the weights; the ranking comparison is made on this model.

Contenders, each a generator over the modules in network order, pulled one module at a time in
turn (interleaved at module granularity, so the machine's load hits all of them alike):

* ``ref``: reference_mrc.py -- copy the model per module, whole-network forwards, float32 NCHW.
* ``cache``: rift_dist (``iter_criticality``) with the activation cache only -- float32 NCHW, no
  fused evaluation, no BatchNorm folding.  Same arithmetic as ``ref``: values equal to float rounding.
* ``exact``: + fused evaluation (``mrc.fuse_eval``; the ascent is bitwise that of ``cache``).
* ``fold``: + BatchNorm folding (``precision.fold_bn``), still float32 NCHW.
* ``default``: rift_dist's defaults on this machine (cache in the autocast dtype, fused evaluation,
  folding, bf16 autocast + channels_last where the hardware has bf16).

Reports per module and in total: seconds (wall and process CPU), speed-up over ``ref``, the largest
MRC difference to ``ref`` (absolute and relative), the chosen (lowest-MRC) module, and the Spearman
rank correlation of each MRC table with ``ref``'s.  With ``--memory``: peak resident memory of the
default search with and without the cache (fresh child processes), and the cache size per module.

``--modules N`` takes N modules evenly spaced in network order (first and last included) and
``--iterations T`` sets the passes, for a quick run; the per-pass structure makes the speed-up at
T = 2 within a few percent of T = 10 (cost model printed with the results).

Usage:  .venv/bin/python benchmarks/bench_mrc.py [--modules 0] [--iterations 10] [--variants ref,cache,exact,fold,default]
        [--memory] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import time

import torch

import _util  # noqa: F401
from _util import Timings, add_common_args, calibrate_bn, cifar10, cifar_model, setup, sync
from reference_mrc import reference_mrc

CACHE = _util.ROOT / ".cache" / "bench_mrc"
ALL_VARIANTS = ("ref", "cache", "exact", "fold", "default")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def prepare(args, device):
    """(model float32 NCHW eval, adversarial images [N,3,32,32], labels [N], description), cached on disk."""
    key = f"w{args.width}-seed{args.seed}-n{args.examples}-steps{args.train_steps}"
    path = CACHE / f"set-{key}.pt"
    torch.manual_seed(args.seed)
    model = cifar_model(args.width)
    if path.is_file():
        data = torch.load(path, weights_only=True)
        model.load_state_dict(data["model"])
        model.eval()
        return model.to(device), data["images"].to(device), data["labels"].to(device), data["desc"]
    from rift_dist.attacks import pgd
    from rift_dist.config import PrecisionConfig
    from rift_dist.precision import resolve_precision

    prec = resolve_precision(PrecisionConfig(), device)
    calib, calib_y, _ = cifar10(args, 2000, "train", seed=args.seed + 100)
    model = model.to(device)
    if args.train_steps:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(args.seed)
        model.train()
        for _ in range(args.train_steps):
            idx = torch.randint(0, len(calib), (128,), generator=g)
            with prec.autocast():
                loss = torch.nn.functional.cross_entropy(model(calib[idx].to(device)).float(), calib_y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        desc_model = f"briefly trained ({args.train_steps} clean SGD steps, batch 128, bf16) then BN-calibrated"
    else:
        desc_model = "untrained, BN-calibrated"
    calibrate_bn(model, calib.to(device))
    x, y, desc = cifar10(args, args.examples, "train", seed=args.seed)
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    adv = []
    for i in range(0, len(x), 128):
        noise = torch.empty(x[i:i + 128].shape).uniform_(-1, 1, generator=g).to(device)
        adv.append(pgd(model, x[i:i + 128], y[i:i + 128], 8 / 255, 2 / 255, 10, True, noise=noise,
                       autocast=prec.autocast))
    images = torch.cat(adv)
    desc = f"{desc_model}; fixed set: PGD-10 (8/255) examples of {desc}"
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "images": images.cpu(),
                "labels": y.cpu(), "desc": desc}, path)
    return model.eval(), images, y, desc


def pick_modules(names: list[str], n: int) -> list[str]:
    """``n`` module names evenly spaced in network order (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(names):
        return list(names)
    idx = sorted({round(i * (len(names) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [names[i] for i in idx]


def variant_generator(kind: str, model, names, images, labels, args, device):
    """A generator yielding (name, row) for one contender (see the module docstring)."""
    from rift_dist.config import MRCConfig, PrecisionConfig
    from rift_dist.precision import Precision, resolve_precision
    from rift_dist.stages.criticality import iter_criticality, pass_order

    n = len(images)
    if kind == "ref":
        def gen():
            for name in names:
                row = reference_mrc(model, name, images, labels, epsilon_w=0.1, num_iterations=args.iterations,
                                    lr=1.0, batch_size=args.batch_size,
                                    order=lambda t, name=name: pass_order(args.seed, name, t, n).to(device))
                yield name, row
        return gen()
    cfg = MRCConfig(num_iterations=args.iterations, batch_size=args.batch_size)
    if kind == "default":
        prec = resolve_precision(PrecisionConfig(), device)
        m = prec.prepare_model(copy.deepcopy(model))
    else:
        cfg.cache_dtype = "float32"
        cfg.fuse_eval = kind in ("exact", "fold")
        prec = Precision(device.type, None, False, fold_bn=kind == "fold")
        m = model
    return iter_criticality(m, names, images, labels, cfg, prec, seed=args.seed)


def describe_variant(kind: str, device) -> str:
    """One line saying what a contender runs."""
    from rift_dist.config import PrecisionConfig
    from rift_dist.precision import resolve_precision

    return {
        "ref": "authors' way: model copy per module, whole-network forwards, float32 NCHW",
        "cache": "activation cache, float32 NCHW (no fused evaluation, no folding)",
        "exact": "cache + fused evaluation, float32 NCHW",
        "fold": "cache + fused evaluation + BatchNorm folding, float32 NCHW",
        "default": f"defaults: cache (autocast dtype) + fused evaluation + folding, "
                   f"{resolve_precision(PrecisionConfig(), device).describe().split(', cpu flags')[0]}",
    }[kind]


def warm_up(model, images, labels, device) -> None:
    """One untimed whole-network forward + input-gradient backward on the fixed set, in float32 NCHW
    and in the default precision, so kernel set-up (oneDNN primitives, cuDNN plans) is not timed."""
    import torch.nn.functional as F
    from rift_dist.config import PrecisionConfig
    from rift_dist.precision import Precision, resolve_precision

    for prec in (Precision(device.type, None, False), resolve_precision(PrecisionConfig(), device)):
        m = prec.frozen_model(prec.prepare_model(copy.deepcopy(model)))
        x = prec.prepare_input(images).clone().requires_grad_(True)
        with prec.autocast():
            loss = F.cross_entropy(m(x).float(), labels)
        torch.autograd.grad(loss, x)
        sync(device)


def _proc_status_kib(key: str) -> int:
    """``key`` (e.g. VmRSS, VmHWM) from /proc/self/status in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux: ``5`` into /proc/self/clear_refs).

    Without it, ``ru_maxrss`` keeps the peak of whatever ran before the search (imports, data
    preparation) and hides the search's own peak.  Returns False where the kernel does not allow it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_kib() -> int:
    """Resident set size now, KiB."""
    return _proc_status_kib("VmRSS")


def peak_rss_kib() -> int:
    """Resident set high-water mark since the last :func:`reset_peak_rss`, KiB."""
    return _proc_status_kib("VmHWM")


def memory_child(args) -> None:
    """Child process: run the default search (cache on/off) over the modules; print peak RSS as JSON."""
    device = torch.device(args.device)
    from rift_dist.config import MRCConfig, PrecisionConfig
    from rift_dist.models import module_names
    from rift_dist.precision import resolve_precision
    from rift_dist.stages.criticality import iter_criticality

    model, images, labels, _ = prepare(args, device)
    names = pick_modules(module_names(model), args.modules)
    prec = resolve_precision(PrecisionConfig(), device)
    m = prec.prepare_model(copy.deepcopy(model))
    cfg = MRCConfig(num_iterations=args.iterations, batch_size=args.batch_size, use_cache=args.memory_child == "cache")
    hwm_reset = reset_peak_rss()
    before = current_rss_kib() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = dict(iter_criticality(m, names, images, labels, cfg, prec, seed=args.seed))
    peak = peak_rss_kib() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_before_mib": before / 1024, "rss_peak_mib": peak / 1024, "peak_reset": hwm_reset,
           "cache_mib": {n: r["cache_bytes"] / 2 ** 20 for n, r in rows.items()}}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("MEMORY " + json.dumps(out), flush=True)


def run_memory(args) -> None:
    """Peak RSS of the default search with and without the cache, each in a fresh process."""
    res = {}
    for mode in ("nocache", "cache"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--modules", str(args.modules), "--iterations",
               str(min(args.iterations, 2)), "--examples", str(args.examples), "--seed", str(args.seed),
               "--train-steps", str(args.train_steps), "--width", str(args.width), "--device", args.device, "--threads", str(args.threads or 0),
               "--cache-dir", args.cache_dir] + (["--data-dir", args.data_dir] if args.data_dir else []) + \
              (["--allow-synthetic"] if args.allow_synthetic else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("MEMORY ")]
        if not line:
            print(f"memory child ({mode}) failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            return
        res[mode] = json.loads(line[0][7:])
    how = ("high-water mark reset just before the search" if res["cache"].get("peak_reset")
           else "ru_maxrss: includes whatever peaked before the search")
    print(f"\nmemory (default settings; fresh process each; resident set size incl. model, data and torch; {how}):")
    for mode in ("nocache", "cache"):
        r = res[mode]
        extra = f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else ""
        print(f"  {mode:<8}: RSS before the search {r['rss_before_mib']:.0f} MiB, peak {r['rss_peak_mib']:.0f} MiB "
              f"(+{r['rss_peak_mib'] - r['rss_before_mib']:.0f} MiB){extra}")
    print("  cache size per module (MiB; 0 = runs from the images): "
          + ", ".join(f"{n} {v:.0f}" for n, v in res["cache"]["cache_mib"].items()))


def main() -> None:
    """Parse the arguments, run the comparison, print the table and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--modules", type=int, default=0, help="evenly spaced subsample of modules (0 = all 21)")
    p.add_argument("--iterations", type=int, default=10, help="ascent passes (10 in the paper)")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = the paper's; smaller for dry runs)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0, help="clean SGD steps before calibration (0 = untrained)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--resume", action="store_true", help="continue a killed run from its measurement log")
    p.add_argument("--memory", action="store_true", help="also measure peak memory with and without the cache")
    p.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        memory_child(args)
        return
    device = setup(args)
    from rift_dist.models import module_names

    model, images, labels, desc = prepare(args, device)
    names = pick_modules(module_names(model), args.modules)
    print(f"# model: ResNet-18 width {args.width}, {desc}", flush=True)
    print(f"# {len(names)} module(s), {args.iterations} pass(es), batch {args.batch_size}, eps_w 0.1", flush=True)
    if args.memory_only:
        run_memory(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    if "ref" not in variants:
        raise SystemExit("--variants must include ref (everything is compared with it)")
    for v in variants:
        print(f"#   {v:<8} {describe_variant(v, device)}", flush=True)
    # every measurement is appended to a log as it is taken; --resume picks a killed run up where it stopped
    log_path = CACHE / (f"log-w{args.width}-seed{args.seed}-n{args.examples}-steps{args.train_steps}-T{args.iterations}"
                        f"-b{args.batch_size}-m{args.modules}-t{torch.get_num_threads()}-{'_'.join(variants)}.jsonl")
    done: dict[tuple[str, str], dict] = {}
    if args.resume and log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["variant"], rec["module"])] = rec
    todo = [n for n in names if not all((v, n) in done for v in variants)]
    if len(todo) < len(names):
        print(f"# resuming from {log_path}: {len(names) - len(todo)} module(s) already measured", flush=True)
    elif log_path.is_file():
        log_path.unlink()
    CACHE.mkdir(parents=True, exist_ok=True)
    warm_up(model, images, labels, device)
    gens = {v: variant_generator(v, model, todo, images, labels, args, device) for v in variants}
    with log_path.open("a") as log:
        for name in todo:
            for v in variants:
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                got, row = next(gens[v])
                sync(device)
                rec = {"variant": v, "module": name, "wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
                       "row": row}
                assert got == name, (got, name)
                done[(v, name)] = rec
                log.write(json.dumps(rec) + "\n")
                log.flush()
            print(f"#   {name:<20} " + " ".join(f"{v} {done[(v, name)]['wall']:6.1f}s/{done[(v, name)]['cpu']:5.1f}c"
                                             for v in variants), flush=True)
    rows = {v: {n: done[(v, n)]["row"] for n in names} for v in variants}
    times = {v: Timings([done[(v, n)]["wall"] for n in names], [done[(v, n)]["cpu"] for n in names]) for v in variants}

    ref = rows["ref"]
    print(f"\n{'module':<20} {'unit':>4} {'cache MiB':>9} " + " ".join(f"{'mrc ' + v:>12}" for v in variants)
          + " " + " ".join(f"{'s ' + v:>10}" for v in variants))
    for i, name in enumerate(names):
        d = rows.get("default", rows[variants[-1]])[name]
        print(f"{name:<20} {d.get('unit', 0):>4} {d.get('cache_bytes', 0) / 2 ** 20:>9.1f} "
              + " ".join(f"{rows[v][name]['mrc']:>12.5f}" for v in variants) + " "
              + " ".join(f"{times[v].wall[i]:>10.1f}" for v in variants))

    total = {v: (sum(times[v].wall), sum(times[v].cpu)) for v in variants}
    ref_vals = [ref[n]["mrc"] for n in names]
    print(f"\n{'variant':<8} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'max |dMRC|':>11} {'max rel':>9} "
          f"{'chosen':>16} {'chosen*':>16} {'spearman':>8}")
    for v in variants:
        vals = [rows[v][n]["mrc"] for n in names]
        diffs = [abs(a - b) for a, b in zip(vals, ref_vals)]
        rel = max(d / max(abs(r), 1e-12) for d, r in zip(diffs, ref_vals))
        chosen = min(names, key=lambda n: rows[v][n]["mrc"])
        inner = names[1:-1] if len(names) > 2 else names
        chosen_inner = min(inner, key=lambda n: rows[v][n]["mrc"])
        rho = spearman(vals, ref_vals) if len(names) > 2 else float("nan")
        print(f"{v:<8} {total[v][0]:>8.1f} {total[v][1]:>8.1f} {total['ref'][0] / total[v][0]:>7.2f} "
              f"{total['ref'][1] / total[v][1]:>7.2f} {max(diffs):>11.2e} {rel:>9.1e} {chosen:>16} {chosen_inner:>16} "
              f"{rho:>8.4f}")
    print("(x = speed-up over ref in total seconds; chosen* = lowest MRC excluding the first and last module; "
          "max rel = |dMRC| / |MRC_ref|)")
    if args.iterations != 10 or len(names) != 21:
        print(f"# quick run ({len(names)} modules, T = {args.iterations}). Per module, in whole-network forward "
              f"equivalents with f = the module's tail share and a backward ~ f: ref costs (T+1) + T(1+f), cache "
              f"(T+1)f + 2Tf, exact/fold/default 2Tf + f -- the speed-up changes by a few percent between T = 2 and 10.")
    if args.memory:
        run_memory(args)


if __name__ == "__main__":
    main()
