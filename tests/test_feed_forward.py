"""The feed-forward's fused GELU + projection computes what the plain layers do and keeps less."""

from __future__ import annotations

import pytest
import torch
from conftest import saved_storages
from torch import nn

from flamingo_pytorch._linear import apply_linear
from flamingo_pytorch.feed_forward import FeedForward


def plain_forward(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """The same layers, run one after another by autograd, their products on the package's matmul route."""
    norm, project_in, activation, project_out = ff
    return apply_linear(project_out, activation(apply_linear(project_in, norm(x))))


@pytest.mark.parametrize("shape", [(2, 5, 16), (16,)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_feed_forward_equals_the_plain_layers(input_grad, shape):
    torch.manual_seed(0)
    ff = FeedForward(16, mult=3)
    x = torch.randn(shape, requires_grad=input_grad)
    cotangent = torch.randn(shape)
    inputs = [*ff.parameters()] + ([x] if input_grad else [])
    fused, plain = ff(x), plain_forward(ff, x)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(fused, inputs, cotangent), torch.autograd.grad(plain, inputs, cotangent)):
        torch.testing.assert_close(got, want)


def test_fused_feed_forward_under_bf16_autocast_matches_the_plain_layers():
    torch.manual_seed(0)
    ff = FeedForward(16)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = ff(x), plain_forward(ff, x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain)
    grads = [torch.autograd.grad(out.float().sum(), [x, ff[3].weight]) for out in (fused, plain)]
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_fused_feed_forward_keeps_one_hidden_tensor_for_backward():
    ff = FeedForward(8, mult=4)
    x = torch.randn(2, 3, 8, requires_grad=True)
    hidden = 2 * 3 * 32

    def hidden_tensors(fn) -> int:
        return list(saved_storages(fn).values()).count(hidden)

    assert hidden_tensors(lambda: plain_forward(ff, x)) == 2  # GELU's input and output
    assert hidden_tensors(lambda: ff(x)) == 1


def test_a_replaced_or_hooked_projection_is_called_as_a_module():
    ff = FeedForward(8)
    x = torch.randn(2, 8)
    calls = []
    ff[3].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    ff(x)
    assert calls == [(2, 8)]
    ff[3] = nn.Linear(32, 8)  # with a bias: not the fused layer
    torch.testing.assert_close(ff(x), plain_forward(ff, x), rtol=0, atol=0)


def test_without_grad_the_plain_layers_run():
    ff, x = FeedForward(8), torch.randn(3, 8)
    with torch.no_grad():
        assert not ff.fusable(x)
    assert ff.fusable(x)
