# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines that bring their own CUDA torch: make test TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-cpu test-kernels demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,bench]"

test: setup
	$(MAKE) test-cpu test-kernels

# The CPU path, the reference and the training layer (kernels dispatched to torch).
test-cpu:
	$(PY) -m pytest -q -m "not kernel" $(PYTEST_ARGS) tests

# The real Triton kernels, run on CPU tensors through Triton's interpreter.
test-kernels:
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m kernel $(PYTEST_ARGS) tests

demo: setup
	$(PY) -m bench --quick

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks
