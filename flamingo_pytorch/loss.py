"""Cross-entropy over the output projection, a chunk of tokens at a time: the full logits never exist.

Shapes:
    N labelled tokens, d width, v vocabulary, c tokens per chunk.

With a 20k-token vocabulary the float32 logits of a (2, 512) batch take 78 MiB, and a plain
``F.cross_entropy(logits)`` keeps three such tensors alive at the start of backward (the logits,
their log-softmax and its gradient): the peak memory of a Flamingo training step. Here only the
labelled tokens are projected, c at a time, each chunk under activation checkpointing: autograd
keeps a chunk's input, not its logits, and backward recomputes one chunk's logits at a time.
Plain autograd throughout, so hooks, adapters and quantisation of the projection apply, double
backward works, and ``torch.no_grad()`` does no gradient work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flamingo_pytorch._validation import check_tensor

LOGITS_PER_CHUNK = 1 << 22  # c * v: about 16 MiB of float32 logits per chunk ...
MAX_CHUNKS = 16  # ... unless that makes more chunks than this (each costs a few kernel launches on a GPU)


def tokens_per_chunk(num_tokens: int, vocab: int) -> int:
    """c: ``LOGITS_PER_CHUNK`` logits per chunk, or 1 / ``MAX_CHUNKS`` of all tokens if that is more."""
    return max(1, LOGITS_PER_CHUNK // vocab, -(-num_tokens // MAX_CHUNKS))


def summed_cross_entropy(to_logits: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Sum of the cross-entropy of ``to_logits(hidden)`` (c, v) against labels (c,), in at least float32."""
    logits = to_logits(hidden)  # (c, v)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, reduction="sum")


def check_labels(labels: object, shape: tuple[int, ...], num_tokens: int, ignore_index: int) -> Tensor:
    """Labels (b, n) integer ids in [0, num_tokens) or ``ignore_index``; raises ValueError/TypeError otherwise."""
    labels = check_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape (batch, text length) = {tuple(shape)}, got {tuple(labels.shape)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_tokens))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be token ids in [0, {num_tokens}) or {ignore_index} (no target), "
            f"got {int(labels[bad][0])} at position {tuple(bad.nonzero()[0].tolist())}"
        )
    return labels


def chunked_cross_entropy(
    hidden: Tensor, to_logits: nn.Module, labels: Tensor, *, num_tokens: int, ignore_index: int = -100
) -> Tensor:
    """``F.cross_entropy(to_logits(hidden), labels, ignore_index=ignore_index)`` without the full logits.

    Args:
        hidden: (b, n, d) final hidden states.
        to_logits: the output projection, (..., d) -> (..., v); called as a module.
        labels: (b, n) target token ids; ``ignore_index`` marks tokens without a target.
        num_tokens: v, the vocabulary size (labels must lie in [0, v)).
        ignore_index: label value that contributes nothing (its hidden state is never read).

    Returns:
        Scalar mean loss over the labelled tokens (0 when none is labelled), in the logits' dtype
        promoted to at least float32.
    """
    labels = check_labels(labels, hidden.shape[:-1], num_tokens, ignore_index)
    keep = (labels != ignore_index).flatten()  # (b n,)
    hidden, labels = hidden.flatten(0, -2)[keep], labels.flatten()[keep]  # (N, d), (N,)
    chunk = tokens_per_chunk(hidden.shape[0], num_tokens)
    total = None
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):  # an empty selection still gives one chunk
        if torch.is_grad_enabled():
            part = checkpoint(summed_cross_entropy, to_logits, h, y, use_reentrant=False)
        else:
            part = summed_cross_entropy(to_logits, h, y)
        total = part if total is None else total + part
    return total / max(hidden.shape[0], 1)
