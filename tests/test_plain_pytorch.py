"""The model code is plain PyTorch: public API only, layers called as modules, autograd's own
gradients (second derivatives included), dtypes kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, open_gates, tiny_image_encoder
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flamingo_pytorch import FlamingoPaLM, GatedCrossAttentionBlock

PACKAGE = Path(__file__).resolve().parents[1] / "flamingo_pytorch"


def test_no_private_torch_api_in_the_package():
    private = re.compile(r"\btorch\._|\._C\b|_global_\w*hooks|torch\.ops\.(mkldnn|_)|\._functorch|\._dynamo")
    hits = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert hits == []


def test_no_custom_autograd_function_in_the_package():
    assert not [path.name for path in PACKAGE.glob("*.py") if "autograd.Function" in path.read_text()]


@pytest.mark.parametrize("only_immediate", [True, False])
def test_gradient_penalty_through_a_gated_block(only_immediate):
    """Second derivatives through the whole block (gradgradcheck, float64) with SDPA's math backend;
    the fused kernels refuse a double backward with an error rather than a wrong number."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=8, dim_head=4, heads=2, ff_mult=2, only_attend_immediate_media=only_immediate)
    block = block.double()
    open_gates(block, 0.7)
    x = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)
    media = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    locations = torch.tensor([[0, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)  # text before the first item too
    time_mask = torch.tensor([[True, False, True]])

    def run(x, media):
        return block(x, media, locations, time_mask)

    assert run(x, media).dtype == torch.float64
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradcheck(run, (x, media))
        assert torch.autograd.gradgradcheck(run, (x, media))


def test_a_linear_with_a_strided_bias_is_called_as_it_is():
    block = GatedCrossAttentionBlock(dim=8, dim_head=4, heads=2)
    open_gates(block)
    layer = nn.Linear(8, 8)
    layer.bias = nn.Parameter(torch.randn(16)[::2])  # a strided view as bias
    block.attn.to_q = layer
    x, media = torch.randn(1, 5, 8), torch.randn(1, 1, 2, 8)
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append(out.clone()))
    block(x, media)
    torch.testing.assert_close(calls[0], F.linear(block.attn.norm(x), layer.weight, layer.bias))


def test_hooks_on_every_linear_layer_fire_in_training_and_evaluation():
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())
    text = torch.randint(4, TINY["num_tokens"], (1, 6))
    text[0, 1] = TINY["media_token_id"]
    pixels = torch.randn(1, 1, 3, 8, 8)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for grad_enabled in (True, False):
        called: set[str] = set()
        handles = [
            module.register_forward_hook(lambda module, args, out, name=name, called=called: called.add(name))
            for name, module in model.named_modules()
            if name in linear
        ]
        with torch.set_grad_enabled(grad_enabled):
            model(text, pixels, labels=text)
        for handle in handles:
            handle.remove()
        assert called == linear


def test_labels_go_through_a_quantised_output_projection(tiny_model):
    text = torch.randint(4, TINY["num_tokens"], (2, 9))
    labels = text.roll(-1, dims=1)
    quantised = torch.ao.quantization.quantize_dynamic(tiny_model, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        logits = quantised(text)
        loss = quantised(text, labels=labels)
    # dynamic quantisation scales each call's input by its own range: chunked calls differ slightly
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten()), rtol=1e-2, atol=1e-2)
