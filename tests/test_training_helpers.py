"""Small pure helpers of the training CLIs: time budgets, devices, result tables and plots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.evaluate_mnist import summary_tables
from training.experiment import resolve_device
from training.plots import plot_mnist
from training.train_cama import epochs_within


def test_epochs_within_a_time_budget():
    assert epochs_within(600.0, 60.0, 40) == 10
    assert epochs_within(600.0, 60.0, 5) == 5  # never more than planned
    assert epochs_within(10.0, 60.0, 40) == 1  # at least one (the one already run)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            resolve_device("cuda")


def _figures() -> dict[str, float]:
    return {
        "mnist.vshift.0.3.dnn": 0.43,
        "mnist.vshift.0.3.cama": 0.45,
        "mnist.vshift.0.3.cama_ft_v": 0.95,
        "mnist.noise.0.3.cama_paper_ft": 0.10,
        "mnist.fig10.hshift.0.5.cama_aug_v": 0.27,
        "mnist.fig8.vshift.0.3.frac.0.01.cama": 0.95,
        "mnist.fig8.vshift.0.3.frac.0.1.cama": 0.96,
    }


def test_summary_tables_place_each_figure_in_its_row_and_column():
    text = "\n".join(summary_tables(_figures()))
    assert "| vshift 0.3 | 0.4300 |  |  | 0.4500 | 0.9500 |  |" in text
    assert "| noise 0.3 |  |  |  |  |  |  | 0.1000 |" in text
    assert "| hshift 0.5 | 0.2700 |  |  |  |" in text
    assert "vshift 0.1" not in text  # rows without any figure are left out


def test_plots_are_written_only_for_measured_figures(tmp_path: Path):
    written = {p.name for p in plot_mnist(_figures(), tmp_path)}
    assert {"fig7.png", "fig8.png", "fig10.png"} <= written
    assert "fig1.png" not in written
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


def test_zero_m_inference_gives_every_input_the_same_m():
    from cama.config import ImageCamaConfig
    from cama.image_model import ImageCama
    from training.experiment import zero_m_inference

    model = ImageCama(ImageCamaConfig.tiny(m_pathway="transform"))
    model.reinit_m_inference()
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(model.infer_m(x)[0][0], model.infer_m(x)[0][1])
    zero_m_inference(model)
    mu, logvar = model.infer_m(x)
    assert torch.equal(mu, torch.zeros_like(mu))
    assert torch.allclose(logvar, torch.full_like(logvar, ImageCamaConfig.q_m_logvar_init))
