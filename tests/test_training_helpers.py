"""Small pure helpers of the training CLIs: time budgets, devices, result tables and plots."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cama.runtime import DeviceError, resolve_device
from experiments.eval_cache import Cache, recipe_id
from experiments.experiment import add_recipe_args, recipe_from_args
from experiments.mnist_report import summary_tables
from experiments.mnist_sections import EvalConfig, same_recipe
from experiments.plots import plot_mnist
from training.train_cama import epochs_within


def test_epochs_within_a_time_budget():
    assert epochs_within(600.0, 60.0, 40) == 10
    assert epochs_within(600.0, 60.0, 5) == 5  # never more than planned
    assert epochs_within(10.0, 60.0, 40) == 1  # at least one (the one already run)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cache_reuses_a_cama_figure_only_for_the_checkpoint_it_scored(tmp_path: Path):
    cache = Cache(tmp_path / "eval.json", force=False)
    calls: list[str] = []

    def measure(value: float) -> float:
        calls.append("measured")
        return value

    assert cache.get("mnist.clean.dnn", lambda: measure(0.98)) == 0.98
    assert cache.get("mnist.clean.cama", lambda: measure(0.97), model="aaaa") == 0.97
    assert cache.get("mnist.clean.cama", lambda: measure(0.5), model="aaaa") == 0.97  # cached
    assert cache.get("mnist.clean.dnn", lambda: measure(0.5)) == 0.98
    assert len(calls) == 2
    assert cache.get("mnist.clean.cama", lambda: measure(0.99), model="bbbb") == 0.99  # other model
    assert len(calls) == 3
    assert cache.fresh("mnist.clean.cama", "bbbb")
    assert not cache.fresh("mnist.clean.cama", "aaaa")

    # a new checkpoint: the old model's figures go, baselines and kept keys stay
    reread = Cache(tmp_path / "eval.json", force=False)
    reread.put("mnist.fig10.clean.cama_aug_v", {"value": 0.9, "model": "cccc"})
    reread.put("mnist.vshift.0.3.cama", {"value": 0.45, "model": "aaaa"})
    dropped = reread.forget_other("bbbb", keep=lambda key: key.startswith("mnist.fig10."))
    assert dropped == ["mnist.vshift.0.3.cama"]
    assert set(reread.data) == {"mnist.clean.dnn", "mnist.clean.cama", "mnist.fig10.clean.cama_aug_v"}

    # merging a parallel run's cache: new keys and this model's new figures are taken
    other = {
        "mnist.clean.dnn": {"value": 0.1},  # a baseline this cache has: kept as it is
        "mnist.clean.cama": {"value": 0.98, "model": "bbbb"},  # this model, re-measured: taken
        "mnist.noise.0.3.cama": {"value": 0.8, "model": "bbbb"},  # new: taken
    }
    assert reread.merge(other, "bbbb") == 2
    assert reread.data["mnist.clean.dnn"]["value"] == 0.98
    assert reread.data["mnist.clean.cama"]["value"] == 0.98
    assert Cache(tmp_path / "eval.json", force=False).data == reread.data  # written through


RECIPE = (
    "alpha=0.5,batch_size=32,bf16=True,decay_fraction=0.2,epochs=2,lr=0.001,lr_schedule=cosine,"
    "max_steps=None,min_steps=200,seed=0"
)
CONSTANT = (
    "alpha=0.5,batch_size=32,bf16=True,epochs=2,lr=0.001,lr_schedule=constant,"
    "max_steps=None,min_steps=200,seed=0"
)


def test_cache_reuses_a_fine_tuned_figure_only_under_its_recipe(tmp_path: Path):
    recipe = recipe_id(EvalConfig().ft)
    assert recipe == RECIPE
    # decay_fraction does nothing under a constant step, so it is left out
    constant = recipe_id(replace(EvalConfig().ft, lr_schedule="constant"))
    assert constant == CONSTANT
    cache = Cache(tmp_path / "eval.json", force=False)
    cache.put("mnist.vshift.0.3.cama_ft_v", {"value": 0.95, "model": "aaaa", "recipe": constant})
    assert cache.fresh("mnist.vshift.0.3.cama_ft_v", "aaaa", constant)
    assert not cache.fresh("mnist.vshift.0.3.cama_ft_v", "aaaa", recipe)
    assert cache.get("mnist.vshift.0.3.cama_ft_v", lambda: 0.96, model="aaaa", recipe=recipe) == 0.96
    assert cache.data["mnist.vshift.0.3.cama_ft_v"]["recipe"] == recipe
    assert cache.get("mnist.vshift.0.3.cama_ft_v", lambda: 0.5, model="aaaa", recipe=recipe) == 0.96

    # merging a parallel run seeded from the same old cache: its old-recipe copies do not replace
    # this run's new figures, and its new figures replace this cache's old ones
    other = {
        "mnist.vshift.0.3.cama_ft_v": {"value": 0.95, "model": "aaaa", "recipe": constant},  # not taken
        "mnist.hshift.0.3.cama_ft_h": {"value": 0.97, "model": "aaaa", "recipe": recipe},  # taken
    }
    cache.put("mnist.hshift.0.3.cama_ft_h", {"value": 0.93, "model": "aaaa", "recipe": constant})
    assert cache.merge(other, "aaaa", recipe) == 1
    assert cache.data["mnist.vshift.0.3.cama_ft_v"]["value"] == 0.96
    assert cache.data["mnist.hshift.0.3.cama_ft_h"]["value"] == 0.97
    old = {"mnist.vshift.0.3.cama_ft_v": {"value": 0.95, "model": "aaaa", "recipe": constant}}
    assert cache.merge(old, "aaaa") == 1
    assert cache.data["mnist.vshift.0.3.cama_ft_v"]["value"] == 0.95  # without a recipe: the last

    # saved fine-tuned weights: reused only if made with the same settings
    saved = EvalConfig().ft.as_dict()
    assert same_recipe(saved, EvalConfig().ft)
    assert not same_recipe({**saved, "lr_schedule": "constant"}, EvalConfig().ft)
    assert not same_recipe({**saved, "an_unknown_option": 1}, EvalConfig().ft)
    assert not same_recipe(None, EvalConfig().ft)


def _figures() -> dict[str, float]:
    return {
        "mnist.vshift.0.3.dnn": 0.43,
        "mnist.vshift.0.3.cama": 0.45,
        "mnist.vshift.0.3.cama_ft_v": 0.95,
        "mnist.vshift.0.3.bncnn_gap": 0.93,
        "mnist.vshift.0.3.tent_lr.0.01": 0.55,
        "mnist.noise.0.3.cama_paper_ft": 0.10,
        "mnist.fig10.hshift.0.5.cama_aug_v": 0.27,
        "mnist.fig8.vshift.0.3.frac.0.01.cama": 0.95,
        "mnist.fig8.vshift.0.3.frac.0.1.cama": 0.96,
    }


def test_summary_tables_place_each_figure_in_its_row_and_column():
    text = "\n".join(summary_tables(_figures()))
    assert "| vshift 0.3 | 0.4300 |  |  | 0.9300 |  | 0.4500 | 0.9500 |  |" in text
    assert "| noise 0.3 |  |  |  |  |  |  |  |  | 0.1000 |" in text
    # TENT's step-size sweep: lr 1e-2 is the fifth of six columns, then CAMA + FT on that shift
    assert "| vshift 0.3, dense head |  |  |  |  | 0.5500 |  | 0.9500 |" in text
    assert "hshift 0.3, dense head" not in text
    assert "| hshift 0.5 | 0.2700 |  |  |  |" in text
    assert "vshift 0.1" not in text  # rows without any figure are left out


def test_recipe_options_change_the_evaluation_recipe():
    parser = argparse.ArgumentParser()
    add_recipe_args(parser)
    base = EvalConfig().ft
    assert recipe_from_args(parser.parse_args([]), base) == base
    assert recipe_from_args(parser.parse_args(["--ft-decay", "0.5"]), base).decay_fraction == 0.5
    assert recipe_id(recipe_from_args(parser.parse_args(["--ft-schedule", "constant"]), base)) == CONSTANT
    assert recipe_from_args(parser.parse_args(["--ft-steps", "3"]), base).max_steps == 3


def test_figures_of_another_recipe_are_marked_in_the_tables(tmp_path: Path):
    cache = Cache(tmp_path / "eval.json", force=False)
    recipe = recipe_id(EvalConfig().ft)
    for key in (
        "mnist.vshift.0.3.cama_ft_v",
        "mnist.clean_after_ft_v.0.3.cama",
        "mnist.fig8.vshift.0.3.frac.0.01.cama",
        "mnist.blur.1.cama_gate_accepted",
        "mnist.fig10.vshift.0.3.cama_aug_v_ft",
    ):
        cache.put(key, {"value": 0.9, "model": "aaaa", "recipe": CONSTANT})
        assert cache.recipe_of(key) == CONSTANT
    for key in ("mnist.vshift.0.3.cama", "mnist.vshift.0.3.tent", "mnist.fig1.vshift.0.3.dnn_aug_v"):
        cache.put(key, {"value": 0.5})
        assert cache.recipe_of(key) is None  # measured without fine-tuning
    cache.put("mnist.hshift.0.3.cama_ft_h", {"value": 0.9, "model": "aaaa", "recipe": recipe})
    assert cache.recipe_of("mnist.hshift.0.3.cama_ft_h") == recipe
    # --again-ft: this checkpoint's fine-tuned figures go, the rest stay
    kept = Cache(tmp_path / "eval.json", force=False)
    kept.put("mnist.fig10.vshift.0.3.cama_aug_v_ft", {"value": 0.9, "model": "cccc", "recipe": CONSTANT})
    assert len(kept.forget_fine_tuned("aaaa")) == 5
    assert set(kept.data) == {
        "mnist.vshift.0.3.cama",
        "mnist.vshift.0.3.tent",
        "mnist.fig1.vshift.0.3.dnn_aug_v",
        "mnist.fig10.vshift.0.3.cama_aug_v_ft",
    }
    figures = {"mnist.vshift.0.3.cama_ft_v": 0.95, "mnist.vshift.0.3.cama_ft_h": 0.92}
    text = "\n".join(summary_tables(figures, {"mnist.vshift.0.3.cama_ft_v"}))
    assert "| vshift 0.3 |  |  |  |  |  |  | 0.9500 † | 0.9200 |" in text


def test_plots_are_written_only_for_measured_figures(tmp_path: Path):
    written = {p.name for p in plot_mnist(_figures(), tmp_path)}
    assert {"fig7.png", "fig8.png", "fig10.png"} <= written
    assert "fig1.png" not in written
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


def test_zero_m_inference_gives_every_input_the_same_m():
    from cama.config import ImageCamaConfig
    from cama.image_model import ImageCama
    from experiments.experiment import zero_m_inference

    model = ImageCama(ImageCamaConfig.tiny(m_pathway="transform"))
    model.reinit_m_inference()
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(model.infer_m(x)[0][0], model.infer_m(x)[0][1])
    zero_m_inference(model)
    mu, logvar = model.infer_m(x)
    assert torch.equal(mu, torch.zeros_like(mu))
    assert torch.allclose(logvar, torch.full_like(logvar, ImageCamaConfig.q_m_logvar_init))


def test_the_mnistc_table_shows_the_measuring_command_without_output_only_options():
    from experiments.evaluate_mnistc import measuring_args

    argv = ["--ns", "100", "500", "--sections", "--merge", "a.json", "b.json", "--threads", "2", "--force"]
    assert measuring_args(argv) == ["--ns", "100", "500", "--threads", "2"]
    assert measuring_args(["--corruptions", "fog", "--ns", "500"]) == ["--corruptions", "fog", "--ns", "500"]
