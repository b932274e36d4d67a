"""Whether the running code is traced into a graph or transformed, which custom fast paths must avoid."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad


def is_traced() -> bool:
    """True under ``torch.compile``, ``torch.export`` or ``torch.jit.trace``: a shape or a count read
    from the inputs now would be baked into the graph, so code must stay shape-generic."""
    if torch.jit.is_tracing():
        return True
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling as compiling
    return compiling()


def is_transformed(*tensors: Tensor) -> bool:
    """True under forward-mode AD or a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) of
    any of ``tensors``: this package's custom autograd functions define neither a ``jvp`` nor a
    ``vmap`` rule, so the plain ops must run there. False while traced (see ``is_traced``)."""
    if is_traced():  # a compiler handles its transforms itself, and must not meet the private check below
        return False
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level()
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(tensor) for tensor in tensors)
