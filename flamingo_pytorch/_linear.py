"""Linear layers, and float32 matmuls on the CPU through oneDNN.

PyTorch multiplies float32 matrices on the CPU with MKL's sgemm, which on AMD processors runs
its AVX2 kernels: about 200 GFLOP/s on the 2-core AMD EPYC (Zen 5) these benchmarks run on,
where oneDNN (PyTorch's bundled mkldnn, the library behind its bfloat16 CPU matmuls) reaches
350-490 GFLOP/s on the same shapes, in the same float32 arithmetic (only the order of the sums
differs). So on x86 CPUs the float32 linear layers and the fused matmuls of this package go
through ``torch.ops.mkldnn._linear_pointwise``, forward and backward. Everywhere else (GPUs,
other dtypes, autocast, compiled or traced code, ``torch.func`` transforms and forward-mode AD,
tensor subclasses, other CPUs) it is ``F.linear`` / ``@``.
``torch.backends.mkldnn.flags(enabled=False)`` (or ``torch.backends.mkldnn.enabled = False``)
turns the oneDNN route off.

The layers stay plain ``nn.Linear`` modules, so that tools which go by type (``quantize_dynamic``,
adapters, hooks) see what they expect; the package calls them through ``apply_linear``, which
multiplies a plain, unhooked layer's weight itself and calls any other module as it is.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flamingo_pytorch._tracing import is_traced, is_transformed

# The module-call hooks every module honours (torch.nn.modules.module.register_module_forward_hook, ...).
GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, f"_global_{kind}_hooks", {})
    for kind in ("forward", "forward_pre", "backward", "backward_pre")
)
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
# oneDNN's float32 matmul, where PyTorch has it (an x86 build with mkldnn): checked once, here.
ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def is_unhooked_linear(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` itself (not a subclass, e.g. a quantised or adapter layer) that no
    hook watches (its own or global ones) and whose ``forward`` nobody replaced on the instance (as
    offloading wrappers do): its weight may then be used without calling it."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    # (torch 2.1's dynamo cannot read an instance's forward; compiled code skips the oneDNN route anyway)
    own_forward = not is_traced() and getattr(module.forward, "__func__", None) is not nn.Linear.forward
    return type(module) is nn.Linear and not own_forward and not any(hooks) and not any(map(len, GLOBAL_HOOKS))


def is_plain_linear(module: nn.Module) -> bool:
    """``is_unhooked_linear`` and without bias: fused code may use its ``weight`` alone."""
    return is_unhooked_linear(module) and module.bias is None


def apply_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``: an unhooked ``nn.Linear`` through ``linear`` (oneDNN on x86 CPUs), anything
    else (a quantised layer, an adapter, a hooked layer) called as it is."""
    if is_unhooked_linear(layer):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def onednn_applies(a: Tensor, b: Tensor) -> bool:
    """Whether ``a @ b.T`` goes through oneDNN: float32 on an x86 CPU, no autocast, not traced or
    transformed (``torch.func``, forward-mode AD), and ``b`` (the weight) dense in either
    orientation: oneDNN copes with any layout of ``a``, but a sliced or expanded ``b`` sends it
    down a path about 1000x slower."""
    if is_traced() or is_transformed(a, b):  # first: a compiler must not meet the checks below, nor the op
        return False
    return (
        ONEDNN
        and a.device.type == "cpu"
        and a.dtype == b.dtype == torch.float32
        and type(a) in PLAIN_TENSORS
        and type(b) in PLAIN_TENSORS  # a subclass (a quantised weight, a DTensor) knows its own F.linear
        and a.numel() > 0
        and b.numel() > 0  # oneDNN has no primitive for empty products
        and b.dim() == 2
        and (b.is_contiguous() or b.T.is_contiguous())
        and torch.backends.mkldnn.enabled
        and not cpu_autocast()
    )


def cpu_autocast() -> bool:
    """Whether CPU autocast is on (it picks the matmuls' dtype itself)."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)`` by oneDNN, no checks (callers ask ``onednn_applies``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def matmul_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for a (..., k) and b (n, k) -> (..., n); no autograd of its own (for use inside
    autograd functions). Strided views are fine: b is often a transpose."""
    if onednn_applies(a, b):
        return onednn_linear(a, b)
    return a @ b.T


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``grad.T @ x`` over all leading dimensions: grad (..., n), x (..., k) -> (n, k).

    oneDNN copies its first operand when it is transposed: ``grad.T`` (N n entries) one way round,
    ``x.T`` and then the (k, n) result (k (N + n) entries) the other. The smaller copy wins (the
    vocabulary's weight gradient: 80 instead of 100 ms at N = 1024 here).
    """
    grad, x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, n), (N, k)
    (rows, n), k = grad.shape, x.shape[1]
    if k * (rows + n) < rows * n:
        return matmul_t(x.T, grad.T).T.contiguous()  # (n, k)
    return matmul_t(grad.T, x.T)  # (n, k)


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with all three matmuls through oneDNN (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # Keep what plain autograd would: x for the weight's gradient, the weight for x's.
        ctx.save_for_backward(x if weight.requires_grad else None, weight if x.requires_grad else None)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops for a double backward
            grad_x = grad @ weight if need_x else None
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need_weight else None
        else:
            grad_x = matmul_t(grad, weight.T) if need_x else None  # (..., k)
            grad_weight = weight_grad(grad, x) if need_weight else None  # (n, k)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None  # (n,)
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``onednn_applies``."""
    odd_bias = bias is not None and (bias.dtype != torch.float32 or type(bias) not in PLAIN_TENSORS)
    if odd_bias or not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    tracked = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and tracked:
        return OneDNNLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)
