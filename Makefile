# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
WORKERS ?= 4
CHAOS ?= default
STEPS ?= 300

.PHONY: setup run test lint bench clean nvcc-check

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/lococomm run --workers $(WORKERS) --chaos $(CHAOS) examples/train_ft.py --steps $(STEPS)

test: setup
	$(PY) -m pytest -q

# Benchmarks print JSON lines (figure + same-run baseline). The emulated-link cases need root
# (network namespaces + tc); `--links loopback` runs without.
bench: setup
	$(PIP) install --quiet -e ".[bench]"
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/ft_allreduce.py
	$(PY) benchmarks/heal.py
	$(PY) benchmarks/compressed_allreduce.py
	$(PY) benchmarks/overlap.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache

# Compile-only check of the CUDA kernels (nothing CUDA runs on a CPU machine).
NVCC ?= nvcc
TORCH_INCLUDES = $(shell $(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))" 2>/dev/null)
nvcc-check: setup
	@set -e; for f in csrc/cuda/*.cu; do [ -e "$$f" ] || continue; echo "nvcc -c $$f"; \
	  $(NVCC) -c -std=c++17 -O2 $(TORCH_INCLUDES) -I$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])") -Icsrc "$$f" -o /tmp/lococomm_$$(basename $$f .cu).o; done
