"""Every shipped model has a config file (``configs/*.toml``) that names the settings its checkpoint
records; the config loader refuses what it does not know; a config runs in CI on a subset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import training.baselines  # noqa: F401 - registers the baselines' checkpoint kinds
from cama.checkpoint import load_checkpoint, save_checkpoint
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from training import train_baseline, train_cama, train_measurement
from training.run_config import (
    BASELINE_KINDS,
    ConfigError,
    Overrides,
    RunConfig,
    StageConfig,
    config_of,
    load_config,
    parse_config,
    plan,
    stage_command,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
# configs of a user's own images (configs/images.toml, the digits of docs/own_images.md) make
# checkpoints that are not shipped; every other config rebuilds a file in models/
OWN_IMAGES = [c for c in CONFIGS if load_config(c).data.dataset == "images"]
SHIPPED = [c for c in CONFIGS if c not in OWN_IMAGES]


def trainer_defaults(kind: str) -> dict[str, object]:
    """The defaults of the trainer a model kind runs with, where the config leaves a setting out."""
    module = {"cama": train_cama, "measurement": train_measurement}.get(kind, train_baseline)
    return {f.name: f.default for f in fields(module.TrainConfig)}


def last_training_stage(run: RunConfig) -> StageConfig:
    return next(s for s in reversed(run.stages) if not s.convert)


def test_every_checkpoint_in_models_has_a_config():
    named = {str(ROOT / load_config(c).out) for c in SHIPPED}
    own = {str(ROOT / load_config(c).out) for c in OWN_IMAGES}
    assert named == {str(p) for p in (ROOT / "models").glob("*.pt")} - own


@pytest.mark.parametrize("path", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_loads_and_each_stage_is_a_command_line(path):
    run = load_config(path)
    assert run.stages
    assert run.path == str(path)
    assert run.text == path.read_text()
    steps = plan(run)
    assert [s.stage for s in steps] == list(run.stages)
    assert steps[-1].out == Path(run.out)
    for step in steps:
        assert step.module.startswith("training.train_")
        assert step.argv[-2:] == ["--out", str(step.out)]


@pytest.mark.parametrize("path", SHIPPED, ids=[c.stem for c in SHIPPED])
def test_the_config_names_the_settings_the_shipped_checkpoint_records(path):
    """A checkpoint trained from a config carries its text; one trained before configs existed is
    checked setting by setting against what its provenance records."""
    run = load_config(path)
    _, meta = load_checkpoint(ROOT / run.out)
    provenance, recorded_config = meta.provenance, config_of(meta.provenance)
    if recorded_config is not None:
        assert recorded_config.text == run.text
        return
    assert provenance["dataset"] == run.data.dataset
    stage = last_training_stage(run)
    expected = trainer_defaults(run.model.kind) | {
        k: v for k, v in vars(stage).items() if v is not None and k in trainer_defaults(run.model.kind)
    }
    expected["seed"] = run.seed
    recorded = provenance["train_config"]
    if recorded.get("time_budget_s") is not None:
        recorded = {**recorded, "epochs": int(meta.metrics["epochs"])}  # the epochs the time budget left
    for key, value in recorded.items():
        if key in ("dry_run", "val_fraction", "time_budget_s", "val_every"):
            continue
        if key == "aug_range" and recorded.get("augment") is None:
            continue  # unused without augmentation
        assert expected[key] == value, (
            f"{path.name}: {key} = {expected[key]!r}, the checkpoint records {value!r}"
        )
    if "adapt_recipe" in provenance:
        assert provenance["adapt_recipe"] == run.adapt_recipe()
    config = meta.config
    if run.model.kind == "cama":
        convert = next((s.convert for s in run.stages if s.convert), None)
        assert config["m_pathway"] == (stage.m_pathway or convert or run.model.m_pathway or "additive")
        if stage.transforms or run.model.transforms:
            assert tuple(config["transforms"]) == (stage.transforms or run.model.transforms)
    elif run.model.kind == "measurement":
        assert config["m_pathway"] == run.model.m_pathway
        assert provenance["generator_seed"] == run.seed
    else:
        assert run.model.kind in BASELINE_KINDS
        assert config["kind"] == run.model.kind
        if run.model.head is not None:
            assert config.get("head", "gap") == run.model.head
        if run.model.dropout is not None:
            assert config["dropout"] == run.model.dropout


def test_the_loader_refuses_unknown_keys_kinds_and_recipes():
    good = '[model]\nkind = "dnn"\n[[stages]]\nname = "a"\n'
    assert parse_config(f'name = "x"\nout = "x.pt"\n{good}', "x.toml").model.kind == "dnn"
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config(f'name = "x"\nout = "x.pt"\nepoch = 3\n{good}', "x.toml")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config('name = "x"\nout = "x.pt"\n[[stages]]\nname = "a"\nepoch = 3\n', "x.toml")
    with pytest.raises(ConfigError, match="model kind"):
        parse_config('name = "x"\nout = "x.pt"\n[model]\nkind = "svm"\n[[stages]]\nname = "a"\n', "x.toml")
    with pytest.raises(ConfigError, match="no \\[\\[stages\\]\\]"):
        parse_config('name = "x"\nout = "x.pt"\n', "x.toml")
    with pytest.raises(ConfigError, match="carries no adaptation recipe"):
        parse_config(f'name = "x"\nout = "x.pt"\n[adapt]\nlr = 0.1\n{good}', "x.toml")


def test_overrides_change_every_training_stage_and_leave_conversions_alone():
    run = Overrides(epochs=1, limit=50, out="o.pt", data="imgs").apply(
        load_config(ROOT / "configs/mnist.toml")
    )
    convert, generic, occluder = run.stages
    for conversion in (convert, occluder):
        assert conversion.epochs is None
        assert conversion.train_limit is None
    assert (generic.epochs, generic.train_limit, generic.test_limit) == (1, 50, 50)
    assert run.out == "o.pt"
    assert (run.data.dataset, run.data.path) == ("images", "imgs")


@pytest.mark.slow
def test_the_served_mnist_config_trains_one_epoch_on_a_subset(tmp_path, cama_serve):
    """``cama-serve train --config configs/mnist.toml --epochs 1 --limit N``: every stage runs (the
    conversion of the shipped clean model, eq. 5 on N images, the occluder settings) and the
    checkpoint records the config file and the overrides."""
    out = tmp_path / "mnist.pt"
    args = ["--config", "configs/mnist.toml", "--epochs", "1", "--limit", "160", "--threads", "1"]
    proc = cama_serve("train", *args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m training.train_cama --convert models/mnist_cama_clean.pt" in proc.stdout
    _, meta = load_checkpoint(out)
    assert meta.provenance["config"]["text"] == (ROOT / "configs/mnist.toml").read_text()
    assert meta.provenance["config"]["overrides"] == {
        "epochs": 1,
        "limit": 160,
        "out": str(out),
        "threads": 1,
    }
    assert meta.provenance["train_config"]["augment"] == "generic"
    assert meta.provenance["adapt_recipe"] == load_config(ROOT / "configs/mnist.toml").adapt_recipe()
    assert meta.config["m_pathway"] == "transform"
    assert "field" in meta.config["transforms"]
    assert (meta.config["field_inverse"], meta.config["theta_prior_std"]) == ("mask", 0.1)  # last stage
    assert 0.0 <= meta.metrics["test_accuracy"] <= 1.0
    evaluated = cama_serve("evaluate", "--checkpoint", str(out), "--limit", "40", "--k", "2")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["images"] == 40
    assert 0.5 < result["accuracy"] <= 1.0  # a trained MNIST model


def test_a_convert_stage_passes_its_network_settings():
    steps = plan(load_config(ROOT / "configs/mnist.toml"))
    occluder = steps[-1]
    assert occluder.argv[:2] == ["--convert", str(steps[1].out)]
    settings = json.loads(occluder.argv[occluder.argv.index("--networks") + 1])
    assert settings == {"field_inverse": "mask", "theta_prior_std": 0.1}


def test_convert_sets_inference_settings_and_refuses_a_change_of_shape(tmp_path):
    torch.manual_seed(0)
    model = with_m_pathway(ImageCama(ImageCamaConfig.tiny()), "transform")
    source = tmp_path / "tiny.pt"
    save_checkpoint(source, model, provenance={}, metrics={})
    out = tmp_path / "masked.pt"
    train_cama.convert(source, "transform", out, {"field_inverse": "mask", "theta_prior_std": 0.1})
    masked, _ = load_checkpoint(out)
    assert isinstance(masked, ImageCama)
    assert (masked.config.field_inverse, masked.config.theta_prior_std) == ("mask", 0.1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(masked.state_dict()[key], value)
    with pytest.raises(SystemExit, match="networks"):
        train_cama.convert(source, "transform", tmp_path / "wider.pt", {"dim_z": 8})
    with pytest.raises(SystemExit, match="networks"):
        train_cama.convert(source, "transform", tmp_path / "bad.pt", {"field_inverse": "cut"})


def test_only_a_convert_stage_takes_network_settings():
    run = load_config(ROOT / "configs/mnist.toml")
    generic = run.stages[1]
    bad = dataclasses.replace(generic, networks={"field_inverse": "mask"})
    with pytest.raises(ConfigError, match="convert stages"):
        stage_command(run, bad, Path("out.pt"), Path("in.pt"))
