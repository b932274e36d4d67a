"""The model on every device this machine has: the CPU always, a CUDA GPU too where present.

On the CPU the immediate cross-attention sizes its chunk layout to the data; on accelerators it
uses the static layout and must never read a value back to the host. These tests run both
layouts, the single-item and per-token paths, bf16 autocast training steps and cached decoding on
each device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    TINY,
    dense_and_segmented,
    greedy_by_full_forward,
    open_gates,
    reply_with_logits,
    tiny_image_encoder,
)

from flamingo_pytorch import Flamingo, FlamingoPaLM, GatedCrossAttentionBlock, MaskedCrossAttention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MEDIA = TINY["media_token_id"]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def batch(device: torch.device, b: int = 2, n: int = 20, t: int = 3):
    text = torch.randint(4, TINY["num_tokens"], (b, n), device=device)
    text[:, [0, 6, 7, 15][:t]] = MEDIA  # two media tokens in a row leave item 2 without text
    return text, torch.randn(b, t, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)


def flamingo(device: torch.device) -> FlamingoPaLM:
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()).to(device)
    open_gates(model, 0.5)
    return model


def test_chunk_layout_equals_the_dense_reference(device):
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2).to(device)
    generator = torch.Generator().manual_seed(1)
    locations = (torch.rand(3, 40, generator=generator) < 0.15).to(device)
    x, media = torch.randn(3, 40, 16, device=device), torch.randn(3, 5, 4, 16, device=device)
    time_mask = torch.tensor([[True] * 5, [True, False] * 2 + [True], [False] + [True] * 4], device=device)
    got, want, _ = dense_and_segmented(attn, x, media, locations, time_mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("n", "t"), [(40, 1), (3, 5)])  # one item in place; texts no longer than t, per token
def test_single_item_and_per_token_paths_equal_the_dense_reference(device, n, t):
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2).to(device)
    generator = torch.Generator().manual_seed(n + t)
    locations = (torch.rand(3, n, generator=generator) < 0.3).to(device)
    x, media = torch.randn(3, n, 16, device=device), torch.randn(3, t, 4, 16, device=device)
    time_mask = (torch.rand(3, t, generator=generator) < 0.7).to(device)
    got, want, _ = dense_and_segmented(attn, x, media, locations, time_mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_training_step_is_close_to_float32(device):
    model = flamingo(device)
    text, pixels = batch(device)
    labels = torch.cat((text[:, 1:], torch.full_like(text[:, :1], -100)), dim=1)
    with torch.no_grad():
        reference = model(text, pixels, labels=labels)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(text, pixels, labels=labels)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)
    assert all(p.grad is not None for p in model.gated_cross_attn.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.flamingo_parameters() if p.grad is not None)
    assert all(p.grad is None for p in model.palm.parameters())  # the language model stays frozen


def test_cached_greedy_decoding_equals_full_forwards(device):
    model = flamingo(device).eval()
    text, pixels = batch(device, n=10)
    cached = model.generate(text, pixels, max_new_tokens=6, temperature=0)
    assert torch.equal(cached, greedy_by_full_forward(model, text, 6, images=pixels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("n", "t"), [(50, 4), (50, 1), (3, 4)])  # chunk layout, one item, per token
def test_gated_block_never_synchronises_with_the_host_on_cuda(n, t):
    block = GatedCrossAttentionBlock(dim=32, dim_head=8, heads=4).cuda()
    x, media = torch.randn(2, n, 32, device="cuda"), torch.randn(2, t, 8, 32, device="cuda")
    locations = torch.rand(2, n, device="cuda") < 0.1
    block(x, media, locations)  # warm up: first calls may initialise libraries
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x, media, locations).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flamingo_over_a_low_precision_lm_on_the_gpu_lives_and_runs_there(dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    lm = transformers.LlamaForCausalLM(config).eval().to("cuda", dtype)
    with torch.no_grad():
        text = torch.randint(4, 64, (2, 8), device="cuda")
        text[:, 1] = MEDIA
        want = lm(input_ids=text).logits
    model = Flamingo(lm, media_token_id=MEDIA, dim_head=8, heads=4, perceiver_depth=1, perceiver_num_latents=4)
    assert {p.device.type for p in model.flamingo_parameters()} == {"cuda"}  # created beside the LM
    assert {p.dtype for p in model.flamingo_parameters()} == {torch.float32}  # master weights
    embeds = torch.randn(2, 1, 5, 32, device="cuda", dtype=torch.float64)  # any float dtype
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=embeds).logits, want)  # closed gates: the LM, bit for bit
    open_gates(model, 0.5)
    loss = model.train()(text, image_embeds=embeds, labels=text).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.gated_cross_attn.parameters())
    tokens = model.eval().generate(text, image_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 11) and tokens.device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_conversation_over_a_bf16_lm_on_the_gpu_agrees_with_full_forwards():
    """Two turns (the second with a new image) over a bf16 Llama on the GPU: everything stays there, and the
    logits each greedy token is chosen from lie within 4 bf16 eps of the largest logit of a full forward
    (the bound tests/full_size.py derives for two decoder layers and two gated blocks)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    lm = transformers.LlamaForCausalLM(config).eval().to("cuda", torch.bfloat16)
    model = Flamingo(lm, media_token_id=MEDIA, dim_head=8, heads=4, perceiver_depth=1, perceiver_num_latents=4)
    open_gates(model, 0.5)
    first, second = torch.tensor([[MEDIA, 10, 11]], device="cuda"), torch.tensor([[MEDIA, 12]], device="cuda")
    embeds = torch.randn(1, 2, 5, 32, device="cuda")
    state = model.prefill(first, image_embeds=embeds[:, :1])
    reply = model.generate_from(state, max_new_tokens=3, temperature=0)
    model.extend(state, second, image_embeds=embeds[:, 1:])
    assert state.logits.device.type == "cuda" and state.cache is not None
    more, cached = reply_with_logits(model, state, 3)  # (1, 3), (1, 3, v)
    tokens = torch.cat((first, reply, second, more), dim=1)
    with torch.no_grad():
        full = model(tokens, image_embeds=embeds).logits[0, -4:-1].float()  # (3, v): where `more` was chosen
    cached = cached[0].float()  # (3, v)
    bound = 4 * torch.finfo(torch.bfloat16).eps * full.abs().amax(dim=-1, keepdim=True)
    assert ((cached - full).abs() <= bound).all()
