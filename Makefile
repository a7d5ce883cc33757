# make demo: set up, train the tiny model on synthetic data, evaluate it and write pictures.
# make test: set up, lint, run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_output
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export MAX_JOBS ?= 2
export M2F_KERNELS_SKIP_CUDA ?= 0

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
CXX_FORMATTED := $(CSRC) $(shell find tests/cuda_emulation -name '*.cpp' -o -name '*.h')
PYSRC_DIRS := m2f m2f_kernels tests benchmarks setup.py

.PHONY: setup build lint format test demo bench report gpu-check clean FORCE

# The Python packages and dependencies; the kernel library is built by the rule below, in place.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1 "setuptools>=77" wheel ninja
	M2F_KERNELS_NO_EXTENSION=1 $(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The library is rebuilt (incrementally, by ninja) when csrc/ changes or the CUDA switch differs from the
# last build's.
BUILD_FLAGS = skip_cuda=$(M2F_KERNELS_SKIP_CUDA) arch=$(TORCH_CUDA_ARCH_LIST)
build/flags: FORCE
	@mkdir -p build
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@

m2f_kernels/_C.so: $(VENV)/.installed $(CSRC) csrc/sources.txt build/flags
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: m2f_kernels/_C.so

lint: setup
	$(VENV)/bin/ruff check $(PYSRC_DIRS)
	$(VENV)/bin/ruff format --check $(PYSRC_DIRS)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_FORMATTED)

format: setup
	$(VENV)/bin/ruff check --fix $(PYSRC_DIRS)
	$(VENV)/bin/ruff format $(PYSRC_DIRS)
	$(VENV)/bin/clang-format -i $(CXX_FORMATTED)

# The suite on TEST_WORKERS processes (pytest-xdist); TEST_WORKERS=0 runs it in this process. The 15
# slowest tests are listed at the end, to keep the suite inside its time budget (DESIGN.md 4).
TEST_WORKERS ?= 2
test: build lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

# Without a GPU the demo needs only the CPU kernels, which build in a fraction of the CUDA build's time; a
# library built before (with or without CUDA) serves as it is.
LAST_SKIP_CUDA = $(patsubst skip_cuda=%,%,$(firstword $(file <build/flags)))
demo: export M2F_KERNELS_SKIP_CUDA := $(if $(wildcard build/flags),$(LAST_SKIP_CUDA),$(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1))
demo: build
	$(VENV)/bin/m2f demo --out $(DEMO_OUT)

bench: build
	$(PY) -m pytest benchmarks -q

# On a GPU machine: builds for that GPU with every core (unless TORCH_CUDA_ARCH_LIST or MAX_JOBS are given),
# then CUDA tests, compute-sanitizer and benchmarks; logs and results JSON in benchmarks/results/.
gpu-check: setup
	env $(if $(filter file,$(origin TORCH_CUDA_ARCH_LIST)),-u TORCH_CUDA_ARCH_LIST) \
	    $(if $(filter file,$(origin MAX_JOBS)),-u MAX_JOBS) PY=$(PY) bash benchmarks/gpu_check.sh

# Markdown tables and charts of committed results: make report [RESULTS="a.json b.json"] [BASELINE=old.json]
RESULTS ?= $(wildcard benchmarks/results/*.json)
report: setup
	@test -n "$(RESULTS)" || { echo "no results: run make bench or pass RESULTS=file.json"; exit 2; }
	$(PY) -m benchmarks.report $(RESULTS) --out .benchmarks/report $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf build m2f_kernels/_C.so $(DEMO_OUT)
