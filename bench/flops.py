"""Shared by the benches: this machine's matmul ceilings and the GFLOP a call does, so every table can say how close
to the limit it runs (measured in the same run as the figures it is compared with).

    sys.path.append(str(Path(__file__).parent)); import flops   # appended, so bench/inspect.py shadows nothing
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def matmul_gflops(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best GFLOP/s of square matrix products in ``dtype`` on this CPU with torch's threads. The size adapts so one
    product takes ~0.1 s (up to 2048): where bf16 is emulated (no avx512_bf16/AMX) it is hundreds of times slower."""
    n = 256
    while n < 2048:
        a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
        start = time.perf_counter()
        a @ b
        if time.perf_counter() - start > 0.02:
            break
        n *= 2
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def ceilings() -> dict[str, float]:
    return {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}


def gflop(fn) -> float:
    """GFLOP of one call of ``fn()`` (torch's flop counter: convolutions and matrix products, forward-mode tangents
    included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class _Flops(TorchDispatchMode):
    """torch's flop formulas without FlopCounterMode's module tracker, whose tensor hooks break ``autograd.grad`` inside
    vmap (batched VJPs: "A leaf node was passed to _will_engine_execute_node ..."). No per-module breakdown."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        count = flop_registry.get(func._overloadpacket)
        if count is None:  # as FlopCounterMode: an op without a formula may decompose into ops with one
            with self:
                if (out := func.decompose(*args, **kwargs)) is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def gflop_vjp(fn) -> float:
    """:func:`gflop` for calls that run ``autograd.grad`` under vmap (batched VJPs), where FlopCounterMode fails."""
    with _Flops() as counter:
        fn()
    return counter.total / 1e9


def share(rate: float, limits: dict[str, float]) -> str:
    """``rate`` GFLOP/s as a share of each ceiling, e.g. '74 GFLOP/s: 50% of fp32, 24,000% of bf16'."""
    parts = [f"{100 * rate / limit:,.0f}% of {name}" for name, limit in limits.items() if limit > 0]
    return f"{rate:,.0f} GFLOP/s: " + ", ".join(parts)


def ceiling_line(limits: dict[str, float]) -> str:
    return "matmul ceilings (this run): " + ", ".join(f"{name} {value:,.1f} GFLOP/s" for name, value in limits.items())
