# One image, every role: `python -m app` (API) or `celery -A worker.celery_app worker` (worker).
#   docker build -t cama-serve .                                  # CPU (default)
#   docker build -t cama-serve:cuda --build-arg DEVICE=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
# Wheels put in wheels/ win over the index (a CPU-only torch keeps the CPU image free of CUDA);
# PIP_EXTRA_INDEX_URL may name a CPU-only torch index instead. Without a registry, build the base
# locally (scripts/docker_base.sh) and pass --build-arg BASE_IMAGE=cama-base:bookworm.
# The service installs without the `[train]` extra (matplotlib, pandas, pyarrow, tqdm).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG DEVICE=cpu
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY wheels/ /wheels/
COPY pyproject.toml ./
COPY cama ./cama
COPY store ./store
COPY training ./training
COPY app ./app
COPY worker ./worker
RUN pip install --find-links /wheels . \
    && if [ "$DEVICE" = "cuda" ]; then pip uninstall -y onnxruntime && pip install onnxruntime-gpu; fi

FROM ${BASE_IMAGE} AS runtime
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 cama \
    && mkdir -p /srv/model_store && chown cama /srv/model_store
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CAMA_HOST=0.0.0.0 \
    CAMA_PORT=8000 \
    CAMA_MODEL_STORE=/srv/model_store \
    CAMA_SEED_DIR=/app/models
WORKDIR /app
COPY --chown=cama cama ./cama
COPY --chown=cama store ./store
COPY --chown=cama training ./training
COPY --chown=cama app ./app
COPY --chown=cama worker ./worker
COPY --chown=cama models ./models
USER cama
# seed the store (checkpoint + ONNX export + serving data) so that a container starts ready;
# a named volume mounted at /srv/model_store is initialised from this content
RUN python -m app.seed
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
CMD ["python", "-m", "app"]
