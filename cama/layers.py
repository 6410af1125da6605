"""Small building blocks: MLPs and the appendix-C convolutional encoder and decoder."""

from __future__ import annotations

import itertools

from torch import Tensor, nn


def mlp(sizes: tuple[int, ...] | list[int], *, final_activation: bool) -> nn.Sequential:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` with ReLU between (and after, if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """3 x {conv kxk (SAME), ReLU, max-pool 2} on a 28x28 image -> (channels * 4 * 4) vector.

    Appendix C: kernel 3 for NN_M^q, kernel 5 for the x-part of NN_Z^q. Pooling rounds up
    (28 -> 14 -> 7 -> 4), as TensorFlow's SAME pooling does.
    """

    def __init__(self, channels: int, kernel: int, in_channels: int = 1) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for _ in range(3):
            blocks += [
                nn.Conv2d(c_in, channels, kernel, padding=kernel // 2),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = channels
        self.net = nn.Sequential(*blocks)
        self.out_features = channels * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 1, 28, 28) -> (N, channels * 16)``."""
        features: Tensor = self.net(x)
        return features.flatten(1)


class DeconvDecoder(nn.Module):
    """NN_merge^p: projection to (channels, 4, 4), then 3 stride-2 transposed convs 4->7->14->28.

    Returns the logits of the canonical (do(m=0)) Bernoulli image, ``(N, 1, 28, 28)``.
    """

    def __init__(self, in_features: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.project = nn.Sequential(nn.Linear(in_features, channels * 16), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1),  # 4 -> 7
            nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1),  # 14
            nn.ReLU(),
            nn.ConvTranspose2d(channels, 1, 3, stride=2, padding=1, output_padding=1),  # 28
        )

    def forward(self, h: Tensor) -> Tensor:
        """``(N, in_features) -> (N, 1, 28, 28)`` logits."""
        seed = self.project(h).view(-1, self.channels, 4, 4)
        out: Tensor = self.deconv(seed)
        return out
