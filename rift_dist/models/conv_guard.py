"""A guard against CPU convolution kernels that crash the process (torch 2.14.1, AVX2-only CPUs).

The bug (issue 11): on AVX2-only AMD EPYC machines torch 2.14.1's CPU ``convolution_backward``
dies with SIGSEGV for a 1x1 stride-2 convolution with 4 input channels (channels_last; with NCHW
the same crash appears in MRC's weight-only backward of ``layer2.0.shortcut.0``).  A segfault
cannot be caught, so the guard finds such kernels *before* they run and routes around them:

1. **Probe** (:func:`probe`): every convolution signature of a model (in/out channels, kernel,
   stride, padding, dilation, groups, input H x W at the model's real input size) is run in a
   child process (``python -m rift_dist.models.conv_guard --child``) through forward and backward
   with every gradient mask autograd uses -- input+weight (training), weight only (MRC: the input
   does not require grad), input only (PGD attacks: frozen weights, with and without a bias as
   BatchNorm folding adds one) -- in float32 and, where the CPU has native bf16
   (:func:`rift_dist.precision.cpu_has_bf16`), bf16 under autocast; NCHW and channels_last; batch
   sizes 2, 16 and 32 (sizes whose forward would exceed ``_MAX_CASE_FLOP`` are skipped, the
   smallest is always run).  The child prints and flushes ``BEGIN <case>`` before and ``OK <case>``
   after every case; when it dies by a signal (or hangs past ``_CASE_TIMEOUT_S``), the case in
   progress is recorded as ``crash`` and a new child continues after it.
2. **Cache**: results are JSON in ``$RIFT_CONV_PROBE_CACHE`` or ``$XDG_CACHE_HOME/rift_dist/conv_probe``
   (default ``~/.cache/rift_dist/conv_probe``), one file ``<key>.json`` per machine kind, the key a
   hash of the torch version, the full ``flags`` line of ``/proc/cpuinfo``, torch's CPU capability
   (``torch.backends.cpu.get_cpu_capability()``) and the intra-op thread count.  Files are written
   atomically (tmp file + ``os.replace``) and merged when new signatures are probed, so concurrent
   processes (ranks, pytest workers) at worst probe the same case twice.
3. **Routing** (:func:`guard_model`, called by :func:`rift_dist.models.build_model_from`): if any
   native case of a (kernel, stride, in_channels) class crashes -- at any batch size, dtype,
   layout or mask -- every Conv2d of that class is routed: its ``__class__`` becomes
   :class:`GuardedConv2d` (still an ``nn.Conv2d``: same parameters, same ``state_dict`` keys,
   survives ``copy.deepcopy`` and therefore :func:`rift_dist.precision.fold_batchnorm`).  On CPU
   tensors its forward computes the same convolution without torch's convolution kernels (1x1:
   strided slicing + ``F.linear`` over channels; other kernels: ``F.unfold`` + matmul); on CUDA it
   is the normal convolution.  The safe route of each routed signature is probed in the child too.
   One ``logging`` line names the routed layers and the cache file.

``RIFT_CONV_GUARD`` = ``auto`` (default: probe and route what crashes), ``off`` (never route, no
probe) or ``force`` (route every Conv2d, no probe; for tests).  Only the CPU is probed, never CUDA.

Cost (measured on a 2-core AVX512-BF16 machine, 1 thread): the first call for a width-4 ResNet-18
is one child process -- about 3 s, most of it importing torch; a cached call reads one JSON file
(milliseconds).  Paper-width models take longer on the first call (bigger convolutions; see
``_MAX_CASE_FLOP``).  ``python -m rift_dist.models.conv_guard --report`` prints the crashing cases
recorded for this machine (and probes the tiny and paper ResNet-18 / WRN shapes first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

_MODES = ("auto", "off", "force")
_BATCHES = (2, 16, 32)
_MASKS = ("iw", "w", "i", "ib")  # input+weight, weight only, input only, input only with a bias
_MAX_CASE_FLOP = 4e8  # forward FLOPs above which a batch size is skipped (the smallest always runs)
_CASE_TIMEOUT_S = 120.0
_FAKE_CRASH_ENV = "RIFT_CONV_PROBE_FAKE_CRASH"  # test hook: child SIGSEGVs itself on cases containing this


# ------------------------------------------------------------------------------ configuration


def guard_mode() -> str:
    """The value of ``RIFT_CONV_GUARD``: "auto" (default), "off" or "force".

    Raises:
        ValueError: naming the variable and the accepted values, for anything else.
    """
    mode = os.environ.get("RIFT_CONV_GUARD", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"RIFT_CONV_GUARD={mode!r} is not understood; set it to auto, off or force (or unset it)")
    return mode


def cache_dir() -> Path:
    """Directory of the probe cache: ``$RIFT_CONV_PROBE_CACHE``, else ``$XDG_CACHE_HOME/rift_dist/conv_probe``,
    else ``~/.cache/rift_dist/conv_probe``."""
    if os.environ.get("RIFT_CONV_PROBE_CACHE"):
        return Path(os.environ["RIFT_CONV_PROBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rift_dist" / "conv_probe"


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_key() -> dict:
    """What the probe results depend on: torch version, CPU flags line, torch's CPU capability, threads."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001  (older torch)
        cap = "unknown"
    return {"torch": torch.__version__, "cpu_flags": _cpu_flags_line(), "cpu_capability": cap,
            "threads": torch.get_num_threads()}


