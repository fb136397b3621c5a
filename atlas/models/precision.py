"""Numeric precision: whether bf16 is native on a device, and the autocast dtype a precision name means."""

from __future__ import annotations

from pathlib import Path

import torch

from atlas.errors import AtlasError


def native_bf16(device: str | torch.device) -> bool:
    """True where bf16 maths is native: CUDA with bf16, or a CPU with avx512_bf16/AMX (elsewhere bf16 is emulated, slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (auto, float32/fp32, bfloat16/bf16); None means float32."""
    names = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if precision not in names:
        raise AtlasError(f"unknown precision '{precision}'; choose auto, float32 or bfloat16")
    return names[precision]
