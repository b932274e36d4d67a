"""Activation checkpointing: keep less for backward, recompute the rest.

``run_maybe_checkpointed`` is the usual whole-layer checkpointing (``checkpoint_activations=True``).
``recompute_activation`` is always on in training and costs almost nothing. It wraps an activation
and the projection after it, ``project(activation(hidden))``: autograd then keeps only ``hidden``
(plain autograd keeps ``hidden`` and the activation's output, two (..., f) tensors), and backward
recomputes the activation. The recomputation
stops as soon as it has what backward needs, before the projection's matmul runs again.
Both are plain non-reentrant ``torch.utils.checkpoint``: modules are called as modules (their
hooks also fire during the recomputation), and second derivatives work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def recompute_activation(fn: Callable[[Tensor], Tensor], hidden: Tensor) -> Tensor:
    """``fn(hidden)``, an activation and a projection; with grad on, the activation's output is not stored."""
    if not torch.is_grad_enabled():
        return fn(hidden)
    return checkpoint(fn, hidden, use_reentrant=False)


def run_maybe_checkpointed(module: nn.Module, *args: Tensor | None, enabled: bool) -> Tensor:
    """``module(*args)``; with ``enabled`` and grad on, its activations are recomputed in backward instead of kept."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
