import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, open_gates
from torch.testing import assert_close

from flamingo_pytorch import loss as loss_module
from flamingo_pytorch.loss import linear_cross_entropy


def reference(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_loss_and_gradients_match_plain_cross_entropy(monkeypatch, weight_trains):
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 3 * 50)  # 3 tokens per chunk: several chunks
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # no target
    fused = linear_cross_entropy(hidden, weight, labels)
    expected = reference(hidden, weight, labels)
    assert_close(fused, expected)
    grads = torch.autograd.grad(2.5 * fused, [hidden, weight] if weight_trains else [hidden])
    expected_grads = torch.autograd.grad(2.5 * expected, [hidden, weight] if weight_trains else [hidden])
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


def test_under_autocast_a_float32_weight_gets_its_gradient_from_bfloat16_chunks(monkeypatch):
    """The weight's gradient is accumulated in float32 from the chunks' bf16 products."""
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 3 * 50)
    hidden = torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, expected = linear_cross_entropy(hidden, weight, labels), reference(hidden, weight, labels)
    grads = torch.autograd.grad(fused, [hidden, weight])
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    assert grads[1].dtype == torch.float32
    for got, want in zip(grads, expected_grads):
        assert_close(got.float(), want.float(), rtol=0.05, atol=0.01)


def test_chunks_hold_16_mib_of_logits_or_a_sixteenth_of_them():
    assert loss_module.tokens_per_chunk(1024, 20000) == 209  # 2**22 // 20000: 5 chunks of 16 MiB
    assert loss_module.tokens_per_chunk(16384, 20000) == 1024  # 16 chunks, not 79
    assert loss_module.tokens_per_chunk(5, 10**7) == 1


def test_without_gradients_and_without_labelled_tokens():
    hidden, weight = torch.randn(1, 4, 8), torch.randn(10, 8)
    labels = torch.randint(0, 10, (1, 4))
    with torch.no_grad():
        assert_close(linear_cross_entropy(hidden, weight, labels), reference(hidden, weight, labels))
    nothing = torch.full((1, 4), -100)
    assert linear_cross_entropy(hidden.requires_grad_(), weight, nothing).item() == 0.0  # not NaN


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
    fused_grads = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad(set_to_none=True)
    expected.backward()
    for name, param in tiny_model.named_parameters():
        if param.grad is not None:
            assert_close(fused_grads.pop(name), param.grad, msg=name)
    assert not fused_grads
    # text only: the tied embedding trains, through both its uses
    tiny_model.zero_grad(set_to_none=True)
    tiny_model(text, labels=labels).backward()
    fused = tiny_model.palm.token_emb.weight.grad.clone()
    tiny_model.zero_grad(set_to_none=True)
    F.cross_entropy(tiny_model(text).flatten(0, 1), labels.flatten()).backward()
    assert_close(fused, tiny_model.palm.token_emb.weight.grad)


def test_bad_labels_raise(tiny_model):
    text = torch.randint(4, TINY["num_tokens"], (2, 10))
    with pytest.raises(ValueError, match=r"labels must be integer token ids of shape \(batch, text length\)"):
        tiny_model(text, labels=text[:, :-1])
    with pytest.raises(ValueError, match="labels must be integer"):
        tiny_model(text, labels=text.float())


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
