"""Which implementation runs (DESIGN section 2).

CUDA tensors run the Triton kernels. With ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors through Triton's interpreter (slow: for tests). CPU tensors otherwise run the
chunked torch path. ``force_backend`` pins one for a block of code (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import contextvars
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
        return "triton"
    return "cpu"


@contextlib.contextmanager
def force_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
