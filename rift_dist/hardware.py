"""What this machine's processor can do, probed once: CPU flags, native bf16, the hardware line.

A leaf module (imports only torch), so that the precision policy (:mod:`rift_dist.precision`), the conv guard
(:mod:`rift_dist.models.conv_guard`) and benchmark headers can all ask without importing each other.
Decisions are made from what the machine reports (``/proc/cpuinfo`` flags, oneDNN's own bf16 check as the
fallback), never from a CPU model name.
"""

from __future__ import annotations

import functools

import torch

_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_REPORTED_FLAGS = frozenset({"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f",
                             "avx512_vnni", "avx2", "fma"})


@functools.lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU flags relevant to the numerics chosen here, read from ``/proc/cpuinfo``.

    Returns a subset of {amx_bf16, amx_tile, amx_int8, avx512_bf16, avx512_fp16, avx512f,
    avx512_vnni, avx2, fma}; empty where the file is missing (macOS, Windows) or unreadable.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(set(line.split(":", 1)[1].split()) & _REPORTED_FLAGS)
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AMX-BF16 or AVX512-BF16).

    Uses the ``/proc/cpuinfo`` flags; where those are unavailable, asks oneDNN
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), and says False if that fails too.
    """
    flags = cpu_features()
    if flags:
        return any(f in flags for f in _BF16_FLAGS)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_engine() -> str:
    """Which bf16 unit oneDNN will use on this CPU: "amx", "avx512_bf16" or "none"."""
    flags = cpu_features()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512_bf16" if cpu_has_bf16() else "none"


def hardware_summary(device: torch.device | str = "cpu") -> str:
    """One line naming the hardware and what it supports, for benchmark and log headers.

    CPU: model name, flags, the bf16 unit, torch's vector ISA and intra-op threads;
    CUDA: device name, compute capability and bf16 support.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        return (f"cuda {torch.cuda.get_device_name(idx)} (sm_{cap[0]}{cap[1]}), "
                f"bf16={'yes' if torch.cuda.is_bf16_supported() else 'no'}, torch {torch.__version__}")
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "?"
    return (f"cpu {name}, flags {','.join(sorted(cpu_features())) or 'none'}, bf16 unit {cpu_bf16_engine()}, "
            f"torch ISA {isa}, threads {torch.get_num_threads()}, torch {torch.__version__}")
