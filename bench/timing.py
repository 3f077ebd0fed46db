"""Timers, peak-memory probes and the copy-bandwidth probe used by every benchmark.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, median), peak
memory from ``torch.cuda.max_memory_allocated`` minus what was allocated before the call.

CPU: ``time.perf_counter`` around each call with torch's thread count fixed, median of many
calls. Peak memory is the process's resident-set high-water mark (``VmHWM``), reset to the
current RSS by writing ``5`` to ``/proc/self/clear_refs`` just before the call; the figure is
``VmHWM - RSS before the call``. ``tracemalloc`` cannot see torch's allocations, and torch's
CPU allocator does not cache, so RSS is the honest measure. Two things keep it honest:
glibc is told (``mallopt``) to serve every block over 64 KiB with ``mmap`` and never to raise
that threshold, so freed tensors leave the RSS at once, and ``malloc_trim(0)`` returns any
free heap before the baseline is read; otherwise the call could reuse already-resident free
memory and the delta would under-count. ``measure_peak_cpu`` on a known 64 MiB allocation
reads 64 MiB (checked in tests/test_bench.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from typing import Callable, Optional

import torch

_CLEAR_REFS = "/proc/self/clear_refs"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_libc = None


def _glibc():
    """glibc handle with a fixed mmap threshold, or None where it is not glibc/Linux."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)   # fixed: disables the dynamic raise
            lib.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_supported() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def measure_peak_cpu(fn: Callable[[], object]) -> Optional[int]:
    """Bytes of resident memory ``fn()`` needs above what is resident before it (None if the
    kernel does not let us reset the high-water mark)."""
    lib = _glibc()
    gc.collect()
    if lib is not None:
        lib.malloc_trim(0)
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024


def measure_peak_cuda(fn: Callable[[], object]) -> int:
    """Bytes allocated above the inputs (everything live before the call) at the peak."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak - before


def measure_peak(fn, device: str) -> Optional[int]:
    _glibc()
    return measure_peak_cuda(fn) if device == "cuda" else measure_peak_cpu(fn)


def time_stats(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 10,
               max_seconds: float = 5.0) -> dict:
    """``{"median": s, "min": s, "n": calls}`` of ``fn()``; ``fn`` rotates its own inputs
    (see ``Rotation``). CPU: at least 3 calls, then up to ``reps`` within ``max_seconds``.
    CUDA: ``do_bench`` (its own warm-up and repeat budget in ms, L2 flushed per call)."""
    if device == "cuda":
        import triton.testing
        rep = max(50, int(max_seconds * 100))
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="all")
        except (TypeError, ValueError, AssertionError):      # an older Triton: no "all"
            ms = triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
        ms = list(ms) if isinstance(ms, (list, tuple)) else [ms]
        return {"median": statistics.median(ms) / 1e3, "min": min(ms) / 1e3, "n": len(ms)}
    for _ in range(warmup):
        fn()
    # Process CPU time (all threads) beside wall time: on a shared, oversubscribed machine
    # the wall clock also counts waiting for a core, the CPU time does not.
    times, cpu, start = [], [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"median": statistics.median(times), "min": min(times), "n": len(times),
            "cpu_median": statistics.median(cpu)}


def median_time_s(fn, device: str, **kw) -> float:
    return time_stats(fn, device, **kw)["median"]


class Rotation:
    """Cycles through several input sets so repeated calls don't just re-read a warm cache."""

    def __init__(self, sets):
        self.sets, self.i = list(sets), 0

    def next(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return s


def rotation_count(set_bytes: int, device: str, cache_bytes: int = 256 << 20,
                   budget_bytes: Optional[int] = None) -> int:
    """How many input sets to rotate: enough to exceed the caches, within a memory budget."""
    n = max(1, min(4, -(-cache_bytes // max(set_bytes, 1))))
    if budget_bytes is not None:
        n = max(1, min(n, budget_bytes // max(set_bytes, 1)))
    return n


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in GB/s: a big ``dst.copy_(src)``, counting read + write bytes."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time_s(lambda: dst.copy_(src), device, warmup=2, reps=10, max_seconds=3.0)
    return 2 * src.numel() * src.element_size() / t / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu-{torch.get_num_threads()}thread"
