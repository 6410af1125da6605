"""A model's recipe as a file: ``configs/<name>.toml`` read into frozen dataclasses and run stage by stage.

A config names the data, the networks, the m pathway, the schedule and augmentation of each
stage, the seed and the adaptation recipe (eq. 8) the checkpoint carries for ``/adapt``. A run
of several stages is a list of ``[[stages]]``: each starts from the previous stage's output
(``init = "previous"``, the default after the first), from a named checkpoint, or from scratch;
a stage with ``convert`` does no training and writes its input with another m pathway. Every
stage is one command line of the trainer the model kind names (``training.train_cama``,
``training.train_baseline`` or ``training.train_measurement``), printed as it runs, so a
config and the commands that rebuild a model are the same thing. The last stage writes ``out``
and the checkpoint's provenance records ``config``: the file's path and text, and the
overrides given on the command line.

    [data]      dataset ("mnist", "cifar_binary", "images", "synthetic-measurement"), path,
                image_size, channels, test_fraction, val_fraction
    [model]     kind ("cama", "measurement", or a baseline: "dnn", "cnn", "bncnn", "pool_cnn"),
                tiny, m_pathway, transforms, networks (fields of the model config), head, dropout
    [adapt]     fields of ``cama.adapt.FinetuneConfig`` (CAMA models)
    [[stages]]  name, init, convert, epochs, batch_size, lr, weight_decay, val_k, test_k,
                augment, aug_range, lam, flip, bf16, device, threads, time_budget_s, m_pathway,
                transforms, networks (convert stages only: config fields set on the input's model,
                keeping every weight's shape, e.g. ``field_inverse``)
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cama.adapt import MEASUREMENT_RECIPE, FinetuneConfig

BASELINE_KINDS = ("dnn", "cnn", "bncnn", "pool_cnn")
MODEL_KINDS = ("cama", "measurement", *BASELINE_KINDS)


class ConfigError(ValueError):
    """A config file that cannot be read or names something unknown."""


@dataclass(frozen=True)
class DataConfig:
    """The data a run trains on: a named data set or a user's own images (``images`` + ``path``)."""

    dataset: str = "mnist"
    path: str | None = None
    image_size: tuple[int, ...] | None = None
    channels: int | None = None
    test_fraction: float | None = None
    val_fraction: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The networks: a model kind, its preset (``tiny``) and overrides of its config's fields."""

    kind: str = "cama"
    tiny: bool = False
    m_pathway: str | None = None
    transforms: tuple[str, ...] | None = None
    networks: Mapping[str, Any] = field(default_factory=dict)
    head: str | None = None  # bncnn: "gap" or "flatten"
    dropout: float | None = None  # pool_cnn


@dataclass(frozen=True)
class StageConfig:
    """One training run (or, with ``convert``, one change of m pathway); ``None`` is the trainer's default."""

    name: str
    init: str | None = None  # "previous", a checkpoint path, or None (from scratch)
    convert: str | None = None  # an m pathway: write the input with it, no training
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    val_k: int | None = None
    test_k: int | None = None
    augment: str | None = None
    aug_range: float | None = None
    lam: float | None = None
    flip: bool = False
    bf16: bool = False
    device: str = "cpu"
    threads: int | None = None
    time_budget_s: float | None = None
    m_pathway: str | None = None
    transforms: tuple[str, ...] | None = None
    networks: Mapping[str, Any] | None = None  # convert stages: config fields set on the input's model
    train_limit: int | None = None  # set by --limit
    test_limit: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """A whole recipe: where it writes, its seed, data, model, adaptation recipe and stages."""

    name: str
    out: str
    stages: tuple[StageConfig, ...]
    seed: int = 0
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    adapt: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""  # the file it was read from
    text: str = ""  # and its contents

    def adapt_recipe(self) -> dict[str, Any] | None:
        """The fine-tuning recipe (eq. 8) the checkpoint carries: the kind's default with ``[adapt]``."""
        if self.model.kind == "cama":
            return replace(FinetuneConfig(), **self.adapt).as_dict()
        if self.model.kind == "measurement":
            return replace(MEASUREMENT_RECIPE, **self.adapt).as_dict()
        if self.adapt:
            raise ConfigError(f"{self.path}: a {self.model.kind} model carries no adaptation recipe")
        return None