def cache_file() -> Path:
    """This machine's cache file: ``cache_dir() / <sha256 of machine_key()>[:16].json``."""
    digest = hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{digest}.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return dict(data.get("cases", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _write_cache(path: Path, new: dict) -> None:
    """Merge ``new`` into the cache file atomically (tmp + os.replace); a failure to write is logged, not raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cases = _read_cache(path)
        cases.update(new)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"key": machine_key(), "cases": dict(sorted(cases.items()))}, fh, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("conv guard: could not write the probe cache %s (%s); set RIFT_CONV_PROBE_CACHE "
                       "to a writable directory", path, exc)


# ------------------------------------------------------------------------------ signatures and cases


@dataclass(frozen=True)
class ConvSig:
    """One convolution shape: Conv2d hyper-parameters plus the input's spatial size (pixels)."""

    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    h: int
    w: int

    def tag(self) -> str:
        """Stable text form, e.g. ``c4-o8-k1x1-s2x2-p0x0-d1x1-g1-32x32``."""
        k, s, p, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.padding, self.dilation))
        return f"c{self.cin}-o{self.cout}-k{k}-s{s}-p{p}-d{d}-g{self.groups}-{self.h}x{self.w}"

    @staticmethod
    def parse(tag: str) -> "ConvSig":
        """Inverse of :meth:`tag`."""
        c, o, k, s, p, d, g, hw = tag.split("-")
        pair = lambda t: tuple(int(v) for v in t[1:].split("x"))  # noqa: E731
        h, w = (int(v) for v in hw.split("x"))
        return ConvSig(int(c[1:]), int(o[1:]), pair(k), pair(s), pair(p), pair(d), int(g[1:]), h, w)

    def routing_class(self) -> tuple:
        """(kernel, stride, in_channels): the class routed as a whole when any of its cases crashes."""
        return (self.kernel, self.stride, self.cin)

    def forward_flop(self, batch: int) -> float:
        """Forward multiply-adds x 2 at ``batch`` images."""
        oh = (self.h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        ow = (self.w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return 2.0 * batch * self.cout * max(oh, 0) * max(ow, 0) * self.cin // self.groups * self.kernel[0] * self.kernel[1]


def _sig_of(conv: nn.Conv2d, h: int, w: int) -> ConvSig | None:
    if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        return None
    return ConvSig(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.dilation), conv.groups, h, w)


def _dtypes() -> tuple[str, ...]:
    from rift_dist.hardware import cpu_has_bf16

    return ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)


