"""Activation checkpointing: keep less for backward, recompute the rest.

``run_maybe_checkpointed`` is the usual whole-layer checkpointing (``checkpoint_activations=True``).
``recompute_elementwise`` is always on in training and costs almost nothing: inside it the outputs
of matrix products are kept as usual, and only the elementwise ops (GELU, SiLU, a product) are run
again in backward, so their wide (..., f) outputs are never stored. Both are plain
``torch.utils.checkpoint``: modules are called as modules, and second derivatives work.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: store what matrix products return, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_elementwise(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(*args)``; with grad on, what its elementwise ops would keep for backward is recomputed instead."""
    if not torch.is_grad_enabled():
        return fn(*args)
    context = partial(create_selective_checkpoint_contexts, keep_matmul_outputs)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context)


def run_maybe_checkpointed(module: nn.Module, *args: Tensor | None, enabled: bool) -> Tensor:
    """``module(*args)``; with ``enabled`` and grad on, its activations are recomputed in backward instead of kept."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
