"""One loaded model version: an ONNX Runtime session (served) and the torch model (reference).

Both compute eq. 6's per-class log-weights from the same explicit noise, which is drawn from the
request's seed, so a prediction can be replayed and the two paths compared. A version is served
only after the two agree on a fixed probe batch (:func:`probe_check`), so an ONNX graph that was
changed and re-checksummed is refused. ONNX Runtime's CPU memory arena is off: a large request's
buffers go back to the allocator (and, trimmed, to the system) instead of staying reserved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from cama.checkpoint import CheckpointError, load_checkpoint
from cama.novelty import DEFAULT_RULE, EvidenceReference, Rule, log_evidence, m_features
from cama.objectives import Noise, bayes_log_weights, class_log_weights, screened_log_weights
from store.data import INPUT_NAMES, Inputs, ServingData
from store.registry import CorruptVersionError, Manifest, ModelRegistry
from store.tables import RowEncoding, class_names

log = logging.getLogger(__name__)

Backend = Literal["onnx", "torch"]

# the load-time probe: the first PROBE_INPUTS canary inputs at PROBE_K samples, noise seed PROBE_SEED;
# ONNX must match torch within PROBE_TOLERANCE nats per class with identical labels
PROBE_INPUTS, PROBE_K, PROBE_SEED, PROBE_TOLERANCE = 8, 2, 20240611, 0.05
EVIDENCE_SEED = 20240612  # the noise of the canary's clean reference for the unusual score


@dataclass(frozen=True)
class ServedModel:
    """What request parsing needs to know of the model a request names."""

    num_classes: int
    encoding: RowEncoding | None
    inputs: dict[str, list[int]]  # per-input shape without the batch, e.g. {"x": [3, 32, 32]}


@dataclass(frozen=True)
class NoiseArrays:
    """Eq. 6's noise as arrays: ``m (K, B, dM)``, ``z (C, K, B, dZ)``."""

    m: np.ndarray
    z: np.ndarray

    @staticmethod
    def concat(parts: list[NoiseArrays]) -> NoiseArrays:
        if len(parts) == 1:
            return parts[0]
        return NoiseArrays(np.concatenate([p.m for p in parts], 1), np.concatenate([p.z for p in parts], 2))


def providers_for(device: str) -> list[str]:
    """CUDA first when asked for (or ``auto``) and available in this ONNX Runtime build, else CPU."""
    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("device=cuda asked for but ONNX Runtime has no CUDA provider; using the CPU")
    return ["CPUExecutionProvider"]


