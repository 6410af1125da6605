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
    """Deep CAMA for ``channels x H x W`` images (paper section 3.1, appendix C).

    The defaults are appendix C's "MNIST experiments" (1 x 28 x 28); :meth:`cifar_binary` gives its
    "CIFAR-binary experiments". ``image_size`` is ``H`` (square) or ``(H, W)``; the encoders' three
    max-pools round up and the decoder starts from ``(merge_channels, ceil(H/8), ceil(W/8))``, so
    28 and 32 both give the appendix's 4 x 4 x 64 (any size works).

    ``m_pathway="additive"`` is the appendix-C model: NN_M^p's features are added to NN_Y^p's and
    NN_Z^p's before the shared deconvolution stack. ``m_pathway="transform"`` keeps that clean model
    (with NN_M^p frozen at do(m=0)) and lets m act through a second network whose heads drive
    observation mechanisms M -> X that are the identity at m = 0 (see ``cama.image_model``).

    Fields added after the MNIST model default to its values, so older checkpoints load unchanged:
    ``channels``; ``q_m_depth`` (hidden layers of width ``encoder_hidden`` in NN_M^q's MLP);
    ``z_head_depth`` (hidden layers of width ``z_head_hidden`` in NN_Z^q's MLP on (x, y, m));
    ``share_encoder`` (NN_Z^q reuses NN_M^q's CNN and feeds its flattened features straight to that
    MLP, as appendix C's CIFAR q network does; otherwise NN_Z^q has its own kernel-5 CNN and an
    x-MLP ``[4*4*64, encoder_hidden]``); ``decoder_stride1_layers`` (3x3 stride-1 deconvolutions
    at the decoder's first resolution, before the three stride-2 ones); ``field_inverse``
    (``"mask"``: q(z|x,y,m) reads the pixels the field covers as missing, not divided back, see
    ``cama.mechanisms``); ``theta_prior_std`` (the scale of the Gaussian factor that keeps the
    global mechanisms near the identity in every ELBO, eq. 4's ``log p(m)`` term; ``None``: none).
    """

    kind: Literal["image"] = "image"
    num_classes: int = 10
    image_size: int | tuple[int, int] = 28
    channels: int = 1
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
    q_m_depth: int = 1
    z_head_depth: int = 1
    share_encoder: bool = False
    decoder_stride1_layers: int = 0
    field_inverse: Literal["divide", "mask"] = "divide"
    theta_prior_std: float | None = None

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 1 or self.channels < 1:
            raise ValueError(f"image shape must be positive, got {self.image_shape}")
        if self.q_m_depth < 1 or self.z_head_depth < 1 or self.decoder_stride1_layers < 0:
            raise ValueError("q_m_depth and z_head_depth must be >= 1, decoder_stride1_layers >= 0")
        if self.field_inverse not in ("divide", "mask"):
            raise ValueError(f"field_inverse must be 'divide' or 'mask', got {self.field_inverse!r}")
        if self.theta_prior_std is not None and not self.theta_prior_std > 0:
            raise ValueError("theta_prior_std must be positive or None")
        unknown = set(self.transforms) - set(KNOWN_TRANSFORMS)
        if unknown:
            raise ValueError(f"unknown transforms {sorted(unknown)}; known: {KNOWN_TRANSFORMS}")

    @property
    def height(self) -> int:
        """H."""
        return self.image_size if isinstance(self.image_size, int) else int(self.image_size[0])

    @property
    def width(self) -> int:
        """W."""
        return self.image_size if isinstance(self.image_size, int) else int(self.image_size[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.channels, self.height, self.width)

    @classmethod
    def cifar_binary(cls, **overrides: object) -> ImageCamaConfig:
        """Appendix C's "CIFAR-binary experiments" networks, on 3 x 32 x 32 images.

        - p: NN_Y^p ``[dY, 1000, 1000]``, NN_Z^p ``[128, 1000, 1000]``, NN_M^p ``[64, 1000, 1000,
          1000]``; NN_merge^p projects to ``(64, 4, 4)``, then four 3x3 deconvolutions with 64
          channels, the last with 3 and a sigmoid (Bernoulli means). Four stride-2 layers would
          give 64 x 64, so the first keeps 4 x 4 (stride 1) and the other three double it to 32.
        - q: NN_M^q is 3 x {conv 3x3 64, max-pool} and an MLP ``[4*4*64, 1000, 1000, 2 * 64]``;
          NN_Z^q reuses that CNN and maps ``[4*4*64 + dY + dM, 1000, 1000, 2 * 128]``.

        ``num_classes=2``: appendix C writes dim(Y) = 10 (the CIFAR-10 one-hot) but only airplane
        and frog occur; a 10-way one-hot with 8 never-used classes would give p(y) mass to
        classes no image has and let eq. 6 enumerate them, so y is a one-hot of 2 here.
        """
        base: dict[str, object] = {
            "num_classes": 2,
            "image_size": 32,
            "channels": 3,
            "dim_z": 128,
            "dim_m": 64,
            "y_layers": (1000, 1000),
            "z_layers": (1000, 1000),
            "m_layers": (1000, 1000, 1000),
            "merge_channels": 64,
            "encoder_channels": 64,
            "encoder_hidden": 1000,
            "q_m_depth": 2,
            "z_head_hidden": 1000,
            "z_head_depth": 2,
            "share_encoder": True,
            "decoder_stride1_layers": 1,
            "transform_layers": (1000, 1000, 1000),
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

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
