"""Kernel benchmarks: ``python -m bench`` (the runner) and ``pytest bench/ --benchmark-only``."""
