"""Numeric precision: whether bf16 is native on a device, what a precision name means, and the run's own precision.

The policy (docs/precision.md) in three rules:

1. ``auto`` means bfloat16 only where the hardware computes it natively (a CPU with avx512_bf16 or AMX, a CUDA GPU
   with bf16), float32 everywhere else, where bf16 is emulated and slower.
2. A run's activations have one precision, resolved once when the run is sampled and recorded in its store
   (``precision``). Every later pass that computes the same layer activations of the run's photos again — the unit
   lens's top-k pass, an image placed on the run by ``atlas inspect`` or the live page — computes them in the run's
   recorded precision (:func:`run_precision`), with the same kernels, so the same photo gives the same numbers in
   every stage; a resumed run keeps its recorded precision under ``auto`` on any machine.
3. bfloat16 elsewhere only where the result is re-measured in float32: icon optimisation (the finished icons are
   scored, and the best attempt picked, in float32). Attribution, class scores, occlusion, invariance, layouts,
   grids and the whitening are float32 on every machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from atlas.errors import AtlasError

PRECISIONS = ("auto", "float32", "bfloat16")  # the names a setting takes (fp32 and bf16 are accepted as aliases)
_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


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


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The concrete precision, ``"float32"`` or ``"bfloat16"``, that ``precision`` (auto, float32/fp32,
    bfloat16/bf16) means on ``device``: auto is bfloat16 where :func:`native_bf16`, else float32."""
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if precision not in _NAMES:
        raise AtlasError(f"unknown precision '{precision}'; choose auto, float32 or bfloat16")
    return _NAMES[precision]


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name (auto, float32/fp32, bfloat16/bf16); None means float32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bfloat16" else None


def run_precision(meta: Mapping) -> str:
    """The precision a run's activations were computed in: the store's recorded ``precision`` (runs sampled before it
    was recorded, and runs with attribution, are float32)."""
    value = meta.get("precision") or "float32"
    if value not in ("float32", "bfloat16"):
        raise AtlasError(f"the run records an unknown precision {value!r}; sample it again into a new folder")
    return str(value)


@contextlib.contextmanager
def computing_in(precision: str, device_type: str) -> Iterator[None]:
    """Autocast to bfloat16 for a concrete ``precision`` of "bfloat16"; nothing (float32) for "float32"."""
    with torch.autocast(device_type, torch.bfloat16, enabled=precision == "bfloat16"):
        yield
