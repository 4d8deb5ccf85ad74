# The two commands: `make chat` (set up, prepare the default model, open the chat) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# llama.cpp (the peer, and our tokenizer) is built from source by pip. On x86-64 its AMX kernels crash
# (SIGSEGV in ggml_backend_amx_mul_mat) on CPUs that report AMX inside VMs, so build without them;
# --no-cache-dir keeps pip from reusing a wheel built with other flags.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif

# `make gpu`: llama-cpp-python rebuilt in place with a GPU backend of ggml (GPU=cuda, vulkan or metal; metal is
# the default on macOS, cuda elsewhere), for `edge --gpu`. CUDA needs the toolkit (nvcc); Vulkan its headers
# (1.3.261 or newer: Ubuntu 24.04, Debian 13; else GPU_CMAKE_ARGS=-DVulkan_INCLUDE_DIR=...) and glslc.
# `make chat` and `make test` keep the build they find.
GPU ?= $(if $(filter Darwin,$(shell uname -s)),metal,cuda)
GPU_FLAGS_cuda := -DGGML_CUDA=on
GPU_FLAGS_vulkan := -DGGML_VULKAN=on
GPU_FLAGS_metal := -DGGML_METAL=on

.PHONY: chat test install clean gpu

chat: $(STAMP)
	$(BIN)/edge chat

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-cache-dir 'llama-cpp-python>=0.3.8'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

gpu: $(STAMP)
	@test -n "$(GPU_FLAGS_$(GPU))" || { echo "make gpu: GPU=$(GPU): choose cuda, vulkan or metal"; exit 2; }
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(GPU_FLAGS_$(GPU)) $(GPU_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet \
		--no-cache-dir --force-reinstall --no-deps \
		"llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
	$(BIN)/edge info | grep "compute devices"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
