"""Cross-entropy fused with the output projection: the logits never exist for all tokens at once.

Shapes:
    N tokens (batch and length folded), d width, v vocabulary, c tokens per chunk.

With a 20k-token vocabulary the float32 logits of a (2, 512) batch take 78 MiB, and a plain
``F.cross_entropy(logits)`` keeps three such tensors alive at the start of backward (the logits'
log-softmax, its gradient and the logits' gradient): the peak memory of a Flamingo training step.
Here the logits are made c tokens at a time, and each chunk's gradient with respect to the hidden
states (and to the projection, when it trains) is computed right away, in the forward pass: the
same matmuls backward would do, so no work is added, and the chunk is freed before the next one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flamingo_pytorch._linear import matmul_t
from flamingo_pytorch._tracing import is_transformed

LOGITS_PER_CHUNK = 1 << 22  # c * v, about 16 MiB of float32 logits per chunk ...
MAX_CHUNKS = 16  # ... unless that makes more chunks than this: each costs ~20 kernel launches on a GPU


def tokens_per_chunk(num_tokens: int, vocab: int) -> int:
    """c: ``LOGITS_PER_CHUNK`` logits per chunk, or 1 / ``MAX_CHUNKS`` of them all if that is more."""
    return max(1, LOGITS_PER_CHUNK // vocab, -(-num_tokens // MAX_CHUNKS))


class LinearCrossEntropy(torch.autograd.Function):
    """Mean of ``cross_entropy(hidden @ weight.T, labels)`` over labels that are not ``ignore_index``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        """hidden (N, d), weight (v, d), labels (N,) -> scalar float32 loss."""
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        valid = labels != ignore_index  # (N,)
        count = valid.sum().clamp(min=1)
        targets = labels.where(valid, 0)[:, None]  # (N, 1), ignored rows point anywhere
        chunk = tokens_per_chunk(hidden.shape[0], weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, y, keep = hidden[rows], targets[rows], valid[rows, None]
            logits = matmul_t(h, weight).float()  # (c, v)
            target_logit = logits.gather(1, y)  # (c, 1)
            maximum = logits.amax(dim=-1, keepdim=True)  # (c, 1)
            exp = logits.sub_(maximum).exp_()  # (c, v), in place of the logits: one exp serves loss and gradient
            sum_exp = exp.sum(dim=-1, keepdim=True)  # (c, 1)
            total += ((maximum + sum_exp.log() - target_logit) * keep).sum()
            if not (need_hidden or need_weight):
                continue
            grad = exp.mul_(keep / (sum_exp * count))  # softmax / count; ignored rows give zero
            grad.scatter_add_(1, y, keep / -count)  # minus the one-hot target, / count
            grad = grad.to(h.dtype)  # (c, v)
            if need_hidden:
                grad_hidden[rows] = matmul_t(grad, weight.T)  # (c, d)
            if need_weight:
                # (v, d), a plain matmul: for this tall product oneDNN would copy the chunk's transposed
                # gradient (16 MiB) or its (d, v) result, and is barely faster (230 vs 200 GFLOP/s here)
                if grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(grad.T, h)  # accumulated in place: no (v, d) temporary per chunk
                else:  # autocast: h is in the lower precision, the gradient in the weight's
                    grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            grad_weight * scale if grad_weight is not None else None,
            None,
            None,
        )


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=ignore_index)`` without the full logits.

    Args:
        hidden: (..., d) final hidden states.
        weight: (v, d) output projection.
        labels: (...) target token ids; ``ignore_index`` marks tokens without a target.
        ignore_index: label value that contributes nothing.

    Returns:
        Scalar float32 mean loss over the labelled tokens (0 when none is labelled).
    """
    hidden, labels = hidden.flatten(0, -2), labels.flatten()  # (N, d), (N,)
    if is_transformed(hidden, weight):  # torch.func, forward-mode AD: the plain ops (full logits)
        return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index)
    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index)
