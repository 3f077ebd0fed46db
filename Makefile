# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines that bring their own CUDA torch: make test TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The tested versions of every optional package (pyproject.toml's extras are ranges).
CONSTRAINTS := -c requirements/constraints.txt

.PHONY: setup lint test test-cpu test-kernels test-integrations kernel-report demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,bench]"
	@# Triton < 3.7 (torch <= 2.11 pins it) runs its interpreter only with NumPy < 2.4.
	@$(PY) -c "from hapo_kernels.backends import installed_interpreter_problem as p; \
	raise SystemExit(p() is not None)" || $(PY) -m pip install -q "numpy<2.4"

test: setup
	$(MAKE) lint test-cpu test-kernels

# ruff (pyproject.toml: pyflakes, pycodestyle, import order, bugbear, pyupgrade).
lint: setup
	$(PY) -m ruff check .

# The CPU path, the reference and the training layer (kernels dispatched to torch).
test-cpu:
	$(PY) -m pytest -q -m "not kernel and not cuda" $(PYTEST_ARGS) tests

# The real Triton kernels, run on CPU tensors through Triton's interpreter.
test-kernels:
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m kernel $(PYTEST_ARGS) tests

# What the kernels compile to for sm_90 (no GPU needed): SASS instructions per element,
# registers, spills, 128-bit access and a modelled H200 time; fails when a loss or log-prob
# loop leaves the budget (docs/design.md section 10).
kernel-report: setup
	$(PY) -m bench.kernel_report --json bench/results/kernel-report.json

# TRL and verl integration tests, against the real packages. Each gets its own venv (their
# transformers pins differ), built on first use; hapo-kernels goes in editable, --no-deps.
VENV_TRL ?= .venv-trl
VENV_VERL ?= .venv-verl
INTEGRATION_ENV := HAPO_INTEGRATION_TESTS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

$(VENV_TRL)/.installed: requirements/trl.txt requirements/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_TRL)
	$(VENV_TRL)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV_TRL)/bin/python -m pip install -q --no-deps -e .
	$(VENV_TRL)/bin/python -m pip install -q $(CONSTRAINTS) -r requirements/trl.txt
	touch $@

$(VENV_VERL)/.installed: requirements/verl.txt requirements/verl-nodeps.txt \
		requirements/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_VERL)
	$(VENV_VERL)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV_VERL)/bin/python -m pip install -q --no-deps -e .
	$(VENV_VERL)/bin/python -m pip install -q $(CONSTRAINTS) -r requirements/verl.txt
	$(VENV_VERL)/bin/python -m pip install -q --no-deps $(CONSTRAINTS) -r requirements/verl-nodeps.txt
	touch $@

test-integrations: $(VENV_TRL)/.installed $(VENV_VERL)/.installed
	$(INTEGRATION_ENV) $(VENV_TRL)/bin/python -m pytest -q $(PYTEST_ARGS) tests/integrations/test_trl.py \
		tests/integrations/test_compat_trl.py
	$(INTEGRATION_ENV) $(VENV_VERL)/bin/python -m pytest -q $(PYTEST_ARGS) tests/integrations/test_verl.py \
		tests/integrations/test_verl_trainer.py

# The main job on built-in defaults: the quick sparse-reward HAPO demo, then the quick
# benchmark. Everything they write goes to out/ (ignored by git).
demo: setup
	$(PY) -m hapo.demo --quick --out out/demo
	$(PY) -m bench --quick --out-dir out/bench

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks out
