"""The feed-forward is a plain nn.Sequential: its layers run as modules, so hooks and replacements apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flamingo_pytorch.feed_forward import FeedForward


def test_feed_forward_equals_the_formula():
    ff = FeedForward(16, mult=3)
    x = torch.randn(2, 5, 16)
    norm, project_in, _, project_out = ff
    expected = F.linear(F.gelu(F.linear(norm(x), project_in.weight)), project_out.weight)
    torch.testing.assert_close(ff(x), expected, rtol=0, atol=0)
    assert project_in.weight.shape == (48, 16) and project_out.weight.shape == (16, 48)
    assert [name for name, _ in ff.named_parameters()] == ["0.weight", "0.bias", "1.weight", "3.weight"]


def test_every_layer_is_called_as_a_module_with_and_without_grad():
    ff = FeedForward(8)
    calls = []
    for layer in ff:
        layer.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    x = torch.randn(2, 8, requires_grad=True)
    ff(x).sum().backward()
    with torch.no_grad():
        ff(x)
    forward = ["LayerNorm", "Linear", "GELU", "Linear"]
    recomputed_in_backward = ["GELU"]  # its output is recomputed, not stored (the recomputation stops there)
    assert calls == forward + recomputed_in_backward + forward


def test_a_replaced_layer_is_used():
    ff = FeedForward(8)
    x = torch.randn(2, 8)
    ff[3] = nn.Linear(32, 8)  # with a bias
    norm, project_in, activation, project_out = ff
    torch.testing.assert_close(ff(x), project_out(activation(project_in(norm(x)))), rtol=0, atol=0)


def test_training_keeps_no_gelu_output_and_gives_plain_gradients():
    ff = FeedForward(8, mult=4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    norm, project_in, activation, project_out = ff

    def wide_tensors_kept(fn) -> int:
        kept = {}
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.update({t.untyped_storage().data_ptr(): t.numel()}) or t, lambda t: t
        ):
            out = fn()
        return out, list(kept.values()).count(2 * 3 * 32)

    out, kept = wide_tensors_kept(lambda: ff(x))
    plain, kept_by_plain = wide_tensors_kept(lambda: project_out(activation(project_in(norm(x)))))
    assert (kept, kept_by_plain) == (1, 2)  # the hidden layer only; plain autograd also keeps its GELU
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    inputs = [x, *ff.parameters()]
    for got, want in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(plain.sum(), inputs)):
        torch.testing.assert_close(got, want)


def test_float64_gradcheck():
    ff = FeedForward(4, mult=2).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ff, (x,))
    assert torch.autograd.gradgradcheck(ff, (x,))