class LoadedVersion:
    """A verified version, ready to answer: immutable once built."""

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        model: nn.Module,
        classes_session: ort.InferenceSession,
    ) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        self.kind = manifest.kind
        self.session = session
        self.classes_session = classes_session
        self.model = model
        self.num_classes = int(getattr(model, "num_classes"))  # noqa: B009 - protocol attribute
        self.dim_m = int(getattr(model, "dim_m"))  # noqa: B009
        self.dim_z = int(getattr(model, "dim_z"))  # noqa: B009
        self.encoding = RowEncoding.from_provenance(manifest.provenance)
        self.classes = class_names(manifest.provenance)  # what /predict names each label
        self.evidence: EvidenceReference | None = None  # set by calibrate_evidence

    def noise(self, n: int, k: int, seed: int) -> NoiseArrays:
        """Standard-normal noise for ``n`` inputs and ``k`` samples, from ``seed`` (replayable)."""
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((k, n, self.dim_m), dtype=np.float32)
        z = rng.standard_normal((self.num_classes, k, n, self.dim_z), dtype=np.float32)
        return NoiseArrays(m, z)

    def log_weights(
        self,
        inputs: Inputs,
        noise: NoiseArrays,
        backend: Backend = "onnx",
        *,
        screen: float | None = None,
        max_work: int | None = None,
        on_open: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Eq. 6 per-class log-weights ``(B, C)`` with the given noise; with ``screen`` (nats), all K
        samples only for the inputs the first sample leaves undecided
        (:func:`cama.objectives.screened_log_weights`), in passes of at most ``max_work`` decoder
        passes; ``on_open(n)`` is told how many inputs each of those passes takes."""
        if screen is None:
            return self._log_weights(inputs, noise, backend)

        def every_class(part: Noise) -> torch.Tensor:
            return torch.from_numpy(self._log_weights(inputs, _arrays(part), backend))

        def one_class(rows: torch.Tensor, labels: torch.Tensor, part: Noise) -> torch.Tensor:
            if on_open is not None:
                on_open(len(rows))
            sub = inputs.take(rows.numpy())
            return torch.from_numpy(self._class_log_weights(sub, labels.numpy(), _arrays(part), backend))

        full = Noise(torch.from_numpy(noise.m), torch.from_numpy(noise.z))
        return screened_log_weights(every_class, one_class, full, screen, max_work).numpy()

    def _log_weights(self, inputs: Inputs, noise: NoiseArrays, backend: Backend) -> np.ndarray:
        if backend == "torch":
            return self.log_weights_torch(inputs, noise)
        feed = {**inputs.named(), "noise_m": noise.m, "noise_z": noise.z}
        out = self.session.run(["log_weights"], feed)[0]
        return np.asarray(out, dtype=np.float32)

    def _class_log_weights(
        self, inputs: Inputs, labels: np.ndarray, noise: NoiseArrays, backend: Backend
    ) -> np.ndarray:
        """Log-weights ``(S, B)`` of the classes ``labels (S, B)``; ``noise.z`` is ``(S, K, B, dZ)``."""
        if backend == "torch":
            cond = tuple(torch.from_numpy(c) for c in inputs.cond) if inputs.cond else None
            with torch.no_grad():
                out = class_log_weights(
                    self.model,  # type: ignore[arg-type]
                    torch.from_numpy(inputs.x),
                    torch.from_numpy(labels),
                    cond,
                    noise=Noise(torch.from_numpy(noise.m), torch.from_numpy(noise.z)),
                )
            return out.numpy().astype(np.float32)
        feed = {
            **inputs.named(),
            "labels": labels.astype(np.int64),
            "noise_m": noise.m,
            "noise_z": noise.z,
        }
        return np.asarray(self.classes_session.run(["log_weights"], feed)[0], dtype=np.float32)

    def m_features(self, inputs: Inputs, batch: int = 500) -> np.ndarray:
        """q(m|x)'s summary ``(mu, logvar)`` per input (:func:`cama.novelty.m_features`)."""
        parts = [
            m_features(self.model, part.x, part.cond)
            for part in (inputs.take(slice(i, i + batch)) for i in range(0, len(inputs), batch))
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 2 * self.dim_m))

    def unusual(self, log_w: np.ndarray, inputs: Inputs) -> np.ndarray:
        """The unusual score of inputs answered with eq. 6's log-weights ``log_w`` (cama.novelty)."""
        assert self.evidence is not None
        features = self.m_features(inputs) if self.evidence.m_model is not None else None
        return np.asarray(self.evidence.unusual(log_evidence(log_w), features))

    @torch.no_grad()
    def log_weights_torch(self, inputs: Inputs, noise: NoiseArrays) -> np.ndarray:
        """The torch reference path (``cama.objectives.bayes_log_weights``)."""
        cond = tuple(torch.from_numpy(c) for c in inputs.cond) if inputs.cond else None
        out = bayes_log_weights(
            self.model,  # type: ignore[arg-type]
            torch.from_numpy(inputs.x),
            cond,
            noise=Noise(torch.from_numpy(noise.m), torch.from_numpy(noise.z)),
        )
        return out.numpy().astype(np.float32)


def calibrate_evidence(
    loaded: LoadedVersion,
    canary: Inputs,
    k: int,
    *,
    fit: Inputs | None = None,
    fit_labels: np.ndarray | None = None,
    rule: Rule = DEFAULT_RULE,
    screen: float | None = None,
    max_work: int | None = None,
    batch: int = 100,
) -> EvidenceReference:
    """The clean reference of the unusual score (:mod:`cama.novelty`): ``log p(x)`` of the
    version's canary inputs through the served path at ``k`` samples, with fixed noise, and their
    q(m|x) summaries; the Gaussians over those are fitted on ``fit`` (other clean inputs) if given,
    the class Gaussian where ``fit_labels`` gives their labels."""
    scores = []
    for start in range(0, len(canary), batch):
        part = canary.take(slice(start, start + batch))
        noise = loaded.noise(len(part), k, EVIDENCE_SEED + start)
        log_w = loaded.log_weights(part, noise, "onnx", screen=screen, max_work=max_work)
        scores.append(log_evidence(log_w))
    features = loaded.m_features(canary)
    fit_features = loaded.m_features(fit) if fit is not None and len(fit) >= 2 else None
    return EvidenceReference.from_scores(
        np.concatenate(scores),
        k,
        features=features,
        fit_features=fit_features,
        fit_labels=fit_labels if fit_features is not None else None,
        rule=rule,
    )


def _arrays(noise: Noise) -> NoiseArrays:
    """Noise tensors as the contiguous float32 arrays ONNX Runtime takes."""
    return NoiseArrays(np.ascontiguousarray(noise.m.numpy()), np.ascontiguousarray(noise.z.numpy()))