def cases_for(sig: ConvSig, route: str = "native") -> list[str]:
    """Case ids of ``sig``: ``<tag>|<dtype>|<layout>|b<batch>|<mask>|<route>``.

    ``route`` "native" covers every batch of ``_BATCHES`` within ``_MAX_CASE_FLOP`` (the smallest
    always); "guarded" (the safe route) only the smallest batch.
    """
    batches = [b for b in _BATCHES if b == _BATCHES[0] or sig.forward_flop(b) <= _MAX_CASE_FLOP]
    if route == "guarded":
        batches = batches[:1]
    return [f"{sig.tag()}|{dt}|{lay}|b{b}|{m}|{route}"
            for dt in _dtypes() for lay in ("nchw", "cl") for b in batches for m in _MASKS]


# ------------------------------------------------------------------------------ the safe route


def _safe_conv2d(x, weight, bias, stride, padding, dilation, groups):
    """conv2d without torch's convolution kernels: slicing + F.linear (1x1) or F.unfold + matmul.

    Shapes: x [B, C, H, W], weight [O, C / groups, kh, kw], bias [O] or None -> [B, O, H', W'],
    in x's memory format (channels_last in, channels_last out).  Zero padding only.
    """
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    b, c, h, w_ = x.shape
    o, cpg, kh, kw = weight.shape
    if groups == 1 and (kh, kw) == (1, 1):
        if padding != (0, 0):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        xs = x[:, :, :: stride[0], :: stride[1]]
        y = F.linear(xs.permute(0, 2, 3, 1), weight.reshape(o, cpg), bias).permute(0, 3, 1, 2)
        return y if cl else y.contiguous()
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, L]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w_ + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.reshape(b, groups, cpg * kh * kw, oh * ow)
    wm = weight.reshape(groups, o // groups, cpg * kh * kw)
    y = torch.matmul(wm.unsqueeze(0), cols).reshape(b, o, oh, ow)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, o, 1, 1)
    return y.contiguous(memory_format=torch.channels_last) if cl else y


class GuardedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose CPU forward avoids torch's convolution kernels (see :func:`_safe_conv2d`).

    Made by swapping a Conv2d's ``__class__`` (:func:`route_conv`), so parameters, buffers,
    ``state_dict`` keys and hooks are unchanged.  CUDA tensors (and non-zero padding modes or
    string padding, which are never routed) use the normal convolution.  Under CPU autocast the
    output dtype is that of a convolution under autocast (bf16), because ``F.linear``/``matmul``
    autocast the same way.  Results equal the normal convolution to float rounding (~1e-6
    relative in float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.padding_mode != "zeros" or not isinstance(self.padding, tuple):
            return super().forward(x)
        return _safe_conv2d(x, self.weight, self.bias, tuple(self.stride), tuple(self.padding),
                            tuple(self.dilation), self.groups)


def route_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Turn ``conv`` (in place) into a :class:`GuardedConv2d`; returns it.

    Raises:
        TypeError: when ``conv`` is not exactly an ``nn.Conv2d`` (or already guarded).
    """
    if type(conv) is GuardedConv2d:
        return conv
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"route_conv takes a plain nn.Conv2d, got {type(conv).__name__}")
    conv.__class__ = GuardedConv2d
    return conv


# ------------------------------------------------------------------------------ the child process


def _run_case(case: str) -> None:
    tag, dt, lay, bs, mask, route = case.split("|")
    sig = ConvSig.parse(tag)
    fake = os.environ.get(_FAKE_CRASH_ENV)
    if fake and fake in case:
        os.kill(os.getpid(), signal.SIGSEGV)
    g = torch.Generator().manual_seed(0)
    b = int(bs[1:])
    x = torch.randn(b, sig.cin, sig.h, sig.w, generator=g)
    w = torch.randn(sig.cout, sig.cin // sig.groups, *sig.kernel, generator=g)
    bias = torch.randn(sig.cout, generator=g) if mask == "ib" else None
    if lay == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(mask in ("iw", "i", "ib"))
    w.requires_grad_(mask in ("iw", "w"))
    fn = _safe_conv2d if route == "guarded" else F.conv2d
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        y = fn(x, w, bias, sig.stride, sig.padding, sig.dilation, sig.groups)
    y.backward(torch.ones_like(y))


def _child_main() -> int:
    cases = json.loads(sys.stdin.read())
    for case in cases:
        print(f"BEGIN {case}", flush=True)
        try:
            _run_case(case)
        except Exception as exc:  # noqa: BLE001  (an exception is not a crash: recorded, not routed)
            msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
            print(f"ERR {case} {msg}", flush=True)
            continue
        print(f"OK {case}", flush=True)
    return 0


def _run_children(cases: list[str]) -> dict[str, str]:
    """Run ``cases`` in child processes; a signal death (or hang) marks the case in progress ``crash``."""
    results: dict[str, str] = {}
    todo = list(cases)
    cmd = [sys.executable, "-m", "rift_dist.models.conv_guard", "--child", "--threads", str(torch.get_num_threads())]
    while todo:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        proc.stdin.write(json.dumps(todo))
        proc.stdin.close()
        current, hung = None, False
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], _CASE_TIMEOUT_S)
            if not ready:
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "BEGIN":
                current = rest
            elif word == "OK":
                results[rest] = "ok"
                current = None
            elif word == "ERR":
                case, _, msg = rest.partition(" ")
                results[case] = f"error: {msg}"
                current = None
        rc = proc.wait()
        err = proc.stderr.read()
        proc.stderr.close()
        proc.stdout.close()
        done = set(results)
        if current is not None and (hung or rc < 0):
            results[current] = "crash" if not hung else "hang"
            logger.warning("conv guard: probe case %s %s (%s); continuing after it", current,
                           "hung" if hung else "killed the child", "timeout" if hung else signal.Signals(-rc).name)
            done.add(current)
        elif rc != 0 or current is not None:
            logger.warning("conv guard: the probe child failed (exit %s) without a signal; %d case(s) unprobed, "
                           "nothing routed for them: %s", rc, len(todo) - len(done & set(todo)), err.strip()[-500:])
            break
        todo = [c for c in todo if c not in done]
    return results


def probe(sigs, route: str = "native") -> dict[str, str]:
    """Results (case id -> "ok" | "crash" | "hang" | "error: ...") of every case of ``sigs``.

    Reads the cache; runs only the missing cases, all in one child process (a new one after each
    crash), and merges them into the cache.  CPU only.
    """
    path = cache_file()
    cached = _read_cache(path)
    wanted = [c for s in sigs for c in cases_for(s, route)]
    missing = [c for c in dict.fromkeys(wanted) if c not in cached]
    if missing:
        t0 = time.perf_counter()
        new = _run_children(missing)
        logger.debug("conv guard: probed %d case(s) in %.1f s", len(new), time.perf_counter() - t0)
        if new:
            _write_cache(path, new)
            cached.update(new)
    return {c: cached[c] for c in wanted if c in cached}


def crashing(results: dict[str, str]) -> list[str]:
    """The case ids of ``results`` that killed (or hung) the child."""
    return sorted(c for c, r in results.items() if r in ("crash", "hang"))


# ------------------------------------------------------------------------------ the model hook


def conv_signatures(model: nn.Module, input_size: int | tuple[int, int]) -> dict[str, ConvSig]:
    """Every Conv2d of ``model`` (name -> :class:`ConvSig`) at a ``[1, 3, H, W]`` input.

    Spatial sizes come from one eval-mode forward of a single zero image in which every Conv2d is
    temporarily replaced by a function returning zeros of its output shape (so no convolution
    runs and the cost is that of the BatchNorm/ReLU layers at batch 1); training flags and all
    parameters and buffers are left as they were.  Convolutions that never run in the forward, or
    with string padding / a non-zero padding mode, are left out.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    seen: dict[str, ConvSig] = {}

    def fake_forward(name, mod):
        def fwd(x):
            sig = _sig_of(mod, int(x.shape[-2]), int(x.shape[-1]))
            if sig is None:
                return nn.Conv2d.forward(mod, x)
            seen[name] = sig
            oh = (sig.h + 2 * sig.padding[0] - sig.dilation[0] * (sig.kernel[0] - 1) - 1) // sig.stride[0] + 1
            ow = (sig.w + 2 * sig.padding[1] - sig.dilation[1] * (sig.kernel[1] - 1) - 1) // sig.stride[1] + 1
            return x.new_zeros(x.shape[0], sig.cout, oh, ow)
        return fwd

    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    dev, dt = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    try:
        for n, m in convs:
            m.forward = fake_forward(n, m)
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=dev, dtype=dt))
    finally:
        for _, m in convs:
            m.__dict__.pop("forward", None)
        for m, t in modes.items():
            m.training = t
    return seen


