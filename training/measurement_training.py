"""The measurement CAMA's training (eq. 3 under do(m=0), best validation accuracy kept), its files
(the checkpoint with the table's encoding, ``<out>.replay.npz`` with the clean replay rows and the
gate's canary) and its predictions on a table (eq. 11 by eq. 6's importance sampler).

``python -m training.train_measurement`` is the command line over it; the evaluations of
``experiments/`` use the same functions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cama.adapt import MEASUREMENT_RECIPE
from cama.checkpoint import save_checkpoint, sha256_file
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig
from cama.objectives import bayes_predict, intervention_elbo
from training.accuracy import served_accuracy
from training.measurement_schema import (
    Encoded,
    Encoding,
    SchemaError,
    TableSchema,
)

#: Fine-tuning recipe (eq. 8) shipped with every measurement checkpoint as ``adapt_recipe`` and used
#: by ``evaluate_measurement``. alpha = 0.9 (clean replay weight) rather than 0.5: on generator
#: seed 0's model, alpha 0.5 cost 1.1-2.0 points on the 1000-row clean canary, so the service's
#: 0.5-point gate refused every child-shift adaptation; alpha 0.9 with 20 epochs kept the canary
#: within 0.3 points (docs/measurement.md, ``python -m experiments.check_measurement_gate``).


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 40
    batch_size: int = 50
    lr: float = 1e-3
    seed: int = 0
    val_every: int = 2
    val_k: int = 20
    dry_run: bool = False


def as_tensors(data: Encoded) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``x`` and ``cond = (a, c)`` of encoded rows."""
    return torch.from_numpy(data.x), (torch.from_numpy(data.a), torch.from_numpy(data.c))


def predict_probs(model: MeasurementCama, data: Encoded, *, k: int = 20, seed: int = 0) -> np.ndarray:
    """Eq. 11 by eq. 6's importance sampler with seeded noise, ``(N, C)`` probabilities."""
    model.eval()
    x, cond = as_tensors(data)
    gen = torch.Generator().manual_seed(seed)
    return bayes_predict(model, x, cond, k=k, generator=gen).probs.numpy()


def accuracy(model: MeasurementCama, data: Encoded, *, k: int = 20, seed: int = 0) -> float:
    """Bayes-rule accuracy on labelled rows (:func:`training.accuracy.served_accuracy`, all K samples
    for every row: the measurement figures' numerics)."""
    if data.y is None:
        raise ValueError("accuracy needs labels")
    x, cond = as_tensors(data)
    return served_accuracy(model, x, data.y, cond, k=k, seed=seed, screen=None)


def train(
    model: MeasurementCama, train_data: Encoded, val_data: Encoded, cfg: TrainConfig
) -> dict[str, float]:
    """Maximise eq. 3 with Adam; ``model`` ends with the weights of the best validation accuracy."""
    if train_data.y is None or val_data.y is None:
        raise ValueError("training needs labelled rows")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, cond = as_tensors(train_data)
    y = torch.from_numpy(train_data.y)
    rng = np.random.default_rng(cfg.seed)
    best, best_epoch, best_state = -1.0, 0, None
    t0 = time.perf_counter()
    n = len(train_data)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            objective = intervention_elbo(model, x[idx], y[idx], (cond[0][idx], cond[1][idx])).mean()
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(-objective)
            opt.step()
            if cfg.dry_run:
                break
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs or cfg.dry_run:
            val_acc = accuracy(model, val_data, k=cfg.val_k)
            if val_acc > best:
                best, best_epoch = val_acc, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.dry_run:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "best_val_accuracy": best,
        "best_epoch": float(best_epoch),
        "train_seconds": time.perf_counter() - t0,
    }


def model_config_for(encoding: Encoding, *, tiny: bool = False, **overrides: Any) -> MeasurementCamaConfig:
    """The appendix-C widths (or tiny ones) for a table's roles and classes."""
    s = encoding.schema
    dims = {
        "num_classes": len(encoding.classes),
        "dim_a": len(s.parents),
        "dim_c": len(s.coparents),
        "dim_x": len(s.children),
        **overrides,
    }
    return MeasurementCamaConfig.tiny(**dims) if tiny else MeasurementCamaConfig(**dims)


