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
	$(BIN)/mypy cama store training app worker benchmarks

pytest:
	$(BIN)/python -m pytest -q

test: install lint typecheck pytest

train-mnist: install
	$(BIN)/python -m training.train_cama --epochs 40 --bf16 --out models/mnist_cama_clean.pt

evaluate-mnist: install
	$(BIN)/python -m training.evaluate_mnist

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

.PHONY: train-baselines
train-baselines: install
	$(BIN)/python -m training.train_baseline --model dnn --epochs 40 --out models/mnist_dnn.pt
	$(BIN)/python -m training.train_baseline --model dnn --epochs 40 --augment vshift --aug-range 0.5 --out models/mnist_dnn_aug_vshift.pt
	$(BIN)/python -m training.train_baseline --model dnn --epochs 40 --augment hshift --aug-range 0.5 --out models/mnist_dnn_aug_hshift.pt
	$(BIN)/python -m training.train_baseline --model bncnn --epochs 6 --lr 3e-3 --out models/mnist_bncnn.pt

# Measurement data (paper section 4.2): the service's embedded default model (generator seed 0,
# with models/measurement_cama.replay.npz) and the fig. 14/15 evaluation over 5 generator seeds.
.PHONY: train-measurement evaluate-measurement
train-measurement: install
	$(BIN)/python -m training.train_measurement --synthetic --seed 0 --threads 1 --out models/measurement_cama.pt

evaluate-measurement: install
	$(BIN)/python -m training.evaluate_measurement --threads 1

# The service (docs/service.md). `make run` serves in the embedded mode (no Redis); these run the
# other roles and the service's measurements.
.PHONY: worker serving-data export-mnist bench-microbatch bench-onnx e2e-mnist compose-config
worker: install
	$(BIN)/celery -A worker.celery_app worker --pool=prefork --concurrency=1 --loglevel=INFO

serving-data: install
	$(BIN)/python -m training.export_model --make-serving-data mnist --out models/mnist_serving_data.npz

export-mnist: install
	$(BIN)/python -m training.export_model --checkpoint models/mnist_cama.pt --name mnist --store model_store

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

# the same stack at 2 API replicas and 2 workers: traffic to both, an /adapt job whose worker is
# killed and finished by the other, both replicas on the new version (docs/service.md)
.PHONY: compose-scale
compose-scale: install
	PY=$(BIN)/python scripts/compose_smoke.sh --scale

# The service's reliability suite (docs/service.md): fuzzing, bad inputs, memory, a killed worker,
# hot-swaps, Redis down; about 40 minutes on 2 cores; writes benchmarks/results/reliability.json.
.PHONY: reliability
reliability: install
	nice -n 10 $(BIN)/python -m benchmarks.reliability $(RELIABILITY_ARGS)

# CIFAR-binary (paper section 4.1, appendix C): the CNN baseline and CAMA trained with eq. 5 on
# Gaussian-noise copies (sigma 0.1); each prints its clean test accuracy (docs/reproduce.md).
.PHONY: train-cifar
train-cifar: install
	$(BIN)/python -m training.train_baseline --dataset cifar_binary --epochs 20 --flip --dropout 0.5 --threads 1 --out models/cifar_cnn.pt
	$(BIN)/python -m training.train_cama --dataset cifar_binary --augment noise --aug-range 0.1 --epochs 28 --threads 1 --out models/cifar_binary_cama.pt
