"""The pre-norm GELU feed-forward used by the Perceiver Resampler and the gated cross-attention blocks.

Shapes: ... any leading dimensions, d width, f hidden width (d * mult).
"""

from __future__ import annotations

from torch import Tensor, nn

from flamingo_pytorch.checkpointing import recompute_activation


class FeedForward(nn.Sequential):
    """LayerNorm, then a bias-free two-layer MLP with GELU, widening by ``mult``: (..., d) -> (..., d).

    Children 0 to 3 as in an ``nn.Sequential``, each called as a module, so hooks, adapters and
    quantisation of any layer apply. In training the GELU is recomputed in backward rather than
    its (..., f) output stored (see ``recompute_activation``).
    """

    def __init__(self, dim: int, mult: int = 4):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),  # (..., d) -> (..., f)
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),  # (..., f) -> (..., d)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d)."""
        norm, project_in, _, _ = self
        return recompute_activation(self.activate_and_project, project_in(norm(x)))

    def activate_and_project(self, hidden: Tensor) -> Tensor:
        """hidden (..., f) -> (..., d)."""
        return self[3](self[2](hidden))