def _build(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` with lists as tuples; an unknown key is a :class:`ConfigError`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def parse_config(text: str, path: str) -> RunConfig:
    """A config file's ``text`` (TOML; read from ``path``) as a :class:`RunConfig`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    stages = raw.pop("stages", None)
    if not stages:
        raise ConfigError(f"{path}: no [[stages]]")
    model = _build(ModelConfig, raw.pop("model", {}), f"{path} [model]")
    if model.kind not in MODEL_KINDS:
        raise ConfigError(f"{path}: model kind {model.kind!r}; known: {MODEL_KINDS}")
    adapt = raw.pop("adapt", {})
    unknown_adapt = sorted(set(adapt) - {f.name for f in fields(FinetuneConfig)})
    if unknown_adapt:
        raise ConfigError(f"{path} [adapt]: unknown keys {unknown_adapt}")
    run: RunConfig = _build(
        RunConfig,
        {
            **raw,
            "stages": tuple(_build(StageConfig, s, f"{path} stage {i}") for i, s in enumerate(stages)),
            "data": _build(DataConfig, raw.pop("data", {}), f"{path} [data]"),
            "model": model,
            "adapt": adapt,
            "path": path,
            "text": text,
        },
        path,
    )
    run.adapt_recipe()  # refuses [adapt] on a model that carries none
    return run


def load_config(path: str | Path) -> RunConfig:
    """Read the config file at ``path``."""
    return parse_config(Path(path).read_text(), str(path))


@dataclass(frozen=True)
class Overrides:
    """What the command line changes in a config: every training stage's epochs, a subset of
    the data (``limit`` training and test images), the output, the user's images, the device."""

    epochs: int | None = None
    limit: int | None = None
    out: str | None = None
    data: str | None = None
    device: str | None = None
    threads: int | None = None

    def apply(self, run: RunConfig) -> RunConfig:
        """``run`` with these overrides."""
        changes: dict[str, Any] = {}
        if self.epochs is not None:
            changes["epochs"] = self.epochs
        if self.limit is not None:
            if run.model.kind == "measurement":
                raise ConfigError("--limit applies to image data sets")
            changes |= {"train_limit": self.limit, "test_limit": self.limit}
        for key in ("device", "threads"):
            if getattr(self, key) is not None:
                changes[key] = getattr(self, key)
        stages = tuple(s if s.convert else replace(s, **changes) for s in run.stages)
        data = run.data if self.data is None else replace(run.data, dataset="images", path=self.data)
        return replace(run, stages=stages, data=data, out=self.out or run.out)

    def record(self) -> dict[str, Any]:
        """The overrides given, as the checkpoint's provenance records them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _flags(values: Mapping[str, Any]) -> list[str]:
    """``{"batch_size": 128, "bf16": True, "transforms": ("a", "b")}`` -> ``--batch-size 128 --bf16
    --transforms a b``; ``None`` and ``False`` are left out."""
    argv: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, tuple | list):
            argv += [flag, *(str(v) for v in value)]
        elif isinstance(value, Mapping):
            if value:
                argv += [flag, json.dumps(dict(value), separators=(",", ":"))]
        else:
            argv += [flag, str(value)]
    return argv


def _data_flags(data: DataConfig) -> dict[str, Any]:
    if data.dataset == "synthetic-measurement":
        return {"synthetic": True}
    return {
        "dataset": None if data.dataset == "images" else data.dataset,
        "data": data.path,
        "image_size": data.image_size,
        "channels": data.channels,
        "test_fraction": data.test_fraction,
        "val_fraction": data.val_fraction,
    }


def stage_command(run: RunConfig, stage: StageConfig, out: Path, init: Path | None) -> tuple[str, list[str]]:
    """The trainer module and the command line that run ``stage``, writing ``out``."""
    model = run.model
    if stage.convert:
        if init is None:
            raise ConfigError(f"stage {stage.name!r}: convert needs an input (init)")
        flags = {"convert": init, "m_pathway": stage.convert, "networks": stage.networks, "out": out}
        return "training.train_cama", _flags(flags)
    if stage.networks:
        raise ConfigError(f"stage {stage.name!r}: networks is for convert stages (else [model])")
    schedule = {
        "epochs": stage.epochs,
        "batch_size": stage.batch_size,
        "lr": stage.lr,
        "seed": run.seed,
        "threads": stage.threads,
    }
    if model.kind == "measurement":
        values = {**_data_flags(run.data), **schedule, "m_pathway": model.m_pathway, "tiny": model.tiny}
        return "training.train_measurement", _flags({**values, "out": out})
    common = {
        **_data_flags(run.data),
        **schedule,
        "weight_decay": stage.weight_decay,
        "augment": stage.augment,
        "aug_range": stage.aug_range,
        "flip": stage.flip,
        "train_limit": stage.train_limit,
        "test_limit": stage.test_limit,
        "networks": model.networks,
    }
    if model.kind in BASELINE_KINDS:
        extra = {"model": model.kind, "bncnn_head": model.head, "dropout": model.dropout}
        return "training.train_baseline", _flags({**common, **extra, "out": out})
    cama = {
        "lam": stage.lam,
        "val_k": stage.val_k,
        "test_k": stage.test_k,
        "bf16": stage.bf16,
        "device": None if stage.device == "cpu" else stage.device,
        "time_budget": stage.time_budget_s,
        "tiny": model.tiny,
        "init_from": init,
        "m_pathway": stage.m_pathway or (None if init else model.m_pathway),
        "transforms": stage.transforms or (None if init else model.transforms),
    }
    return "training.train_cama", _flags({**common, **cama, "out": out})


Runner = Callable[[str, list[str]], None]


@dataclass(frozen=True)
class PlannedStage:
    """One stage as it runs: the trainer module, its command line, and the file it writes."""

    stage: StageConfig
    module: str
    argv: list[str]
    out: Path


def plan(run: RunConfig) -> list[PlannedStage]:
    """Every stage's command line: the last writes ``run.out``, earlier ones
    ``<out>.stages/<name>.pt``; each starts from its ``init`` (``"previous"``, the default after
    the first stage: the previous stage's output)."""
    out = Path(run.out)
    work = out.parent / f"{out.name}.stages"
    planned: list[PlannedStage] = []
    for i, stage in enumerate(run.stages):
        target = out if i == len(run.stages) - 1 else work / f"{stage.name}.pt"
        init_name = stage.init if stage.init is not None else ("previous" if i else None)
        init = planned[-1].out if init_name == "previous" and planned else None
        if init_name not in (None, "previous"):
            init = Path(init_name)
        module, argv = stage_command(run, stage, target, init)
        planned.append(PlannedStage(stage, module, argv, target))
    return planned


def run_stages(run: RunConfig, runner: Runner, overrides: Overrides | None = None) -> Path:
    """Run every stage of :func:`plan` (``runner(module, argv)`` runs one trainer), then record the
    config and its adaptation recipe in the output's provenance. Returns the output path."""
    stages = plan(run)
    for i, step in enumerate(stages):
        step.out.parent.mkdir(parents=True, exist_ok=True)
        label = f"[{run.name} {i + 1}/{len(stages)} {step.stage.name}]"
        print(f"{label} python -m {step.module} {shlex.join(step.argv)}", flush=True)
        runner(step.module, step.argv)
    out = Path(run.out)
    record_config(out, run, overrides or Overrides())
    return out


def record_config(path: Path, run: RunConfig, overrides: Overrides) -> None:
    """Add ``config`` (the file's path, text and the overrides) and the adaptation recipe to the
    provenance of the checkpoint at ``path``."""
    import training.baselines  # noqa: F401 - registers the baselines' checkpoint kinds
    from cama.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(path)
    provenance = {
        **meta.provenance,
        "config": {"path": run.path, "text": run.text, "overrides": overrides.record()},
    }
    recipe = run.adapt_recipe()
    if recipe is not None:
        provenance["adapt_recipe"] = recipe
    save_checkpoint(path, model, provenance=provenance, metrics=meta.metrics)


def config_of(provenance: Mapping[str, Any]) -> RunConfig | None:
    """The config a checkpoint's provenance records (parsed from the text it keeps), or None."""
    record = provenance.get("config")
    if not isinstance(record, Mapping):
        return None
    return parse_config(str(record["text"]), str(record["path"]))
