"""Helpers of the pytest-benchmark suites (bench/conftest.py explains the suites)."""
from __future__ import annotations

import os

import pytest
import torch

from bench import ops, timing

MEMORY_ROWS = []


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_list(name, default):
    raw = os.environ.get(name)
    return [int(x) for x in raw.split(",")] if raw else default


def compile_enabled() -> bool:
    return os.environ.get("HAPO_BENCH_COMPILE", "1" if device() == "cuda" else "0") == "1"


def impl_names(op):
    return [impl.name for impl in ops.implementations(op)]


def run_benchmark(benchmark, op, impl_name, B, T, V, dtype, *, rotate=2, rounds=None):
    """Benchmark one implementation of ``op`` on ``[B, T+1, V]`` logits, grouped by shape."""
    dev = device()
    impl = {i.name: i for i in ops.implementations(op)}[impl_name]
    if impl_name == "torch.compile" and not compile_enabled():
        pytest.skip("torch.compile baseline off on CPU (HAPO_BENCH_COMPILE=1 turns it on)")
    try:
        fn = impl.build(dev)
    except ops.Unavailable as exc:
        pytest.skip(str(exc))
    shape = f"{B * T}x{ops.GROUP}" if op == "advantages" else \
        f"{B}x{T}x{V} {str(dtype).replace('torch.', '')}"
    benchmark.group = f"{ops.OPS[op]} | {shape} | {dev}"
    sets = [ops.make_inputs(op, B, T, V, dtype, dev, seed=s, shifted=impl.shifted)
            for s in range(rotate)]
    rot = timing.Rotation(sets)

    def call():
        out = fn(rot.next())
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    call()                                             # warm-up (and compile) first
    if rounds:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)
    peak = timing.measure_peak(lambda: fn(sets[0]), dev)
    floor = ops.floor_bytes(op, B, T, V, dtype)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(peak_extra_bytes=peak, floor_bytes=floor,
                                input_bytes=ops.input_bytes(sets[0]),
                                floor_gbps=floor / median / 1e9 if median else None)
    MEMORY_ROWS.append((benchmark.group, impl_name, median, peak, floor))

