"""The pre-norm GELU feed-forward used by the Perceiver Resampler and the gated cross-attention blocks.

Shapes: ... any leading dimensions, d width, f hidden width (d * mult).
"""

from __future__ import annotations

from torch import nn


class FeedForward(nn.Sequential):
    """LayerNorm, then a bias-free two-layer MLP with GELU, widening by ``mult``: (..., d) -> (..., d).

    A plain ``nn.Sequential`` (children 0 to 3), so hooks, adapters and quantisation of any layer apply.
    """

    def __init__(self, dim: int, mult: int = 4):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),  # (..., d) -> (..., f)
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),  # (..., f) -> (..., d)
        )