def save_replay(path: Path, train_data: Encoded, canary_data: Encoded) -> str:
    """Write the clean replay (training) and canary rows; returns the file's SHA-256."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, data in (("replay", train_data), ("canary", canary_data)):
        assert data.y is not None
        arrays |= {f"{prefix}_x": data.x, f"{prefix}_a": data.a, f"{prefix}_c": data.c, f"{prefix}_y": data.y}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return sha256_file(path)


def replay_path(out: Path) -> Path:
    """``models/x.pt`` -> ``models/x.replay.npz``."""
    return out.with_name(out.stem + ".replay.npz")


def fit_and_save(
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    schema: TableSchema,
    cfg: TrainConfig,
    out: Path,
    *,
    tiny: bool = False,
    model_overrides: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    test_frame: pd.DataFrame | None = None,
    canary_frame: pd.DataFrame | None = None,
) -> tuple[MeasurementCama, Encoding, dict[str, float]]:
    """Validate, encode, train and write the checkpoint and its replay file.

    With ``test_frame``, its accuracy is measured and stored with the checkpoint's metrics. The
    canary is ``canary_frame`` if given, else the validation rows.
    """
    encoding = Encoding.fit(train_frame, schema)
    train_data = encoding.encode(train_frame)
    val_data = encoding.encode(val_frame)
    torch.manual_seed(cfg.seed)
    model = MeasurementCama(model_config_for(encoding, tiny=tiny, **(model_overrides or {})))
    metrics = train(model, train_data, val_data, cfg)
    if test_frame is not None:
        metrics["test_accuracy"] = accuracy(model, encoding.encode(test_frame))
    replay = replay_path(out)
    canary_data = val_data if canary_frame is None else encoding.encode(canary_frame)
    replay_sha = save_replay(replay, train_data, canary_data)
    save_checkpoint(
        out,
        model,
        provenance={
            **(provenance or {}),
            "encoding": encoding.to_dict(),
            "train_config": asdict(cfg),
            "train_size": len(train_data),
            "val_size": len(val_data),
            "canary_size": len(canary_data),
            "replay_file": replay.name,
            "replay_sha256": replay_sha,
            "adapt_recipe": MEASUREMENT_RECIPE.as_dict(),
        },
        metrics=metrics,
    )
    return model, encoding, metrics


def validation_split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``fraction`` of the rows (at least one, seeded) for model selection."""
    if len(frame) < 2:
        raise SchemaError("empty_table", "need at least two rows to hold one out for validation")
    order = np.random.default_rng(seed).permutation(len(frame))
    n_val = min(len(frame) - 1, max(1, round(fraction * len(frame))))
    return frame.iloc[order[n_val:]].reset_index(drop=True), frame.iloc[order[:n_val]].reset_index(drop=True)


def load_encoding(provenance: dict[str, Any]) -> Encoding:
    """The table encoding a measurement checkpoint was trained with."""
    if "encoding" not in provenance:
        raise SchemaError("bad_schema", "the checkpoint carries no table encoding (not a measurement model?)")
    return Encoding.from_dict(provenance["encoding"])


def predict_frame(
    model: MeasurementCama, encoding: Encoding, frame: pd.DataFrame, *, k: int = 20, seed: int = 0
) -> pd.DataFrame:
    """``predicted`` class name and ``prob_<class>`` columns for every row of ``frame``."""
    data = encoding.encode(frame, require_target=False)
    probs = predict_probs(model, data, k=k, seed=seed)
    out = pd.DataFrame({f"prob_{name}": probs[:, i] for i, name in enumerate(encoding.classes)})
    out.insert(0, "predicted", [encoding.classes[i] for i in probs.argmax(1)])
    if encoding.schema.target in frame.columns:
        out.insert(0, encoding.schema.target, frame[encoding.schema.target].to_numpy())
    return out
