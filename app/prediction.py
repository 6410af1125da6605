"""One prediction below the wire format: what ``POST /predict`` and the Open Inference Protocol's
``POST /v2/models/{name}/infer`` both run once they have decoded their body into inputs.

The request's limits (k, the cost model, the input shapes of the served version), eq. 6 through
the model's micro-batcher, the drift test and adaptation from traffic, and the answer's fields
live here once; each route only decodes its wire format and encodes the answer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from app.api.parsing import check_work
from app.auto_adapt import AutoAdapter
from app.core.config import Settings
from app.model_server import ModelServer
from cama.novelty import log_evidence
from store.data import Inputs, check_shapes
from store.errors import InvalidInputError


@dataclass(frozen=True)
class Prediction:
    """One request's answer: p(y|x) (eq. 6), the labels, log p(x), the unusual scores, and the
    one version that computed them (with routing on, the version that answered each input)."""

    model: str
    version: int
    k: int
    seed: int
    probabilities: np.ndarray  # (B, C) float32
    labels: np.ndarray  # (B,) int64: arg-max of the probabilities
    log_px: np.ndarray  # (B,) float32: logsumexp over classes of eq. 6's log-weights
    unusual: np.ndarray | None  # (B,) in [0, 1]: only at the k the version calibrated
    routes: list[int] | None  # (B,) with routing on
    classes: tuple[str, ...] | None  # class names of a table model


def resolve_k(k: int | None, settings: Settings) -> int:
    """The request's k, or the service's default; more than ``max_k`` is a 422 ``k_too_large``."""
    k = k or settings.k
    if k > settings.max_k:
        raise InvalidInputError(f"k={k} exceeds the limit {settings.max_k}", reason="k_too_large")
    return k


async def predict(
    server: ModelServer,
    settings: Settings,
    auto: AutoAdapter,
    model: str,
    inputs: Inputs,
    k: int | None,
    seed: int | None,
) -> Prediction:
    """Check the inputs against the served version, k and the cost model; compute eq. 6's
    log-weights through the micro-batcher with noise from ``seed`` (random if None); feed the
    unusual scores to the drift test and to adaptation from traffic. p(y|x) = softmax of the
    per-class log-weights, log p(x) = their logsumexp."""
    served = server.current(model)
    check_shapes(inputs, served.kind, served.manifest.inputs)
    k = resolve_k(k, settings)
    check_work(len(inputs), k, served.num_classes, settings.max_work)
    seed = seed if seed is not None else secrets.randbits(63)
    answer = await server.predict(model, inputs, k, seed)
    version = answer.version
    unusual = answer.unusual
    if unusual is not None:
        state = server.observe(model, version, unusual)
        auto.offer(model, version.version, inputs, unusual, state)
    log_px = log_evidence(answer.log_w)
    with np.errstate(invalid="ignore"):  # every weight -inf: log p(x) = -inf, p(y|x) undefined
        probs = np.exp(answer.log_w - log_px[:, None])
    return Prediction(
        model=model,
        version=version.version,
        k=k,
        seed=seed,
        probabilities=probs.astype(np.float32),
        labels=probs.argmax(1).astype(np.int64),
        log_px=log_px.astype(np.float32),
        unusual=unusual,
        routes=None if answer.routes is None else [v.version for v in answer.routes],
        classes=version.classes,
    )