def session_options(threads: int | None) -> ort.SessionOptions:
    """The ONNX Runtime options of each graph of a version: its thread count, threads that sleep
    when idle, and no CPU memory arena (memory returns after load)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # idle threads sleep instead of spinning: on a small CPU shared with the event loop, the
    # request decoding and the other graphs, spinning threads take the cycles those need
    # (docs/results/prediction_cost.md: higher HTTP throughput and a lower p99 without it)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def load_version(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    device: str = "cpu",
    threads: int | None = None,
    evidence: EvidenceSettings | None = None,
) -> LoadedVersion:
    """Verify checksums, rebuild the torch model, open the ONNX session and run one smoke prediction;
    with ``evidence``, also calibrate the unusual score on the canary (:func:`calibrate_evidence`).

    Raises :class:`CorruptVersionError` for anything wrong with the artifact.
    """
    manifest = registry.verify(name, version)
    directory = registry.version_dir(name, version)
    try:
        model, _ = load_checkpoint(directory / "checkpoint.pt")
    except CheckpointError as exc:
        raise CorruptVersionError(f"{name} v{version}: {exc}") from exc
    try:
        session = ort.InferenceSession(
            str(directory / "model.onnx"), session_options(threads), providers=providers_for(device)
        )
    except Exception as exc:
        raise CorruptVersionError(f"{name} v{version}: cannot open model.onnx: {exc}") from exc
    try:
        classes_session = ort.InferenceSession(
            str(directory / "classes.onnx"), session_options(threads), providers=providers_for(device)
        )
    except Exception as exc:
        raise CorruptVersionError(f"{name} v{version}: cannot open classes.onnx: {exc}") from exc
    inputs = [*INPUT_NAMES.get(manifest.kind, ())]
    for graph, sess, expected in (
        ("model.onnx", session, [*inputs, "noise_m", "noise_z"]),
        ("classes.onnx", classes_session, [*inputs, "labels", "noise_m", "noise_z"]),
    ):
        names = [i.name for i in sess.get_inputs()]
        if names != expected:
            raise CorruptVersionError(f"{name} v{version}: {graph} inputs {names}, expected {expected}")
    loaded = LoadedVersion(manifest, session, model, classes_session)
    try:
        serving = ServingData.load(directory / "replay.npz")
        canary, canary_y = serving.canary, serving.canary_y
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptVersionError(f"{name} v{version}: unreadable replay.npz: {exc}") from exc
    probe_check(loaded, canary.take(slice(0, PROBE_INPUTS)))
    if evidence is not None and evidence.inputs > 0:
        try:
            loaded.evidence = calibrate_evidence(
                loaded,
                canary.take(slice(0, evidence.inputs)),
                evidence.k,
                fit=canary.take(slice(evidence.inputs, 2 * evidence.inputs)),
                fit_labels=canary_y[evidence.inputs : 2 * evidence.inputs],
                rule=evidence.rule,
                screen=evidence.screen,
                max_work=evidence.max_work,
            )
        except ValueError as exc:
            raise CorruptVersionError(f"{name} v{version}: no clean reference for log p(x): {exc}") from exc
    return loaded


@dataclass(frozen=True)
class EvidenceSettings:
    """How a loaded version calibrates its unusual score: canary inputs, K and the served screen."""

    inputs: int
    k: int
    screen: float | None = None
    max_work: int | None = None
    rule: Rule = DEFAULT_RULE


def probe_check(loaded: LoadedVersion, probe: Inputs) -> float:
    """Run the ONNX graph and the torch model on ``probe`` with the same fixed noise; refuse the
    version (:class:`CorruptVersionError`) unless both are finite, of shape ``(B, C)``, within
    ``PROBE_TOLERANCE`` nats and agree on every label. Returns the largest difference."""
    what = f"{loaded.name} v{loaded.version}"
    noise = loaded.noise(len(probe), PROBE_K, PROBE_SEED)
    worst = 0.0
    # every class (model.onnx), then every class through the one-class graph (classes.onnx: an
    # infinite screen sends every class of every input to the second stage)
    for graph, screen in (("model.onnx", None), ("classes.onnx", float("inf"))):
        try:
            served = loaded.log_weights(probe, noise, "onnx", screen=screen)
            reference = loaded.log_weights(probe, noise, "torch", screen=screen)
        except Exception as exc:
            raise CorruptVersionError(f"{what}: probe prediction failed: {exc}") from exc
        shape = (len(probe), loaded.num_classes)
        if served.shape != shape or reference.shape != shape or not np.isfinite(served).all():
            raise CorruptVersionError(f"{what}: probe prediction gave {served.shape} / non-finite values")
        diff = float(np.abs(served - reference).max())
        if diff > PROBE_TOLERANCE or not np.array_equal(served.argmax(1), reference.argmax(1)):
            raise CorruptVersionError(
                f"{what}: {graph} disagrees with checkpoint.pt on the probe batch "
                f"({diff:.4g} nats, limit {PROBE_TOLERANCE})"
            )
        worst = max(worst, diff)
    return worst