def guard_model(model: nn.Module, input_size: int | tuple[int, int] = 32) -> list[str]:
    """Route the Conv2d layers of ``model`` whose CPU kernels crash on this machine (in place).

    Args:
        model: a bare model (no wrappers), float32, any device.
        input_size: the model's input H (= W) or (H, W) in pixels: 32 for CIFAR, 64 for Tiny-ImageNet.

    Returns:
        the names of the routed layers (empty in mode "off" and where nothing crashes).

    Raises:
        ValueError: for a bad ``RIFT_CONV_GUARD`` value.
    """
    mode = guard_mode()
    if mode == "off":
        return []
    if mode == "force":
        names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, GuardedConv2d)]
    else:
        sigs = conv_signatures(model, input_size)
        if not sigs:
            return []
        results = probe(set(sigs.values()))
        bad = {ConvSig.parse(c.split("|")[0]).routing_class() for c in crashing(results)}
        names = [n for n, s in sigs.items() if s.routing_class() in bad]
        if names:
            routed = {s for n, s in sigs.items() if n in names}
            still = crashing(probe(routed, route="guarded"))
            if still:
                logger.error("conv guard: the safe route crashes too for %s; these layers may still crash", still)
    mods = dict(model.named_modules())
    routed_names = []
    for n in names:
        if type(mods[n]) in (nn.Conv2d, GuardedConv2d):
            route_conv(mods[n])
            routed_names.append(n)
    if routed_names:
        logger.info("conv guard (%s): routed %d Conv2d layer(s) around crashing CPU kernels: %s (probe cache %s)",
                    mode, len(routed_names), ", ".join(routed_names), cache_file())
    return routed_names


# ------------------------------------------------------------------------------ CLI


def _report(probe_first: bool) -> int:
    if probe_first:
        from rift_dist.models.resnet import resnet18, resnet34  # the bare architectures: no guard hooked
        from rift_dist.models.wide_resnet import wrn34_10

        for make, width, size in ((resnet18, 4, 32), (resnet18, 8, 32), (resnet18, 4, 64),
                                  (resnet18, 64, 32), (resnet34, 64, 32), (wrn34_10, 10, 32)):
            m = make(10, width)
            probe(set(conv_signatures(m, size).values()))
    path = cache_file()
    cases = _read_cache(path)
    key = machine_key()
    print(f"conv probe cache: {path}")
    print(f"torch {key['torch']}, cpu capability {key['cpu_capability']}, threads {key['threads']}")
    print(f"cpu flags: {key['cpu_flags']}")
    bad = crashing(cases)
    errs = sorted(c for c, r in cases.items() if r.startswith("error"))
    print(f"{len(cases)} case(s) probed, {len(bad)} crashing, {len(errs)} raising an exception")
    for c in bad:
        print(f"CRASH {c} ({cases[c]})")
    for c in errs:
        print(f"ERROR {c} {cases[c]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``--child`` (internal: run the case list on stdin), ``--report [--no-probe]`` (list crashing cases)."""
    ap = argparse.ArgumentParser(prog="python -m rift_dist.models.conv_guard", description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="print the crashing convolution cases of this machine")
    ap.add_argument("--no-probe", action="store_true", help="with --report: only read the cache")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        return _child_main()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return _report(not args.no_probe)


if __name__ == "__main__":
    sys.exit(main())
