"""Smoke runs of the MNIST command-line entry points with the cheapest settings (real data)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cama.adapt import FinetuneConfig
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from experiments.eval_cache import recipe_id

ENTRY_POINTS = {
    "training.train_cama",
    "training.train_baseline",
    "experiments.evaluate_mnist",
    "experiments.ft_seed_spread",
    "experiments.evaluate_mnistc",
    "training.data",
}


def run(module: str, *args: str, timeout: int = 900) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"{module} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_every_mnist_entry_point_is_smoke_tested():
    """A new ``training/*.py`` or ``experiments/*.py`` with a ``main`` must be listed here (or in
    another smoke test)."""
    root = Path(__file__).resolve().parent.parent
    with_main = {
        f"{package}.{p.stem}"
        for package in ("training", "experiments")
        for p in (root / package).glob("*.py")
        if 'if __name__ == "__main__"' in p.read_text()
    }
    other_suites = {
        "training.train_measurement",
        "experiments.evaluate_measurement",
        "experiments.check_measurement_gate",
        "experiments.measurement_oracles",
        "training.export_model",
        "experiments.evaluate_adversarial",  # tests/test_attacks.py runs it end to end
        "experiments.evaluate_cifar",  # tests/test_cli_cifar.py
    }
    assert with_main - other_suites <= ENTRY_POINTS, with_main - other_suites - ENTRY_POINTS


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(tmp_path):
    cama_ckpt = tmp_path / "cama.pt"
    run("training.train_cama", "--tiny", "--dry-run", "--train-limit", "400", "--out", str(cama_ckpt))
    model, meta = load_checkpoint(cama_ckpt)
    assert isinstance(model, ImageCama)
    assert meta.provenance["dataset"] == "mnist"
    assert len(meta.provenance["data_sha256"]) == 64
    assert "val_accuracy" in meta.metrics
    # resuming a finished run does not train again and keeps the checkpoint loadable
    run(
        "training.train_cama",
        "--tiny",
        "--dry-run",
        "--train-limit",
        "400",
        "--resume",
        "--out",
        str(cama_ckpt),
    )

    # a warm start: a new optimiser and schedule from the weights of a checkpoint
    warm = tmp_path / "warm.pt"
    run(
        "training.train_cama",
        *("--dry-run", "--train-limit", "400", "--init-from", str(cama_ckpt), "--lr", "1e-9"),
        *("--out", str(warm)),
    )
    warm_model, warm_meta = load_checkpoint(warm)
    assert warm_meta.provenance["init_sha256"] == sha256_file(cama_ckpt)
    assert warm_model.config == model.config  # the tiny config comes from the checkpoint, not --tiny
    start = dict(model.named_parameters())
    for name, p in warm_model.named_parameters():  # one step at lr 1e-9 leaves the weights where they were
        torch.testing.assert_close(p, start[name], rtol=0, atol=1e-6)

    served = tmp_path / "served.pt"
    run("training.train_cama", "--convert", str(cama_ckpt), "--m-pathway", "transform", "--out", str(served))
    served_model, served_meta = load_checkpoint(served)
    assert isinstance(served_model, ImageCama)
    assert served_model.config.m_pathway == "transform"
    assert served_meta.provenance["converted_from"] == str(cama_ckpt)

    # eq. 5 training on shift-augmented data (fig. 10), the served pathway
    aug = tmp_path / "aug.pt"
    run(
        "training.train_cama",
        *("--tiny", "--dry-run", "--train-limit", "400", "--augment", "vshift", "--m-pathway", "transform"),
        *("--out", str(aug)),
    )
    aug_model, _ = load_checkpoint(aug)
    assert isinstance(aug_model, ImageCama)
    assert aug_model.config.m_pathway == "transform"

    dnn = tmp_path / "dnn.pt"
    bncnn = tmp_path / "bncnn.pt"
    run("training.train_baseline", "--model", "dnn", "--dry-run", "--train-limit", "400", "--out", str(dnn))
    run(
        "training.train_baseline",
        "--model",
        "bncnn",
        "--dry-run",
        "--train-limit",
        "400",
        "--out",
        str(bncnn),
    )

    out_dir = tmp_path / "results"
    stdout = run(
        "experiments.evaluate_mnist",
        *(
            "--checkpoint",
            str(cama_ckpt),
            "--dnn",
            str(dnn),
            "--dnn-aug-v",
            str(dnn),
            "--dnn-aug-h",
            str(dnn),
        ),
        *(
            "--bncnn",
            str(bncnn),
            "--bncnn-gap",
            str(bncnn),
            "--sections",
            "clean",
            "fig1",
            "fig7",
            "noise",
            "fig9",
            "fig10",
            "tent_lr",
        ),
        *("--cama-aug-v", str(aug), "--cama-aug-h", str(aug)),
        *(
            "--ranges",
            "0.3",
            "--k",
            "1",
            "--score-limit",
            "16",
            "--ft-steps",
            "2",
            "--gate-holdout",
            "8",
            "--canary",
            "32",
        ),
        *("--out-dir", str(out_dir), "--ft-cache", str(tmp_path / "ft")),
    )
    assert "mnist.vshift.0.3.cama_ft_v" in stdout
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in (
        "mnist.clean.cama",
        "mnist.clean.cama_paper",
        "mnist.clean.dnn",
        "mnist.clean.tent",
        "mnist.clean.bncnn",
        "mnist.vshift.0.3.bncnn_gap",
        "mnist.noise.0.3.bncnn",
        "mnist.vshift.0.3.tent_lr.0.0001",
        "mnist.hshift.0.3.tent_gap_lr.0.03",
        "mnist.vshift.0.3.cama_ft_h",
        "mnist.hshift.0.3.cama_paper_ft_v",
        "mnist.noise.0.3.cama_ft",
        "mnist.clean_after_ft_v.cama",
        "mnist.clean_after_ft_noise.cama",
        "mnist.train_epoch_seconds.cama",
        "mnist.fig10.vshift.0.3.cama_aug_v",
        "mnist.fig10.hshift.0.3.cama_aug_h_ft",
    ):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0 or key.endswith("seconds.cama")
    assert (out_dir / "fig7.png").stat().st_size > 1000
    assert (out_dir / "fig9.png").stat().st_size > 1000
    assert (out_dir / "fig10.png").stat().st_size > 1000
    assert "python -m experiments.evaluate_mnist" in (out_dir / "mnist.md").read_text()
    assert "| vshift 0.3, dense head |" in (out_dir / "mnist.md").read_text()
    # the fine-tuned weights were cached and a second run reuses every figure
    assert list((tmp_path / "ft").rglob("ft_*.pt"))
    again = run(
        "experiments.evaluate_mnist",
        *(
            "--checkpoint",
            str(cama_ckpt),
            "--dnn",
            str(dnn),
            "--dnn-aug-v",
            str(dnn),
            "--dnn-aug-h",
            str(dnn),
        ),
        *("--bncnn", str(bncnn), "--bncnn-gap", str(bncnn), "--sections", "clean", "fig7", "--ranges", "0.3"),
        *("--k", "1"),
        *(
            "--score-limit",
            "16",
            "--clean-limit",
            "16",
            "--ft-steps",
            "2",
            "--out-dir",
            str(out_dir),
            "--ft-cache",
            str(tmp_path / "ft"),
        ),
    )
    assert "mnist.vshift.0.3.cama_ft_v" not in again  # nothing recomputed
    # another fine-tuning recipe (the constant step): its figures are measured anew (in a copy)
    out_constant = tmp_path / "constant"
    shutil.copytree(out_dir, out_constant)
    constant = run(
        "experiments.evaluate_mnist",
        *("--checkpoint", str(cama_ckpt), "--sections", "fig7", "--ranges", "0.3", "--variants", "cama"),
        *("--dnn", str(dnn), "--bncnn", str(bncnn), "--bncnn-gap", str(bncnn), "--k", "1"),
        *("--score-limit", "16", "--ft-steps", "2", "--ft-schedule", "constant"),
        *("--gate-holdout", "8", "--canary", "32"),
        *("--out-dir", str(out_constant), "--ft-cache", str(tmp_path / "ft_constant")),
    )
    assert "mnist.vshift.0.3.cama_ft_v" in constant
    assert "mnist.vshift.0.3.dnn" not in constant  # figures without fine-tuning are reused
    entry = json.loads((out_constant / "mnist_eval.json").read_text())["mnist.vshift.0.3.cama_ft_v"]
    constant_recipe = recipe_id(replace(FinetuneConfig(), lr_schedule="constant", max_steps=2))
    assert entry["recipe"] == constant_recipe
    # the run's tables mark the figures of the other recipe (the first run's) with a dagger
    assert "†" not in (out_dir / "mnist.md").read_text()
    assert re.search(r"\| \d\.\d{4} † \|", (out_constant / "mnist.md").read_text())
    # --again-ft: the fine-tuned figures are measured again, the others reused
    again_ft = run(
        "experiments.evaluate_mnist",
        *("--checkpoint", str(cama_ckpt), "--sections", "fig7", "--ranges", "0.3", "--variants", "cama"),
        *("--dnn", str(dnn), "--bncnn", str(bncnn), "--bncnn-gap", str(bncnn), "--k", "1"),
        *("--score-limit", "16", "--ft-steps", "2", "--ft-schedule", "constant", "--again-ft"),
        *("--gate-holdout", "8", "--canary", "32"),
        *("--out-dir", str(out_constant), "--ft-cache", str(tmp_path / "ft_again")),
    )
    assert "fine-tuned figures to measure them again" in again_ft
    assert "mnist.vshift.0.3.cama_ft_v" in again_ft
    assert "mnist.vshift.0.3.dnn" not in again_ft
    # the fine-tuning seed spread: seed 1 beside evaluate_mnist's seed 0, in one table
    seeds = tmp_path / "seeds.json"
    table = run(
        "experiments.ft_seed_spread",
        *("--checkpoint", str(cama_ckpt), "--ranges", "0.3", "--seeds", "1", "--k", "1"),
        *("--score-limit", "16", "--ft-steps", "2", "--out", str(seeds)),
        *("--evaluated", str(out_dir / "mnist_eval.json")),
    )
    spread = json.loads(seeds.read_text())
    assert sorted(spread) == sorted(
        f"mnist.ft_seed.1.{scored}.0.3.cama_ft_{tag}" for scored in ("vshift", "hshift") for tag in "vh"
    )
    assert {entry["model"] for entry in spread.values()} == {sha256_file(cama_ckpt)[:12]}
    assert "| vshift | hshift | 0.3 |" in table
    assert "| hshift | hshift | 0.3 |" in table
    assert "| hshift | vshift | 0.3 |" in seeds.with_suffix(".md").read_text()
    recipe = recipe_id(replace(FinetuneConfig(), max_steps=2))
    assert {entry["recipe"] for entry in spread.values()} == {recipe}
    # another recipe: measured anew, and its table pairs it with evaluate_mnist's seed 0 of that recipe
    constant_table = run(
        "experiments.ft_seed_spread",
        *("--checkpoint", str(cama_ckpt), "--ranges", "0.3", "--seeds", "1", "--k", "1"),
        *("--score-limit", "16", "--ft-steps", "2", "--ft-schedule", "constant"),
        *("--out", str(seeds)),
        *("--evaluated", str(out_constant / "mnist_eval.json")),
    )
    assert {entry["recipe"] for entry in json.loads(seeds.read_text()).values()} == {constant_recipe}
    assert "| vshift | hshift | 0.3 |" in constant_table
    assert constant_recipe in seeds.with_suffix(".md").read_text()
    # another checkpoint: its CAMA figures are measured anew, the baselines' are reused
    other = run(
        "experiments.evaluate_mnist",
        *("--checkpoint", str(warm), "--dnn", str(dnn), "--bncnn", str(bncnn), "--bncnn-gap", str(bncnn)),
        *("--sections", "clean", "--k", "1", "--clean-limit", "16", "--score-limit", "16"),
        *("--out-dir", str(out_dir), "--ft-cache", str(tmp_path / "ft")),
    )
    assert "dropped" in other
    assert "mnist.clean.cama " in other
    assert "mnist.clean.dnn" not in other
    cache = json.loads((out_dir / "mnist_eval.json").read_text())
    assert "mnist.vshift.0.3.cama_ft_v" not in cache  # the first model's figure is gone
    assert "mnist.vshift.0.3.dnn" in cache
    assert torch.load(next((tmp_path / "ft").rglob("ft_*.pt")), weights_only=False)["info"]["gate"]

    # eq. 5 with the generic family and the field mechanism, then MNIST-C through /adapt's code path
    generic = tmp_path / "generic.pt"
    transforms = ("warp", "blur", "photometric", "outlier", "field", "clean")
    run(
        "training.train_cama",
        *("--init-from", str(served), "--transforms", *transforms, "--augment", "generic"),
        *("--dry-run", "--train-limit", "400", "--out", str(generic)),
    )
    generic_model, generic_meta = load_checkpoint(generic)
    assert "field" in generic_model.config.transforms
    assert "val_accuracy_manipulated" in generic_meta.metrics
    mnistc_out = tmp_path / "mnistc"
    text = run(
        "experiments.evaluate_mnistc",
        *(
            "--checkpoint",
            str(generic),
            "--dnn",
            str(dnn),
            "--bncnn-gap",
            str(bncnn),
            "--bncnn-flat",
            str(bncnn),
        ),
        *("--corruptions", "fog", "--ns", "20", "--score-limit", "16", "--validation-limit", "40"),
        *("--out-dir", str(mnistc_out)),
    )
    assert "mnistc.fog.cama_ft.n20" in text
    metrics = json.loads((mnistc_out / "metrics.json").read_text())
    for key in (
        "mnistc.fog.dnn.n20",
        "mnistc.fog.bncnn_flat.n20",
        "mnistc.fog.tent_flat.n20",
        "mnistc.fog.tent_gap_online.n20",
        "mnistc.fog.cama.n20",
        "mnistc.fog.cama_ft.n20",
        "mnistc.fog.clean_after_ft.n20",
        "mnistc.clean.cama",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["mnistc.fog.gate_accepted.n20"] in (0.0, 1.0)
    assert "| fog |" in (mnistc_out / "mnistc.md").read_text()
    assert (mnistc_out / "mnistc.png").stat().st_size > 1000
    again = run(
        "experiments.evaluate_mnistc",
        *(
            "--checkpoint",
            str(generic),
            "--dnn",
            str(dnn),
            "--bncnn-gap",
            str(bncnn),
            "--bncnn-flat",
            str(bncnn),
        ),
        *("--corruptions", "fog", "--ns", "20", "--score-limit", "16", "--validation-limit", "40"),
        *("--out-dir", str(mnistc_out)),
    )
    assert "mnistc.fog.cama_ft.n20" not in again  # every figure reused from the cache
