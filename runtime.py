"""Where and how to run: the device, the compute dtype and the CPU threads, decided once for every script.

The dtype policy: an explicit dtype always wins; "auto" takes bf16 only where it is fast. On CUDA that is any GPU
with bf16 support. On CPU it is decided by measuring, not from a list of CPU names: CPUs with native bf16 (AVX-512
BF16, AMX) run a bf16 matmul faster than fp32, while AVX2-only CPUs emulate it about 50x slower. bf16 means bf16
backbone weights plus autocast (`precision`); δ-mem's weights and state stay fp32 either way.
"""
import argparse
import os
import sys
import time
from contextlib import ExitStack

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure(device: str | None = None, dtype: str = "auto", threads: int | None = None):
    """(device, compute dtype) for a script: the device named, else cuda if available, else cpu; `threads` CPU
    threads (None: all cores); flush-to-zero on (denormal states stalled CPU training steps for 20–100 s)."""
    torch.set_num_threads(threads or os.cpu_count())
    torch.set_flush_denormal(True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, pick_dtype(dtype, device)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """A DTYPES name, or "auto": bf16 where it is fast, else fp32, printing the choice. On CUDA bf16 needs GPU
    support; on CPU a bf16 matmul must measure clearly faster than fp32 (CPUs without native bf16, e.g. AVX2-only,
    emulate it ~50x slower)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        why = "CUDA" if fast else "this GPU has no bf16"
    else:
        speedup = bf16_matmul_speedup()
        fast = speedup > 1.2
        why = (f"{'native' if fast else 'no native'} bf16 on this CPU: a bf16 matmul is "
               + (f"{speedup:.1f}x faster than fp32" if speedup >= 1 else f"{1 / speedup:.1f}x slower than fp32"))
    print(f"dtype: {'bfloat16' if fast else 'float32'} ({why})", file=sys.stderr)
    return torch.bfloat16 if fast else torch.float32


def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a (32 x 576) @ (576 x 1152) matmul on one CPU thread, best of 5 (a few ms; an
    emulated bf16 shows at the first try, 20-60x slower, and is not timed again)."""
    def best(a, b, reps):
        a @ b  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no waiting on threads that other processes delay
    try:
        a, b = torch.randn(32, 576), torch.randn(576, 1152)
        fp32 = best(a, b, 5)
        a, b = a.bfloat16(), b.bfloat16()
        bf16 = best(a, b, 1)
        if bf16 < 2 * fp32:
            bf16 = min(bf16, best(a, b, 4))
    finally:
        torch.set_num_threads(threads)
    return fp32 / bf16


def precision(device: torch.device, dtype: torch.dtype) -> ExitStack:
    """bf16 autocast when dtype is bf16 (a no-op otherwise); on CPU also the math attention kernel, because the fused
    CPU kernel's bf16 backward took 30% of a training step (torch.profiler, SmolLM2-135M, a 2-core CPU)."""
    stack = ExitStack()
    bf16 = dtype == torch.bfloat16
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    if bf16 and device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help that keeps the description's line breaks and shows each flag's default where it has one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
