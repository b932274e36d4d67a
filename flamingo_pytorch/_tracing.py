"""Whether the running code is being traced into a graph that may later run with other shapes."""

from __future__ import annotations

import torch


def is_traced() -> bool:
    """True under ``torch.compile``, ``torch.export`` or ``torch.jit.trace``: a shape or a count read
    from the inputs now would be baked into the graph, so code must stay shape-generic."""
    if torch.jit.is_tracing():
        return True
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling as compiling
    return compiling()
