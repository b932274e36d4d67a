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
    assert calls == ["LayerNorm", "Linear", "GELU", "Linear"] * 2


def test_a_replaced_layer_is_used():
    ff = FeedForward(8)
    x = torch.randn(2, 8)
    ff[3] = nn.Linear(32, 8)  # with a bias
    norm, project_in, activation, project_out = ff
    torch.testing.assert_close(ff(x), project_out(activation(project_in(norm(x)))), rtol=0, atol=0)


def test_float64_gradcheck():
    ff = FeedForward(4, mult=2).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ff, (x,))
    assert torch.autograd.gradgradcheck(ff, (x,))
