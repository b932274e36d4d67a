"""When a layer's weight may be used directly instead of calling the layer."""

from __future__ import annotations

from torch import nn


def is_plain_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` itself (not a subclass, e.g. a quantised or adapter layer) without
    bias or forward hooks: fused code may then use its ``weight`` without calling it."""
    return (
        type(module) is nn.Linear and module.bias is None and not (module._forward_hooks or module._forward_pre_hooks)
    )
