"""A small convolutional network: the baseline a ViT is compared with on small data.

Three stages of two 3x3 convolutions (BatchNorm, ReLU), each stage followed by 2x2 max
pooling, then global average pooling and a linear classifier::

    (B, 3, 32, 32) -> stage 1 (w channels)  -> (B, w, 16, 16)
                   -> stage 2 (2w channels) -> (B, 2w, 8, 8)
                   -> stage 3 (4w channels) -> (B, 4w, 4, 4)
                   -> average pool, linear   -> (B, num_classes)

Convolutions build in two assumptions a ViT must learn from data: nearby pixels matter
together (locality) and a pattern means the same thing anywhere (translation equivariance).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """Two conv-BN-ReLU layers then 2x2 max pooling: ``(B, c_in, H, W) -> (B, c_out, H/2, W/2)``."""
    layers = []
    for c in (c_in, c_out):
        layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class SmallCNN(nn.Module):
    """A VGG-style CNN classifier.

    Args:
        num_classes: number of output classes.
        width: channels of the first stage ``w`` (the stages have ``w, 2w, 4w``).
        in_channels: input colour channels.

    Shapes:
        ``forward``: ``(B, C, H, W) -> (B, num_classes)``; ``H`` and ``W`` divisible by 8.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _stage(in_channels, width), _stage(width, 2 * width), _stage(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Class scores ``(B, num_classes)`` for ``images`` ``(B, C, H, W)``."""
        x = self.pool(self.features(images)).flatten(1)  # (B, 4w, 1, 1) -> (B, 4w)
        return self.head(x)
