"""Device and precision choice.

``auto`` means: CUDA when available, else CPU; on CUDA bf16 where supported (Ampere and newer), else fp16; on CPU
fp32, except bf16 on CPUs with AMX (``amx_bf16``), whose bf16 tile matmuls are several times faster than fp32.

Why not bf16 on every CPU with ``avx512_bf16``: measured on such a CPU here (2 cores, Xeon with avx512_bf16, no
AMX), a bf16 matmul ran at the fp32 rate (137 vs 139 GFLOP/s) and a Llama training step (hidden 256, 4 layers,
8 x 256 tokens) was 1.0-2.0x *slower* in bf16 (elementwise work is not accelerated), while pure-bf16 weights lose
small updates. Without any native bf16 it is emulated (~4x slower, ENVIRONMENT.md). An explicit ``bf16`` is always
honoured; it warns where bf16 is emulated.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from tuneforge.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Pins what `precision: auto` means on this machine (reproducible numbers across CPUs with and without AMX).
AUTO_PRECISION_ENV = "TUNEFORGE_AUTO_PRECISION"


def resolve_device(spec: str | None = "auto") -> str:
    """The torch device string for ``spec``.

    Args:
        spec: ``"auto"`` (or ``None``) → ``"cuda"`` when CUDA is available, else ``"cpu"``; anything else
            (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is checked and returned as given.

    Raises:
        UserError: when CUDA is asked for but not available, or the string is not a torch device.
    """
    import torch

    if spec in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"model.device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"model.device is {spec!r} but CUDA is not available here; use device: auto or cpu")
    return str(spec)


@functools.lru_cache(maxsize=4)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags listed in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        return frozenset(Path(cpuinfo).read_text(errors="replace").split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``)."""
    flags = cpu_flags(cpuinfo)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has AMX bf16 tile units (``amx_bf16``): the only CPUs where ``auto`` picks bf16."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def resolve_dtype(precision: str | None, device: str):
    """The ``torch.dtype`` for a precision name on a device.

    ``auto``: what the environment variable ``TUNEFORGE_AUTO_PRECISION`` says when set (e.g. ``fp32``, to get the
    same numbers on every machine: the test suite sets it), else bf16 on CUDA GPUs that support it (Ampere and newer), fp16 on older CUDA GPUs, bf16 on a CPU with
    AMX (``amx_bf16``), else fp32 (see the module docstring for the measurements behind this). Explicit ``bf16``
    on a CPU without native bf16 (neither ``avx512_bf16`` nor ``amx_bf16``) is allowed but logs a warning
    (emulated, ~4x slower); explicit ``fp16`` on CPU logs a warning too.

    Raises:
        UserError: for an unknown precision name.
    """
    import torch

    precision = precision or "auto"
    if precision == "auto" and os.environ.get(AUTO_PRECISION_ENV):
        precision = os.environ[AUTO_PRECISION_ENV]
        if precision not in PRECISIONS:
            raise UserError(f"environment variable {AUTO_PRECISION_ENV}={precision!r} is not one of "
                            f"{', '.join(PRECISIONS)}")
    if precision not in PRECISIONS:
        raise UserError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    on_cuda = str(device).startswith("cuda")
    if precision == "fp32":
        return torch.float32
    if precision == "auto":
        if on_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if str(device) == "cpu" and cpu_has_amx_bf16():
            return torch.bfloat16
        return torch.float32
    if precision == "bf16":
        if str(device) == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "precision bf16 on a CPU without avx512_bf16/amx_bf16: bf16 is emulated here (~4x slower than "
                "fp32); use precision: fp32 or auto"
            )
        return torch.bfloat16
    if not on_cuda:
        log.warning("precision fp16 on %s is very slow (no native fp16 matmul); use precision: fp32 or auto", device)
    return torch.float16


def dtype_name(dtype) -> str:
    """Short name of a torch dtype (``"bf16"``, ``"fp16"``, ``"fp32"``) for logs and summaries."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
