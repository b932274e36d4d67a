"""Linear layers: oneDNN's float32 CPU matmuls agree with F.linear, forward and backward, and are
taken exactly where documented."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_SIZE, TINY, open_gates, saved_storages
from torch import nn
from torch.testing import assert_close

from flamingo_pytorch import _linear
from flamingo_pytorch._linear import (
    ONEDNN,
    apply_linear,
    is_plain_linear,
    linear,
    matmul_t,
    onednn_applies,
    weight_grad,
)

needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN's linear op is not in this PyTorch build / CPU")
TOL = dict(rtol=1e-5, atol=1e-4)  # float32: only the order of the sums differs


def inputs(x_shape, out_features, bias, x_grad=True, weight_grad_=True, transpose_x=False):
    x = torch.randn(*x_shape[:-2], x_shape[-1], x_shape[-2]).transpose(-1, -2) if transpose_x else torch.randn(x_shape)
    weight = torch.randn(out_features, x_shape[-1]) / x_shape[-1] ** 0.5
    b = torch.randn(out_features) if bias else None
    x.requires_grad_(x_grad)
    weight.requires_grad_(weight_grad_)
    if b is not None:
        b.requires_grad_(True)
    return x, weight, b


def grads_of(fn, tensors, grad_out):
    tracked = [t for t in tensors if t is not None and t.requires_grad]
    out = fn()
    return out, torch.autograd.grad(out, tracked, grad_out)


@pytest.mark.parametrize(
    ("x_shape", "out_features", "bias", "transpose_x"),
    [
        ((5, 16), 24, False, False),
        ((2, 7, 16), 24, True, False),
        ((2, 3, 4, 16), 8, False, False),
        ((2, 9, 16), 24, False, True),  # a strided input
        ((6, 4), 80, False, False),  # a tall weight: k (N + n) < N n, the weight gradient is made transposed
        ((0, 16), 24, True, False),  # no rows
        ((16,), 24, True, False),  # a single vector, as F.linear allows
    ],
)
def test_linear_matches_f_linear_forward_and_backward(x_shape, out_features, bias, transpose_x):
    x, weight, b = inputs(x_shape, out_features, bias, transpose_x=transpose_x)
    grad_out = torch.randn(*x_shape[:-1], out_features)
    ours, ours_grads = grads_of(lambda: linear(x, weight, b), (x, weight, b), grad_out)
    plain, plain_grads = grads_of(lambda: F.linear(x, weight, b), (x, weight, b), grad_out)
    assert_close(ours, plain, **TOL)
    for got, expected in zip(ours_grads, plain_grads):
        assert_close(got, expected, **TOL)
        assert got.shape == expected.shape and got.is_contiguous() == expected.is_contiguous()


@needs_onednn
def test_onednn_route_is_taken_in_float32_on_the_cpu(monkeypatch):
    calls = []
    real = _linear.OneDNNLinear.apply
    monkeypatch.setattr(_linear.OneDNNLinear, "apply", lambda *args: calls.append(1) or real(*args))
    x, weight, _ = inputs((4, 8), 6, False)
    linear(x, weight).sum().backward()
    assert calls == [1]


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # torch.backends.mkldnn.flags also sets TF32 (unused here)
def test_routes_that_keep_f_linear():
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    assert onednn_applies(x, weight)
    assert not onednn_applies(x.double(), weight.double())
    assert not onednn_applies(x.bfloat16(), weight.bfloat16())
    assert not onednn_applies(x[:0], weight)
    assert onednn_applies(x, torch.randn(8, 6).T)  # a transposed weight is dense: backward's grad @ weight
    sliced = torch.randn(6, 16)[:, :8]
    assert not onednn_applies(x, sliced)  # a sliced weight: oneDNN's slow path
    assert torch.equal(linear(x, sliced), F.linear(x, sliced))
    assert not onednn_applies(x, torch.randn(1, 8).expand(6, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_applies(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16  # autocast still lowers it, as it does F.linear
    with torch.backends.mkldnn.flags(enabled=False):
        assert not onednn_applies(x, weight)
        assert torch.equal(linear(x, weight), F.linear(x, weight))  # the documented opt-out is exact


@pytest.mark.parametrize("frozen", ["weight", "x"])
def test_a_frozen_operand_gets_no_gradient_and_the_trained_one_is_not_kept(frozen):
    """As with F.linear: only the operand the other's gradient needs is kept for backward."""
    x, weight, _ = inputs((3, 64, 16), 24, False, x_grad=frozen != "x", weight_grad_=frozen != "weight")
    frozen_operand, trained = (weight, x) if frozen == "weight" else (x, weight)
    saved = saved_storages(lambda: linear(x, weight))
    assert frozen_operand.untyped_storage().data_ptr() in saved
    assert trained.untyped_storage().data_ptr() not in saved
    linear(x, weight).sum().backward()
    assert frozen_operand.grad is None and trained.grad is not None


def test_double_backward_matches_f_linear():
    """create_graph=True: the backward is itself differentiable (a gradient penalty, say)."""

    def penalty(fn):
        x, weight, b = inputs((4, 5, 16), 12, True)
        x.data, weight.data, b.data = base
        (grad_x,) = torch.autograd.grad(torch.tanh(fn(x, weight, b)).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), (weight, b))

    base = [t.detach() for t in inputs((4, 5, 16), 12, True)]
    for got, expected in zip(penalty(linear), penalty(F.linear)):
        assert_close(got, expected, **TOL)


