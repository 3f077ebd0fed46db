"""pytest-benchmark suites: ``pytest bench/ --benchmark-only``.

Files here are named ``bench_*.py`` (so the unit-test run, ``testpaths = tests``, never
collects them); this conftest collects them when pytest is pointed at ``bench/``. Each test
sets ``benchmark.group`` to the op and shape, so implementations of one op sit side by side.
Peak memory above the inputs (bench/timing.py) and the byte floor go in ``extra_info`` (in
``--benchmark-json``) and in a table at the end of the run.

Environment knobs: ``HAPO_BENCH_TOKENS`` / ``HAPO_BENCH_VOCAB`` (comma lists) for the shapes
of bench_logprobs.py, ``HAPO_BENCH_COMPILE=1`` to include torch.compile on CPU (each compile
costs ~30-60 s on 2 cores; on CUDA it is on by default), ``HAPO_BENCH_THREADS`` (default 2).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.suite import MEMORY_ROWS


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; don't add it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _threads():
    """Fixed torch thread count on CPU (default 2: the issue's setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HAPO_BENCH_THREADS", "2")))
    yield
    torch.set_num_threads(before)



def pytest_terminal_summary(terminalreporter):
    if not MEMORY_ROWS:
        return
    from tabulate import tabulate
    rows = [[g, name, f"{1e3 * t:.2f}", "n/a" if p is None else f"{p / 2**20:.1f}",
             f"{f / 2**20:.1f}", f"{f / t / 1e9:.2f}" if t else ""]
            for g, name, t, p, f in MEMORY_ROWS]
    terminalreporter.write_sep("-", "hapo-kernels: median time, peak extra memory, byte floor")
    terminalreporter.write_line(tabulate(rows, headers=["group", "implementation", "median ms",
                                                        "peak extra MiB", "floor MiB",
                                                        "GB/s (floor)"], tablefmt="github",
                                         disable_numparse=True))
