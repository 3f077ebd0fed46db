import sys

import pytest
import torch

from hapo_kernels.backends import force_backend, triton_interpret

# Kernel tests need the interpreter (set before the first import) or a GPU.
KERNELS_RUNNABLE = triton_interpret() or torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kernel" in item.keywords and not KERNELS_RUNNABLE:
            item.add_marker(pytest.mark.skip(reason="kernel tests need TRITON_INTERPRET=1 or a "
                                              "GPU; `make test` runs them under the interpreter"))


@pytest.fixture(params=["cpu", pytest.param("triton", marks=pytest.mark.kernel)])
def backend(request):
    """Run a test once on the chunked torch path and once on the Triton kernels."""
    with force_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after it (tiny models, busy machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _poisoned_buffer(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(3)


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the library fills row by row (``outputs.new_buffer``, in each module that
    imported it) starts as NaN (3 for integers), so an element left unwritten shows."""
    from hapo_kernels import outputs
    for name, module in list(sys.modules.items()):
        if name.startswith("hapo_kernels") and \
                getattr(module, "new_buffer", None) is outputs.new_buffer:
            monkeypatch.setattr(module, "new_buffer", _poisoned_buffer)
