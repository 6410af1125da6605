"""Plots of the MNIST results, drawn from the flat figures the evaluation measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

SHIFT_TITLES = {"vshift": "vertical shift", "hshift": "horizontal shift"}


def _series(data: dict[str, float], pattern: str) -> tuple[list[float], list[float]]:
    """Points ``(range, value)`` of keys ``pattern.format(r=...)`` that exist, sorted by range."""
    xs, ys = [], []
    for r in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
        key = pattern.format(r=r)
        if key in data:
            xs.append(r)
            ys.append(data[key])
    return xs, ys


def _panel(ax: Any, data: dict[str, float], lines: dict[str, str], title: str) -> bool:
    drawn = False
    for label, pattern in lines.items():
        xs, ys = _series(data, pattern)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("shift range")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def plot_mnist(data: dict[str, float], out: Path) -> list[Path]:
    """Write fig1.png and fig7.png (and fig7_paper.png) where their figures exist."""
    written: list[Path] = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, shift in zip(axes, SHIFT_TITLES, strict=True):
        drawn |= _panel(
            ax,
            data,
            {
                "DNN (clean training)": f"mnist.fig1.{shift}.{{r}}.dnn",
                "DNN + vertical-shift augmentation": f"mnist.fig1.{shift}.{{r}}.dnn_aug_v",
                "DNN + horizontal-shift augmentation": f"mnist.fig1.{shift}.{{r}}.dnn_aug_h",
            },
            f"Fig. 1: DNN, test {SHIFT_TITLES[shift]}",
        )
    if drawn:
        path = out / "fig1.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)
    for name, suffix in (("cama", ""), ("cama_paper", "_paper")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        drawn = False
        for ax, shift in zip(axes, SHIFT_TITLES, strict=True):
            drawn |= _panel(
                ax,
                data,
                {
                    "DNN": f"mnist.{shift}.{{r}}.dnn",
                    "TENT (BN-CNN, dense head)": f"mnist.{shift}.{{r}}.tent",
                    "TENT (BN-CNN, global pooling)": f"mnist.{shift}.{{r}}.tent_gap",
                    "CAMA": f"mnist.{shift}.{{r}}.{name}",
                    "CAMA + FT on vertical shift": f"mnist.{shift}.{{r}}.{name}_ft_v",
                    "CAMA + FT on horizontal shift": f"mnist.{shift}.{{r}}.{name}_ft_h",
                },
                f"Fig. 7 ({name}): test {SHIFT_TITLES[shift]}",
            )
        if drawn:
            path = out / f"fig7{suffix}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    written += _plot_fig10(data, out)
    written += _plot_fig8(data, out)
    return written


def _plot_fig10(data: dict[str, float], out: Path) -> list[Path]:
    """Fig. 10: CAMA trained with shift-augmented data, before and after fine-tuning."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    drawn = False
    for ax, shift in zip(axes, SHIFT_TITLES, strict=True):
        drawn |= _panel(
            ax,
            data,
            {
                "CAMA (clean training)": f"mnist.{shift}.{{r}}.cama",
                "CAMA + vertical-shift augmentation": f"mnist.fig10.{shift}.{{r}}.cama_aug_v",
                "  + FT on the test shift": f"mnist.fig10.{shift}.{{r}}.cama_aug_v_ft",
                "CAMA + horizontal-shift augmentation": f"mnist.fig10.{shift}.{{r}}.cama_aug_h",
                "  + FT on the test shift ": f"mnist.fig10.{shift}.{{r}}.cama_aug_h_ft",
            },
            f"Fig. 10: test {SHIFT_TITLES[shift]}",
        )
    path = out / "fig10.png"
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path] if drawn else []


def _plot_fig8(data: dict[str, float], out: Path) -> list[Path]:
    """Fig. 8: accuracy after fine-tuning on a fraction of the manipulated test set."""
    points = sorted(
        (float(key.split(".frac.")[1].rsplit(".", 1)[0]), value)
        for key, value in data.items()
        if key.startswith("mnist.fig8.vshift.0.3.frac.") and key.endswith(".cama")
    )
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([100 * f for f, _ in points], [v for _, v in points], marker="o", label="CAMA + FT")
    if "mnist.vshift.0.3.cama" in data:
        ax.axhline(data["mnist.vshift.0.3.cama"], color="grey", ls="--", label="CAMA, no FT")
    ax.set_xscale("log")
    ax.set_xlabel("% of the test set used for fine-tuning")
    ax.set_ylabel("test accuracy (vertical shift 0.3)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fig. 8: data needed to adapt")
    path = out / "fig8.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def image_grid(rows: list[np.ndarray], titles: list[str], path: Path) -> Path:
    """Save rows of 28x28 images (each row ``(N, 28, 28)``) as one PNG."""
    n = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0))
    for i, row in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
