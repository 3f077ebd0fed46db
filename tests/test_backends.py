"""Backend choice and the interpreter version check (hapo_kernels.backends)."""
import numpy
import pytest
import torch
import triton

from hapo_kernels import backends


@pytest.mark.parametrize("triton_v, numpy_v, broken", [
    ("3.6.0", "2.4.6", True),          # the GPU image's Triton with a new NumPy
    ("3.2.0", "2.5.2", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),
    ("3.9.0", "2.5.2", False),
    ("3.10.1+git1234", "2.4.0rc1", False),
    ("3.6.0+cu130", "2.4.0rc1", True),
])
def test_interpreter_problem(triton_v, numpy_v, broken):
    problem = backends.interpreter_problem(triton_v, numpy_v)
    assert (problem is not None) == broken
    if broken:
        assert triton_v in problem and "numpy<2.4" in problem


def test_check_interpreter_matches_the_installed_versions():
    expected = backends.interpreter_problem(triton.__version__, numpy.__version__)
    if expected is None:
        backends.check_interpreter()
    else:
        with pytest.raises(RuntimeError, match="numpy<2.4"):
            backends.check_interpreter()


def test_interpreter_dispatch_raises_before_any_kernel(monkeypatch):
    """With a broken pair the first call says why, instead of an InterpreterError."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter"):
        backends.backend_name(torch.zeros(2))


def test_cpu_tensors_without_the_interpreter_take_the_cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backends.backend_name(torch.zeros(2)) == "cpu"
    with pytest.raises(ValueError, match="not one of"):
        with backends.force_backend("cuda"):
            pass


def test_set_default_backend_reaches_threads(monkeypatch):
    """force_backend is a context variable, which a threading.Thread does not inherit; the
    process-wide default reaches every thread, and force_backend still overrides it."""
    import threading

    import hapo_kernels as hk
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # CPU tensors default to "triton"
    seen = {}

    def look(key):
        seen[key] = backends.backend_name(torch.zeros(1))

    def in_thread(key):
        worker = threading.Thread(target=look, args=(key,))
        worker.start()
        worker.join(timeout=30)

    with hk.force_backend("cpu"):
        in_thread("forced, other thread")              # documented: not inherited
    previous = hk.set_default_backend("cpu")
    try:
        in_thread("default, other thread")
        with hk.force_backend("triton"):
            look("forced over the default")
            in_thread("default under a forced block, other thread")
    finally:
        assert hk.set_default_backend(previous) == "cpu"
    look("default cleared")
    assert seen == {"forced, other thread": "triton", "default, other thread": "cpu",
                    "forced over the default": "triton",
                    "default under a forced block, other thread": "cpu",
                    "default cleared": "triton"}
    with pytest.raises(ValueError, match="not one of"):
        hk.set_default_backend("cuda")
