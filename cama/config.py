"""Configuration dataclasses: every width and dimension of a CAMA network comes from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MPathway = Literal["additive", "transform"]
Transform = Literal["warp", "blur", "photometric", "outlier", "field", "clean"]
ALL_TRANSFORMS: tuple[Transform, ...] = ("warp", "blur", "photometric", "outlier", "clean")
KNOWN_TRANSFORMS: tuple[Transform, ...] = (*ALL_TRANSFORMS, "field")


@dataclass(frozen=True)
class ImageCamaConfig:
    """Deep CAMA for images (paper section 3.1, appendix C "MNIST experiments").

    ``m_pathway="additive"`` is the appendix-C model: NN_M^p's features are added to NN_Y^p's and
    NN_Z^p's before the shared deconvolution stack. ``m_pathway="transform"`` keeps that clean model
    (with NN_M^p frozen at do(m=0)) and lets m act through a second network whose heads drive
    observation mechanisms M -> X that are the identity at m = 0 (see ``cama.image_model``).
    """

    kind: Literal["image"] = "image"
    num_classes: int = 10
    image_size: int = 28
    dim_z: int = 64
    dim_m: int = 32
    y_layers: tuple[int, ...] = (500, 500)
    z_layers: tuple[int, ...] = (500, 500)
    m_layers: tuple[int, ...] = (500, 500, 500, 500)
    merge_channels: int = 64
    encoder_channels: int = 64
    encoder_hidden: int = 500
    z_head_hidden: int = 500
    m_pathway: MPathway = "additive"
    transforms: tuple[Transform, ...] = field(default=ALL_TRANSFORMS)
    transform_layers: tuple[int, ...] = (500, 500, 500, 500)
    cleaner_channels: int = 16
    blur_kernel: int = 5
    q_m_logvar_init: float = -4.0

    def __post_init__(self) -> None:
        if self.image_size != 28:
            raise ValueError("the appendix-C deconvolution stack (4->7->14->28) needs 28x28 images")
        unknown = set(self.transforms) - set(KNOWN_TRANSFORMS)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}; known: {KNOWN_TRANSFORMS}")

    @classmethod
    def tiny(cls, **overrides: object) -> ImageCamaConfig:
        """A few-thousand-parameter model with the same structure, for fast tests."""
        base: dict[str, object] = {
            "dim_z": 4,
            "dim_m": 3,
            "y_layers": (16,),
            "z_layers": (16,),
            "m_layers": (16, 16),
            "merge_channels": 4,
            "encoder_channels": 4,
            "encoder_hidden": 16,
            "z_head_hidden": 16,
            "transform_layers": (16,),
            "cleaner_channels": 2,
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]
