"""The pre-norm GELU feed-forward used by the Perceiver Resampler and the gated cross-attention blocks."""

from torch import nn


class FeedForward(nn.Sequential):
    """LayerNorm, then a bias-free two-layer MLP with GELU, widening by ``mult``."""

    def __init__(self, dim: int, mult: int = 4):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )
