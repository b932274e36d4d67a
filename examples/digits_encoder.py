"""The digits demo's image encoder and its pretraining; the nearest-neighbour matcher on its features.

The encoder is pretrained before Flamingo sees it, then frozen. Its loss is supervised-contrastive
(two augmented views of each image; images of one class pull together) plus the self-supervised
instance term (each image's two views pull together, apart from all other images), which keeps
within-class detail that a pure class objective throws away, and that unseen classes need.

Shapes: B images, 1 channel, 8 x 8 pixels, p = 4 patches (a 2 x 2 grid), e feature width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class DigitsEncoder(nn.Module):
    """(B, 1, 8, 8) images -> (B, 4, dim) patch features.

    Args:
        dim: feature width e.
    """

    def __init__(self, *, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),  # (B, 32, 8, 8)
            nn.GELU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),  # (B, 64, 4, 4)
            nn.GELU(),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),  # (B, 128, 4, 4)
            nn.GELU(),
            nn.Conv2d(128, dim, kernel_size=3, stride=2, padding=1),  # (B, e, 2, 2)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.norm(rearrange(self.net(images), "B e h w -> B (h w) e"))  # (B, p, e)


def pooled_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """Unit-length mean-pooled features (..., e) of images (..., 1, 8, 8): what the matcher compares."""
    with torch.no_grad():
        features = encoder(images.reshape(-1, *images.shape[-3:])).mean(dim=1)  # (B, e)
    return F.normalize(features, dim=-1).reshape(*images.shape[:-3], -1)


class ContrastiveHead(nn.Module):
    """Pretraining wrapper: encoder -> mean pool -> projection -> unit vectors (B, 64)."""

    def __init__(self, encoder: DigitsEncoder):
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(encoder.dim, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.projection(self.encoder(images).mean(dim=1)), dim=-1)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random small rotation (up to 15 degrees), scale, shift and pixel noise of (B, 1, 8, 8) images."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(15)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.15
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * 0.25  # up to one pixel
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack((torch.stack((cos, -sin, shift[:, 0]), 1), torch.stack((sin, cos, shift[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, 8, 8, 2)
    background = images[:, :, 0, 0].reshape(b, 1, 1, 1)  # 0, or 1 for inverted digits
    warped = F.grid_sample(images - background, grid, align_corners=False) + background
    return (warped + 0.05 * torch.randn(warped.shape, generator=generator)).clamp(0, 1)


def contrastive_loss(embeddings: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised-contrastive loss over unit embeddings (B, k); same label = positive pair."""
    similarity = embeddings @ embeddings.T / temperature  # (B, B)
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    similarity = similarity.masked_fill(self_pair, float("-inf"))
    log_prob = similarity.log_softmax(dim=-1).masked_fill(self_pair, 0.0)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    return -(log_prob * positive).sum(-1).div(positive.sum(-1).clamp(min=1)).mean()


def encoder_loss(head: ContrastiveHead, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Supervised-contrastive plus instance-contrastive loss on two augmented views of each image."""
    views = torch.cat((augment(images, generator), augment(images, generator)))  # (2B, 1, 8, 8)
    embeddings = head(views)
    instances = torch.arange(len(images)).repeat(2)
    return contrastive_loss(embeddings, labels.repeat(2)) + 0.5 * contrastive_loss(embeddings, instances)


def nearest_neighbour_answers(encoder: nn.Module, images: Tensor) -> Tensor:
    """For episodes' images (E, t, 1, 8, 8) (supports then the query), the index (E,) of the support
    slot nearest to the query by cosine similarity of the frozen features."""
    features = pooled_features(encoder, images)  # (E, t, e)
    similarity = torch.einsum("E t e, E e -> E t", features[:, :-1], features[:, -1])
    return similarity.argmax(dim=-1)
