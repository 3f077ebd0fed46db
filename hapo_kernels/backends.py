"""The one backend registry: which implementation serves which tensor (docs/design.md 2).

A backend is an object (in practice a package, ``hapo_kernels.cpu`` or
``hapo_kernels.triton``) with the four operations of ``Backend``. CUDA tensors run the Triton
kernels. With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's
interpreter (slow: tests). CPU tensors otherwise run the chunked torch path.
``force_backend`` pins one for a block of code (tests, benchmarks), in the current context
only; ``set_default_backend`` pins one for the process, threads included.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Tuple

import torch

if TYPE_CHECKING:
    from .inputs import LossInputs
    from .options import AdvantageOptions, LossOptions
    from .outputs import TokenResults

RowStats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Backend(Protocol):
    """What a backend provides. All inputs are validated; outputs are float32 ``[rows]``.

    ``row_stats``: per row ``(logp, entropy, lse, sum_pz)`` (0 on ignored rows), into
    ``out`` when given. ``grad_logits``: ``((onehot - p) g_logp - p (z - sum_pz) g_ent) / T``
    into ``out`` (which may be the logits). ``token_loss``: the fused token-level loss,
    results into ``out`` and, when ``grad`` is given, ``dL/dlogits`` into it.
    ``group_advantages``: float32 ``[N]`` advantages and int64 ``[P]`` replaced members of
    the groups ``rewards[offsets[p]:offsets[p+1]]`` (the member ``replace_index[p]`` when
    given, else the worst; the teacher's reward ``teacher_rewards[p]`` when given, else
    ``opts.teacher_reward``).
    """

    def row_stats(self, logits: torch.Tensor, target_ids: torch.Tensor, temperature: float,
                  ignore_index: int, *, out: Optional[RowStats] = None,
                  need_entropy: bool = True) -> RowStats:
        """float32 ``(logp, entropy, lse, sum_pz)`` per row; 0 on ignored rows."""
        ...

    def grad_logits(self, logits: torch.Tensor, target_ids: torch.Tensor, lse: torch.Tensor,
                    sum_pz: torch.Tensor, g_logp: Optional[torch.Tensor],
                    g_ent: Optional[torch.Tensor], temperature: float, ignore_index: int,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The logits' gradient from per-row upstream gradients of ``logp`` and ``entropy``."""
        ...

    def token_loss(self, logits: torch.Tensor, inputs: LossInputs, opts: LossOptions,
                   out: TokenResults, grad: Optional[torch.Tensor]) -> None:
        """The fused token-level loss into ``out``, its gradient into ``grad`` if given."""
        ...

    def group_advantages(self, rewards: torch.Tensor, offsets: torch.Tensor,
                         inject: Optional[torch.Tensor], opts: AdvantageOptions, *,
                         replace_index: Optional[torch.Tensor] = None,
                         teacher_rewards: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Group advantages with SSI substitution: ``(advantages, replaced)``."""
        ...

    def scale_gradient_(self, grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """``grad *= grad_output`` in place, without a host read of ``grad_output`` where
        that would synchronise (CUDA)."""
        ...


# name -> the module that implements ``Backend`` (imported on first use: triton is optional)
REGISTRY = {"triton": "hapo_kernels.triton", "cpu": "hapo_kernels.cpu"}
BACKENDS = tuple(REGISTRY)
_forced: contextvars.ContextVar = contextvars.ContextVar("hapo_backend", default=None)
# The process-wide choice (``set_default_backend``): every thread sees it. A context
# variable does not cross ``threading.Thread`` (a new thread starts from an empty
# context), so ``force_backend`` alone would not reach a data-loader or a worker thread.
_default: list = [None]


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET=1`` (Triton kernels on CPU tensors, through the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple:
    """``"3.6.0+git"`` -> ``(3, 6)``: the two leading numbers of a version string."""
    parts = version.split(".")
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts[:2])


@functools.cache
def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
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


def installed_interpreter_problem() -> Optional[str]:
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


def backend_name(tensor: torch.Tensor) -> str:
    """The name of the backend that serves ``tensor`` (see the module docstring)."""
    forced = _forced.get() or _default[0]
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


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (``BACKENDS``)."""
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    return importlib.import_module(REGISTRY[name])


def backend_for(tensor: torch.Tensor) -> Backend:
    """The backend that serves ``tensor``."""
    return get_backend(backend_name(tensor))


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    """``var`` holds ``value`` inside the ``with`` block and its old value after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def force_backend(name: str) -> contextlib.AbstractContextManager:
    """Run every op in the ``with`` block on backend ``name`` (``"cpu"`` or ``"triton"``).

    Scoped to the current context: asyncio tasks started inside inherit it, threads do not
    (a ``threading.Thread`` starts from an empty context); ``set_default_backend`` is the
    process-wide choice, which ``force_backend`` overrides.
    """
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    return scoped(_forced, name)


def set_default_backend(name: Optional[str]) -> Optional[str]:
    """Pin backend ``name`` for the whole process, every thread included (``None``: back to
    the choice by tensor). ``force_backend`` blocks still override it. Returns the previous
    default."""
    if name is not None and name not in REGISTRY:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)} or None")
    previous, _default[0] = _default[0], name
    return previous
