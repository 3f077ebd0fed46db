"""What the command lines share (``hapo-demo``, ``hapo-bench``, ``python -m bench.*``): the
default thread count and the checks of numeric arguments.

Thread policy: ``--threads`` if given, else as many torch threads as there are cores the
machine's 1-minute load average leaves idle, at least 1 (``default_threads``). A torch
parallel region waits for its slowest thread, so on a busy machine a thread that is
descheduled stalls every region; measured on a 2-core machine under load, the fused CPU loss
on one thread ran 2.5x faster than on two.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

__all__ = ["default_threads", "THREADS_HELP", "positive_int"]

THREADS_HELP = ("torch CPU threads (default: the cores the 1-minute load average leaves "
                "idle, at least 1)")


def default_threads(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Threads for a run started now: ``cores`` minus the 1-minute load average, rounded,
    at least 1 (``cores`` and ``load`` default to this machine's)."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - round(load)))


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1, else a usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

