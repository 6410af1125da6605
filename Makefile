# The few commands people type. `make run` serves; `make test` checks everything.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(if $(CAMA_DATA_DIR),$(CAMA_DATA_DIR),../shared/data)
export CAMA_DATA_DIR := $(DATA_DIR)

.PHONY: install run test lint typecheck pytest train-mnist evaluate-mnist clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e '.[dev]'

run: install
	$(BIN)/python -m app

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy cama training app worker

pytest:
	$(BIN)/python -m pytest -q

test: install lint typecheck pytest

train-mnist: install
	$(BIN)/python -m training.train_cama --epochs 40 --bf16 --out models/mnist_cama_clean.pt

evaluate-mnist: install
	$(BIN)/python -m training.evaluate_mnist

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
