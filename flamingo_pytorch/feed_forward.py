"""The pre-norm GELU feed-forward used by the Perceiver Resampler and the gated cross-attention blocks.

Shapes: ... any leading dimensions, d width, f hidden width (d * mult).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flamingo_pytorch._linear import apply_linear, is_plain_linear, matmul_t, weight_grad
from flamingo_pytorch._tracing import is_transformed


class GELULinear(torch.autograd.Function):
    """``linear(gelu(hidden), weight)`` that keeps only ``hidden`` for backward and recomputes the GELU.

    Plain autograd would keep both ``hidden`` and ``gelu(hidden)``, two (..., f) tensors per
    feed-forward; the recomputation is one elementwise pass.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor) -> Tensor:
        # Cast by hand: autocast would cache a cast of the leaf weight made here, where no graph is
        # recorded, and hand it to later uses of the weight in the same autocast region (torch 2.1 does).
        out = matmul_t(F.gelu(hidden), weight.to(hidden.dtype))  # (..., d); hidden is in autocast's dtype
        ctx.save_for_backward(hidden, weight)
        ctx.compute_dtype = out.dtype
        # Which gradients backward computes; torch 2.1's dynamo cannot trace ctx.needs_input_grad.
        ctx.grad_hidden, ctx.grad_weight = hidden.requires_grad, weight.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        hidden, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype  # what the forward's matmul ran in (autocast may have lowered it)
        grad = grad.to(dtype)
        grad_hidden = grad_weight = None
        if ctx.grad_weight:  # first, so that the recomputed GELU is freed before grad_hidden exists
            activation = F.gelu(hidden).to(dtype)  # (..., f)
            grad_weight = weight_grad(grad, activation).to(weight.dtype)  # (d, f)
            del activation
        if ctx.grad_hidden:
            grad_activation = matmul_t(grad, weight.to(dtype).T).to(hidden.dtype)  # (..., f)
            grad_hidden = torch.ops.aten.gelu_backward(grad_activation, hidden)
        return grad_hidden, grad_weight


class FeedForward(nn.Sequential):
    """LayerNorm, then a bias-free two-layer MLP with GELU, widening by ``mult``.

    In training the GELU and the second projection run as one autograd function that recomputes
    the GELU in backward (see ``GELULinear``); a replaced or hooked second projection (an
    adapter, say) is called as a module instead.
    """

    def __init__(self, dim: int, mult: int = 4):
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d)."""
        norm, project_in, activation, project_out = self[0], self[1], self[2], self[3]  # as built, or replaced
        hidden = apply_linear(project_in, norm(x))  # (..., f)
        if not self.fusable(x):
            return apply_linear(project_out, activation(hidden))
        return GELULinear.apply(hidden, project_out.weight)

    def fusable(self, x: Tensor) -> bool:
        """Fuse only when autograd will keep activations (without grad, plain layers free the hidden
        tensor sooner) and the layers are the plain, unhooked ones this class built."""
        activation, project_out = self[2], self[3]
        return (
            torch.is_grad_enabled()
            and not is_transformed(x)  # torch.func, forward-mode AD: GELULinear has no rule for them
            and type(activation) is nn.GELU
            and activation.approximate == "none"
            and is_plain_linear(project_out)
        )
