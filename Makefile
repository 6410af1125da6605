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
	$(BIN)/cama-serve serve

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy cama store training app worker benchmarks cama_serve

pytest:
	$(BIN)/python -m pytest -q

test: install lint typecheck pytest

# the shipped MNIST CAMAs from their configs: the clean model (three stages), then the served one
train-mnist: install
	$(BIN)/cama-serve train --config configs/mnist_clean.toml
	$(BIN)/cama-serve train --config configs/mnist.toml

evaluate-mnist: install
	$(BIN)/python -m training.evaluate_mnist

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

.PHONY: train-baselines
train-baselines: install
	$(BIN)/cama-serve train --config configs/mnist_dnn.toml
	$(BIN)/python -m training.train_baseline --model dnn --epochs 40 --augment vshift --aug-range 0.5 --out models/mnist_dnn_aug_vshift.pt
	$(BIN)/python -m training.train_baseline --model dnn --epochs 40 --augment hshift --aug-range 0.5 --out models/mnist_dnn_aug_hshift.pt
	$(BIN)/cama-serve train --config configs/mnist_bncnn.toml
	$(BIN)/cama-serve train --config configs/mnist_bncnn_flat.toml
	$(BIN)/cama-serve train --config configs/mnist_dnn_generic.toml

# Measurement data (paper section 4.2): the service's embedded default model (generator seed 0,
# with models/measurement_cama.replay.npz) and the fig. 14/15 evaluation over 5 generator seeds.
.PHONY: train-measurement evaluate-measurement
train-measurement: install
	$(BIN)/cama-serve train --config configs/measurement.toml

evaluate-measurement: install
	$(BIN)/python -m training.evaluate_measurement --threads 1

# The service (docs/service.md). `make run` serves in the embedded mode (no Redis); these run the
# other roles and the service's measurements.
.PHONY: worker serving-data export-mnist bench-microbatch bench-onnx e2e-mnist compose-config
worker: install
	$(BIN)/cama-serve worker

serving-data: install
	$(BIN)/python -m training.export_model --make-serving-data mnist --out models/mnist_serving_data.npz

export-mnist: install
	$(BIN)/cama-serve export --checkpoint models/mnist_cama.pt --name mnist --store model_store

bench-microbatch: install
	$(BIN)/python -m benchmarks.microbatch

bench-onnx: install
	$(BIN)/python -m benchmarks.onnx_vs_torch

e2e-mnist: install
	$(BIN)/python -m benchmarks.e2e_mnist $(E2E_ARGS)

compose-config:
	CAMA_TOKEN=$${CAMA_TOKEN:-dummy-token-for-config-check} REDIS_PASSWORD=$${REDIS_PASSWORD:-dummy} docker-compose config

# docker compose up for real: build (the base too where no registry answers), start redis + api +
# worker, one /predict, one /adapt to a new active version, tear down (scripts/compose_smoke.sh).
.PHONY: compose-smoke
compose-smoke: install
	PY=$(BIN)/python scripts/compose_smoke.sh

# The service's reliability suite (docs/service.md): fuzzing, bad inputs, memory, a killed worker,
# hot-swaps, Redis down; about 40 minutes on 2 cores; writes benchmarks/results/reliability.json.
.PHONY: reliability
reliability: install
	nice -n 10 $(BIN)/python -m benchmarks.reliability $(RELIABILITY_ARGS)

# CIFAR-binary (paper section 4.1, appendix C): the CNN baseline and CAMA trained with eq. 5 on
# Gaussian-noise copies (sigma 0.1); each prints its clean test accuracy (docs/reproduce.md).
.PHONY: train-cifar
train-cifar: install
	$(BIN)/cama-serve train --config configs/cifar_cnn.toml
	$(BIN)/cama-serve train --config configs/cifar_binary_cama.toml
