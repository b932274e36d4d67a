import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, open_gates
from torch import nn
from torch.testing import assert_close

from flamingo_pytorch import loss as loss_module
from flamingo_pytorch.loss import chunked_cross_entropy


def reference(hidden, layer, labels):
    return F.cross_entropy(layer(hidden).float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def chunked(hidden, layer, labels):
    return chunked_cross_entropy(hidden, layer, labels, num_tokens=50)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 3 * 50)  # 3 tokens per chunk: several chunks


@pytest.mark.parametrize("weight_trains", [True, False])
def test_loss_and_gradients_match_plain_cross_entropy(small_chunks, weight_trains):
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    layer = nn.Linear(16, 50, bias=False).requires_grad_(weight_trains)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # no target
    got, expected = chunked(hidden, layer, labels), reference(hidden, layer, labels)
    assert_close(got, expected)
    inputs = [hidden, layer.weight] if weight_trains else [hidden]
    for g, want in zip(torch.autograd.grad(2.5 * got, inputs), torch.autograd.grad(2.5 * expected, inputs)):
        assert_close(g, want)


def test_float64_gradcheck_and_double_backward(small_chunks):
    """Gradients come from autograd (in backward), so second derivatives (a gradient penalty) are right."""
    hidden = torch.randn(1, 7, 4, dtype=torch.float64, requires_grad=True)
    layer = nn.Linear(4, 50, bias=False).double()
    labels = torch.randint(0, 50, (1, 7))
    labels[0, 2] = -100
    assert chunked(hidden, layer, labels).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h: chunked(h, layer, labels), (hidden,))
    assert torch.autograd.gradgradcheck(lambda h: chunked(h, layer, labels), (hidden,))


def test_no_gradient_work_under_no_grad(small_chunks):
    layer, hidden, labels = nn.Linear(8, 50, bias=False), torch.randn(1, 9, 8), torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        loss = chunked(hidden, layer, labels)
    assert loss.grad_fn is None and layer.weight.grad is None
    assert_close(loss, reference(hidden, layer, labels))


def test_a_hooked_quantised_or_replaced_projection_is_called(small_chunks):
    layer, hidden, labels = nn.Linear(8, 50, bias=False), torch.randn(1, 9, 8), torch.randint(0, 50, (1, 9))
    calls = []
    handle = layer.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    chunked(hidden, layer, labels).backward()
    assert sum(calls[:3]) == 9  # three chunks in forward (and recomputed in backward)
    handle.remove()
    quantised = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]
    # dynamic quantisation scales each call's input by its own range: chunks differ slightly from one call
    assert_close(chunked(hidden, quantised, labels), reference(hidden, quantised, labels), rtol=1e-2, atol=1e-2)


def test_a_nan_hidden_state_without_a_label_is_never_read():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    layer = nn.Linear(8, 50, bias=False)
    labels = torch.tensor([[1, -100, 2, 3]])
    poisoned = hidden.clone()
    poisoned[0, 1] = float("nan")
    loss = chunked(poisoned, layer, labels)
    assert_close(loss, reference(hidden, layer, labels))
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_chunks_hold_16_mib_of_logits_or_a_sixteenth_of_them():
    assert loss_module.tokens_per_chunk(1024, 20000) == 209  # 2**22 // 20000: 5 chunks of 16 MiB
    assert loss_module.tokens_per_chunk(16384, 20000) == 1024  # 16 chunks, not 79
    assert loss_module.tokens_per_chunk(5, 10**7) == 1


def test_without_labelled_tokens_the_loss_is_zero_and_differentiable():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    layer = nn.Linear(8, 50, bias=False)
    loss = chunked(hidden, layer, torch.full((1, 4), -100))
    assert loss.item() == 0.0  # not NaN
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_model_loss_equals_cross_entropy_of_its_logits(tiny_model):
    open_gates(tiny_model, 0.5)
    text = torch.randint(4, TINY["num_tokens"], (2, 10))
    text[:, [1, 6]] = TINY["media_token_id"]
    images = torch.randn(2, 2, 3, 8, 8)
    labels = torch.cat((text[:, 1:], torch.full((2, 1), -100)), dim=1)  # next token; none for the last
    loss = tiny_model(text, images, labels=labels)
    expected = F.cross_entropy(tiny_model(text, images).flatten(0, 1), labels.flatten())
    assert_close(loss, expected)
    loss.backward()
    chunked_grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad(set_to_none=True)
    expected.backward()
    for name, param in tiny_model.named_parameters():
        if param.grad is not None:
            assert_close(chunked_grads.pop(name), param.grad, msg=name)
    assert not chunked_grads
    # text only: the tied embedding trains, through both its uses
    tiny_model.zero_grad(set_to_none=True)
    tiny_model(text, labels=labels).backward()
    got = tiny_model.palm.token_emb.weight.grad.clone()
    tiny_model.zero_grad(set_to_none=True)
    F.cross_entropy(tiny_model(text).flatten(0, 1), labels.flatten()).backward()
    assert_close(got, tiny_model.palm.token_emb.weight.grad)


def test_bad_labels_raise(tiny_model):
    text = torch.randint(4, TINY["num_tokens"], (2, 10))
    with pytest.raises(ValueError, match=r"labels must have shape \(batch, text length\) = \(2, 10\)"):
        tiny_model(text, labels=text[:, :-1])
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        tiny_model(text, labels=text.float())
    for bad in (TINY["num_tokens"] + 33, -5):
        labels = text.clone()
        labels[1, 4] = bad
        with pytest.raises(
            ValueError, match=rf"labels must be token ids in \[0, 64\) or -100 .*got {bad} at position \(1, 4\)"
        ):
            tiny_model(text, labels=labels)


def test_bfloat16_loss_is_finite_and_close_to_float32(tiny_model):
    text = torch.randint(4, TINY["num_tokens"], (2, 10))
    labels = text.roll(-1, dims=1)
    expected = tiny_model(text, labels=labels)
    model = tiny_model.to(torch.bfloat16)
    loss = model(text, labels=labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_close(loss, expected, rtol=0.02, atol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.palm.parameters())
