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


POOLINGS = 3  # appendix C: three {conv, max-pool} blocks, three stride-2 deconvolutions


def pooled_size(size: int, times: int = POOLINGS) -> int:
    """Side after ``times`` max-pools of 2 that round up (28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4)."""
    return -(-size // (1 << times))


class ConvEncoder(nn.Module):
    """3 x {conv kxk (SAME), ReLU, max-pool 2} on a ``(C, H, W)`` image -> a flat feature vector.

    Appendix C: kernel 3 for NN_M^q, kernel 5 for the x-part of NN_Z^q (MNIST). Pooling rounds up
    (28 -> 14 -> 7 -> 4), as TensorFlow's SAME pooling does, so 28x28 and 32x32 both end at 4x4.
    """

    def __init__(
        self, channels: int, kernel: int, in_channels: int = 1, image_size: tuple[int, int] = (28, 28)
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for _ in range(POOLINGS):
            blocks += [
                nn.Conv2d(c_in, channels, kernel, padding=kernel // 2),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = channels
        self.net = nn.Sequential(*blocks)
        self.out_features = channels * pooled_size(image_size[0]) * pooled_size(image_size[1])

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, channels * ceil(H/8) * ceil(W/8))``."""
        features: Tensor = self.net(x)
        return features.flatten(1)


class DeconvDecoder(nn.Module):
    """NN_merge^p: projection to ``(channels, ceil(H/8), ceil(W/8))``, optional 3x3 stride-1
    deconvolutions there, then 3 stride-2 ones (MNIST 4 -> 7 -> 14 -> 28, CIFAR 4 -> 8 -> 16 -> 32).

    Each stride-2 layer doubles the side, minus one where the target side (the encoder's pooled
    sizes read backwards) is odd. Returns the logits of the canonical (do(m=0)) Bernoulli image,
    ``(N, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_features: int,
        channels: int,
        out_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        stride1_layers: int = 0,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.seed_size = (pooled_size(image_size[0]), pooled_size(image_size[1]))
        self.project = nn.Sequential(
            nn.Linear(in_features, channels * self.seed_size[0] * self.seed_size[1]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        for _ in range(stride1_layers):
            layers += [nn.ConvTranspose2d(channels, channels, 3, stride=1, padding=1), nn.ReLU()]
        sides = list(self.seed_size)
        for step in reversed(range(POOLINGS)):
            target = (pooled_size(image_size[0], step), pooled_size(image_size[1], step))
            pad = (target[0] - (2 * sides[0] - 1), target[1] - (2 * sides[1] - 1))  # 0 or 1 each
            c_out = out_channels if step == 0 else channels
            layers.append(nn.ConvTranspose2d(channels, c_out, 3, stride=2, padding=1, output_padding=pad))
            if step:
                layers.append(nn.ReLU())
            sides = list(target)
        self.deconv = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        """``(N, in_features) -> (N, out_channels, H, W)`` logits."""
        seed = self.project(h).view(-1, self.channels, *self.seed_size)
        out: Tensor = self.deconv(seed)
        return out
