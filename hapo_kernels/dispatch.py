"""Which implementation runs (DESIGN section 2).

CUDA tensors run the Triton kernels. With ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors through Triton's interpreter (slow: for tests). CPU tensors otherwise run the
chunked torch path. ``force_backend`` pins one for a block of code (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("triton", "cpu")
_forced: contextvars.ContextVar = contextvars.ContextVar("hapo_backend", default=None)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _release(version: str) -> tuple:
    """``"3.6.0+git"`` -> ``(3, 6)``: the two leading numbers of a version string."""
    parts = version.split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


@functools.lru_cache(maxsize=None)
def interpreter_problem(triton_version: str, numpy_version: str):
    """Why Triton's interpreter cannot run our kernels with these versions, or None.

    The kernels skip masked rows with a loop bound read from memory
    (``range(0, n_cols, BLOCK_V)``). Triton's interpreter before 3.7 turns such a bound
    into an int with ``int(array)`` on a 1-element array, which NumPy 2.4 made an error
    (Triton 3.7 squeezes the array first). Compiled kernels are unaffected."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run these kernels with NumPy "
                f"{numpy_version} (it converts 1-element arrays to int, an error since NumPy "
                f"2.4; fixed in Triton 3.7). Install 'numpy<2.4' or 'triton>=3.7', or unset "
                f"TRITON_INTERPRET to use the CPU path.")
    return None


def installed_interpreter_problem():
    """``interpreter_problem`` for the installed Triton and NumPy (None without Triton)."""
    try:
        import numpy
        import triton
    except ImportError:
        return None
    return interpreter_problem(triton.__version__, numpy.__version__)


def check_interpreter() -> None:
    """Raise a clear error before the interpreter fails deep inside a kernel."""
    problem = installed_interpreter_problem()
    if problem:
        raise RuntimeError(problem)


def backend_for(tensor: torch.Tensor) -> str:
    forced = _forced.get()
    if forced == "cpu":
        if tensor.is_cuda:
            raise ValueError("the cpu backend runs on CPU tensors; got a CUDA tensor")
        return "cpu"
    if tensor.is_cuda:
        return "triton"
    if forced == "triton" or triton_interpret():
        if not triton_interpret():
            raise ValueError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                             "the first import of hapo_kernels")
        check_interpreter()
        return "triton"
    return "cpu"


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value):
    """``var`` holds ``value`` inside the ``with`` block and its old value after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def force_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    return scoped(_forced, name)
