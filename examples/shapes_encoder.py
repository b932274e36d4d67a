"""The demo's image encoder: a small conv net giving a 4 x 4 grid of patch features.

Flamingo freezes its vision encoder, so the encoder must learn to see before Flamingo training.
Here it is pretrained (step 1b) to classify each image's four attributes from its mean-pooled patch
features: the miniature of the paper's contrastive image-text pretraining, since the attribute
names are the caption words. Mean pooling forces every patch feature to carry what it shows; two
coordinate channels (CoordConv) let the features also say where they are, which the Perceiver
Resampler, blind to patch order, needs for the "what corner ?" question.

Shapes: B images, c=3 channels, H=W=32 pixels, p=16 patches, e feature width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from shapes_dataset import ATTRIBUTES
from torch import Tensor, nn


class ShapesEncoder(nn.Module):
    """(B, 3, 32, 32) images -> (B, 16, dim) patch features.

    Args:
        dim: feature width e.
    """

    def __init__(self, *, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Conv2d(3 + 2, 32, kernel_size=3, stride=2, padding=1),  # (B, 32, 16, 16)
            nn.GELU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),  # (B, 64, 8, 8)
            nn.GELU(),
            nn.Conv2d(64, dim, kernel_size=3, stride=2, padding=1),  # (B, e, 4, 4)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1.0, 1.0, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)  # (B, 2, H, W)
        features = self.net(torch.cat((images, grid), dim=1))  # (B, e, 4, 4)
        return self.norm(rearrange(features, "B e h w -> B (h w) e"))  # (B, p, e)


class AttributeClassifier(nn.Module):
    """Pretraining head: mean-pooled encoder features -> logits for each attribute.

    Args:
        encoder: the image encoder to train.
    """

    def __init__(self, encoder: ShapesEncoder):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(encoder.dim, len(values)) for values in ATTRIBUTES.values())

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> one (B, number of values) logit tensor per attribute."""
        pooled = self.encoder(images).mean(dim=1)  # (B, e)
        return [head(pooled) for head in self.heads]


def attribute_loss(classifier: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the four attributes; labels (B, 4) long."""
    logits = classifier(images)
    return sum(F.cross_entropy(z.float(), labels[:, i]) for i, z in enumerate(logits)) / len(logits)
