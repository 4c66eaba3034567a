"""The precision policy, in one place: which floating dtype computes on this hardware.

``auto`` (the default of ``--dtype``, of ``build(dtype=)`` and of the training ``precision``
field) is bf16 where bf16 matrix products are native and fp32 elsewhere. CPUs differ by two
orders of magnitude here: with AVX-512 BF16 or AMX a bf16 matmul runs ~3-4x faster than fp32;
on an AVX2-only CPU oneDNN emulates it and it runs ~100x *slower* (docs/speed.md). An explicit
bf16 request is honoured everywhere, with one warning where it will be slow.

Every results JSON and checkpoint records :func:`hardware_record`, so a figure always travels
with the machine that measured it.
"""
from __future__ import annotations

import logging
import platform
from functools import lru_cache
from typing import Any

import torch

from .errors import DisconError

log = logging.getLogger(__name__)

AUTO = "auto"
NAMES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
         "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
         "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_said: set[tuple] = set()  # messages already logged in this process


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_native_bf16() -> bool:
    # oneDNN's own check first: it honours ONEDNN_MAX_CPU_ISA, so a capped ISA (or a CPU
    # without AVX-512 BF16 / AMX) reads as not native, exactly as oneDNN will run it.
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        return bool(check())
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matrix products run natively (fast) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available()
                    and torch.cuda.is_bf16_supported(including_emulation=False))
    return device.type == "cpu" and _cpu_native_bf16()


def _once(level: int, msg: str, *args) -> None:
    key = (msg, *args)
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


def resolve_dtype(value: Any, device: str | torch.device = "cpu",
                  what: str = "dtype") -> torch.dtype:
    """``auto`` (or None), a name (``fp32``, ``bf16``, ``fp16``, ...) or a floating torch.dtype
    -> the torch.dtype to compute in on ``device``. Logs the choice once per process; warns once
    when bf16 is asked for where it is not native."""
    device = torch.device(device)
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        native = native_bf16(device)
        dtype = torch.bfloat16 if native else torch.float32
        _once(logging.INFO, "precision auto -> %s on %s (%s)", SHORT[dtype], device.type,
              describe(device))
        return dtype
    if isinstance(value, torch.dtype) and value.is_floating_point:
        dtype = value
    elif isinstance(value, str) and value.strip().lower() in NAMES:
        dtype = NAMES[value.strip().lower()]
    else:
        raise DisconError(f"{what} must be auto, a floating torch.dtype or one of "
                          f"{', '.join(NAMES)}, got {value!r}")
    if dtype == torch.bfloat16 and device.type == "cpu" and not native_bf16(device):
        _once(logging.WARNING, "bf16 requested on a CPU without native bf16 matmul (%s): it "
              "runs emulated, much slower than fp32 here; use auto or fp32", describe(device))
    return dtype


def resolve_precision(value: str, device: str | torch.device = "cpu") -> str:
    """The training ``precision`` field (``auto | fp32 | bf16``) -> ``fp32`` or ``bf16``."""
    return SHORT[resolve_dtype(value, device, what="precision")]


def describe(device: str | torch.device = "cpu") -> str:
    r = hardware_record(device)
    if r["device"] == "cuda":
        return f"{r.get('gpu', 'no CUDA device')}, bf16 native: {r['native_bf16']}"
    return f"{r['cpu_model']}, capability {r['cpu_capability']}, bf16 native: {r['native_bf16']}"


def hardware_record(device: str | torch.device = "cpu", dtype: Any = None) -> dict[str, Any]:
    """What a measurement ran on: recorded in every results JSON and checkpoint."""
    device = torch.device(device)
    rec: dict[str, Any] = {
        "device": device.type, "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__}
    if device.type == "cuda" and torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        rec["dtype"] = SHORT.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else dtype
    return rec
