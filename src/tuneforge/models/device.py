"""Device and precision choice.

``auto`` means: CUDA when available, else CPU; bf16 where the hardware computes it natively, fp16 on older CUDA
GPUs, fp32 on CPUs without native bf16 (emulated bf16 measured ~4x slower than fp32 on such a CPU, and fp16 on CPU
is slower still).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from tuneforge.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


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


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``)."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(precision: str | None, device: str):
    """The ``torch.dtype`` for a precision name on a device.

    ``auto``: bf16 on CUDA GPUs that support it (Ampere and newer), fp16 on older CUDA GPUs, bf16 on a CPU with
    native bf16 (``avx512_bf16``/``amx_bf16``), else fp32. Explicit ``bf16`` on a CPU without native bf16 is
    allowed but logs a warning (emulated, ~4x slower); explicit ``fp16`` on CPU logs a warning too.

    Raises:
        UserError: for an unknown precision name.
    """
    import torch

    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise UserError(f"model.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    on_cuda = str(device).startswith("cuda")
    if precision == "fp32":
        return torch.float32
    if precision == "auto":
        if on_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if str(device) == "cpu" and cpu_has_native_bf16():
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
