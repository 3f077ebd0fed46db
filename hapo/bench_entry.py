"""``hapo-bench``: the benchmark (``python -m bench``) from a source checkout.

The benchmark suite (``bench/``) is not installed with the package: it needs the baselines'
packages and writes its results next to the code. The console script finds a checkout (the
one an editable install points at, or the current directory) and runs its ``bench``; from a
plain wheel install it says how to get one and exits with status 2.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import integrations

__all__ = ["main", "find_checkout"]


def find_checkout(start: Optional[Path] = None) -> Optional[Path]:
    """The source checkout holding ``bench/__main__.py``: the directory above this package
    (an editable install), else ``start`` (default: the current directory) or a parent."""
    start = (start or Path.cwd()).resolve()
    for root in (Path(__file__).resolve().parent.parent, start, *start.parents):
        if (root / "bench" / "__main__.py").is_file() and (root / "hapo_kernels").is_dir():
            return root
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``bench.__main__.main(argv)`` from the checkout, or explain and return 2."""
    root = find_checkout()
    if root is None:
        url = integrations.GIT_URL.removeprefix("git+")
        print("hapo-bench runs the benchmark suite of a source checkout, which a wheel does "
              f"not install. Clone the repository ({url}), then run `make bench` or "
              "`python -m bench --quick` inside it (or `hapo-bench` from there).",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    bench_main = importlib.import_module("bench.__main__")
    result = bench_main.main(list(sys.argv[1:] if argv is None else argv))
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