def test_matmul_helpers_match_plain_matmuls():
    a, b, grad = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(3, 5, 24)
    assert_close(matmul_t(a, b), a @ b.T, **TOL)
    assert_close(matmul_t(grad, b.T), grad @ b, **TOL)  # b.T: a strided "weight"
    assert_close(weight_grad(grad, a), grad.flatten(0, 1).T @ a.flatten(0, 1), **TOL)
    tall, narrow = torch.randn(3, 5, 100), torch.randn(3, 5, 4)  # k (N + n) < N n: the transposed route
    assert_close(weight_grad(tall, narrow), tall.flatten(0, 1).T @ narrow.flatten(0, 1), **TOL)


class Projection(nn.Module):
    """A layer as the package calls its linear layers: through ``apply_linear``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self.layer, x)


def test_apply_linear_multiplies_plain_layers_and_calls_any_other():
    layer, x = nn.Linear(16, 8), torch.randn(2, 3, 16)
    assert_close(apply_linear(layer, x), layer(x), **TOL)
    assert not is_plain_linear(layer)  # a bias: fused code must not use the weight alone
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    apply_linear(layer, x)
    assert calls == [(2, 3, 8)]  # hooked: called as a module, so its hook runs
    unhooked = nn.Linear(16, 8, bias=False)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(1))
    try:
        apply_linear(unhooked, x)
        assert not is_plain_linear(unhooked) and calls[-1] == 1  # a global hook is honoured too
    finally:
        handle.remove()
    assert is_plain_linear(unhooked)
    unhooked.forward = lambda x: calls.append(2) or nn.Linear.forward(unhooked, x)  # a wrapper, as offloading adds
    apply_linear(unhooked, x)
    assert not is_plain_linear(unhooked) and calls[-1] == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization's own
def test_quantize_dynamic_swaps_the_layers_and_they_are_called():
    """The layers stay plain nn.Linear, so tools that go by type find them, and the package then
    calls the swapped-in modules instead of multiplying the float weight."""
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:
        pytest.skip("this PyTorch has no torch.ao.quantization.quantize_dynamic")
    model = Projection(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.layer) is not nn.Linear
    assert_close(quantized(x), model(x), rtol=0.05, atol=0.05)


def test_no_float32_matmul_of_the_model_falls_back_to_f_linear(tiny_model, monkeypatch):
    """Every linear layer of a flamingo training step goes through the oneDNN route on this CPU."""
    if not ONEDNN:
        pytest.skip("oneDNN's linear op is not in this PyTorch build / CPU")
    calls = []
    real = F.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    open_gates(tiny_model)
    text = torch.randint(4, TINY["num_tokens"], (2, 12))
    text[:, [2, 7]] = TINY["media_token_id"]
    tiny_model(text, torch.randn(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE), labels=text).backward()
    with torch.no_grad():
        tiny_model(text, torch.randn(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert calls == []


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_model_loss_and_gradients_match_the_f_linear_route(tiny_model):
    open_gates(tiny_model)
    tiny_model.train()
    text = torch.randint(4, TINY["num_tokens"], (2, 12))
    text[:, [2, 7]] = TINY["media_token_id"]
    pixels = torch.randn(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)

    def loss_and_grads():
        tiny_model.zero_grad()
        loss = tiny_model(text, pixels, labels=text.roll(-1, dims=1))
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    with torch.backends.mkldnn.flags(enabled=False):
        plain_loss, plain_grads = loss_and_grads()
    assert_close(loss, plain_loss, **TOL)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], plain_grads[name], **TOL, msg=name)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.func.jvp scripts a helper
def test_torch_func_and_forward_mode_ad_take_the_plain_ops(tiny_model):
    """Our autograd functions define no vmap or jvp rule: under torch.func transforms and forward-mode
    AD the plain ops run, so per-sample gradients, grad and jvp work as they do for nn.Linear."""
    from torch.func import functional_call, grad, jvp, vmap

    projection = Projection(nn.Linear(8, 4, bias=True))
    layer = projection.layer
    params = {name: p.detach() for name, p in projection.named_parameters()}
    xs = torch.randn(5, 8)

    def loss(p, x):
        return functional_call(projection, p, (x,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(5):
        expected = torch.autograd.grad(F.linear(xs[i], layer.weight, layer.bias).square().sum(), layer.weight)[0]
        assert_close(per_sample["layer.weight"][i], expected, **TOL)
    tangent = torch.randn(5, 8)
    _, out_tangent = jvp(projection, (xs,), (tangent,))
    assert_close(out_tangent, F.linear(tangent, layer.weight), **TOL)

    # a whole PaLM training loss (SwiGLU, fused loss) under torch.func.grad
    palm = tiny_model.palm
    palm_params = {name: p.detach() for name, p in palm.named_parameters()}
    text = torch.randint(0, TINY["num_tokens"], (2, 10))
    labels = text.roll(-1, dims=1)
    got = grad(lambda p: functional_call(palm, p, (text,), {"labels": labels}))(palm_params)
    palm(text, labels=labels).backward()
    for name, param in palm.named_parameters():
        assert_close(got[name], param.grad, **TOL, msg=name)
