"""Precision and device follow the language model: Flamingo over a bfloat16 / float16 LM, media of any
float dtype, torch.autocast, and FlamingoPaLM cast to bfloat16.

The policy (docs/your_own_lm.md, "Precision"): what trains is created on the LM's device in float32
(master weights) and computes in the LM's dtype; the gated blocks return the hidden states' dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMAGE_SIZE, TINY, open_gates, tiny_image_encoder
from torch import nn

from flamingo_pytorch import Flamingo, FlamingoPaLM

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA, VOCAB, WIDTH = 3, 64, 32
LOW = [torch.bfloat16, torch.float16]
# bf16's unit roundoff 2^-9 (fp16's 2^-11 is smaller): a logit passes through ~30 rounded operations
# (3 layers of norm, attention, MLP, residual, plus the gated blocks), whose errors add up to at most
# ~30 u relative to the values' scale; 64 u leaves a factor 2 for the accumulation order.
LOW_PRECISION_RTOL = 64 * 2.0**-9


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
    )
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def wrap(lm: nn.Module, **kwargs) -> Flamingo:
    sizes = dict(cross_attn_every=2, dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4)
    return Flamingo(lm, media_token_id=MEDIA, perceiver_num_time_embeds=4, **{**sizes, **kwargs}).eval()


def text_and_embeds(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(4, VOCAB, (2, 10), generator=generator)
    text[:, [1, 6]] = MEDIA
    return text, torch.randn(2, 2, 5, WIDTH, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_closed_gates_give_the_lms_logits_bit_for_bit_and_what_trains_is_float32(dtype):
    lm = tiny_llama(dtype)
    original = copy.deepcopy(lm)
    model = wrap(lm, train_token_ids=[MEDIA])
    text, embeds = text_and_embeds(dtype)
    with torch.no_grad():
        got = model(text, image_embeds=embeds).logits
        want = original(input_ids=text).logits
    assert got.dtype == dtype and torch.equal(got, want)
    assert {p.dtype for p in model.flamingo_parameters()} == {torch.float32}  # master weights
    assert {p.dtype for p in model.lm.parameters()} == {dtype}  # the LM as it was loaded


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_lm_trains_and_generates_and_blocks_return_its_dtype(dtype):
    model = wrap(tiny_llama(dtype)).train()
    open_gates(model, 0.5)
    seen = []
    block_layer = model.lm.model.layers[0].layer  # the LM's own layer inside the first fusion layer
    block_layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].dtype), with_kwargs=True)
    text, embeds = text_and_embeds(torch.float32)  # float32 features onto a low-precision LM
    loss = model(text, image_embeds=embeds, labels=text).loss
    loss.backward()
    assert seen == [dtype] and torch.isfinite(loss)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert {g.dtype for g in grads.values()} == {torch.float32}
    assert any(name.startswith("perceiver_resampler.") for name in grads)  # the media reached the loss
    assert all(torch.isfinite(g).all() for g in grads.values())
    tokens = model.eval().generate(text, image_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 13) and not (tokens[:, 10:] == MEDIA).any()


def test_float64_media_are_cast_to_the_working_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        model = wrap(tiny_llama(dtype))
        open_gates(model, 0.5)
        text, embeds = text_and_embeds(torch.float64)
        with torch.no_grad():
            got = model(text, image_embeds=embeds).logits
            want = model(text, image_embeds=embeds.to(dtype)).logits
        assert torch.equal(got, want)


def test_autocast_over_a_float32_and_a_bfloat16_lm():
    text, embeds = text_and_embeds()
    for dtype in (torch.float32, torch.bfloat16):
        model = wrap(tiny_llama(dtype))
        open_gates(model, 0.5)
        with torch.no_grad():
            reference = model(text, image_embeds=embeds, labels=text).loss.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(text, image_embeds=embeds, labels=text).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.gated_cross_attn.parameters())
        # The loss is a mean of log-softmax values of scale ~log(vocab); bf16 rounding (see above) moves it by
        # at most LOW_PRECISION_RTOL of that scale.
        assert abs(loss.float() - reference) <= LOW_PRECISION_RTOL * torch.log(torch.tensor(VOCAB))


def test_bf16_trained_weights_by_casting_them_still_work():
    """Option (b) of the docs' measurement: cast what trains to the LM's dtype by hand."""
    model = wrap(tiny_llama(torch.bfloat16))
    open_gates(model, 0.5)
    for module in (model.perceiver_resampler, model.gated_cross_attn, model.token_rows):
        module.to(torch.bfloat16)
    text, embeds = text_and_embeds()
    model(text, image_embeds=embeds, labels=text).loss.backward()
    assert {p.grad.dtype for p in model.gated_cross_attn.parameters()} == {torch.bfloat16}


def test_save_and_load_trained_onto_a_bf16_lm(tmp_path):
    pytest.importorskip("safetensors")
    text, embeds = text_and_embeds()
    trained = wrap(tiny_llama(torch.bfloat16))
    open_gates(trained, 0.5)
    trained.save_trained(str(tmp_path / "trained.safetensors"))
    fresh = wrap(tiny_llama(torch.bfloat16))
    fresh.load_trained(str(tmp_path / "trained.safetensors"))
    for (name, got), want in zip(fresh.named_parameters(), trained.parameters()):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    with torch.no_grad():
        assert torch.equal(fresh(text, image_embeds=embeds).logits, trained(text, image_embeds=embeds).logits)


def test_load_openflamingo_onto_a_bf16_lm():
    pytest.importorskip("open_flamingo")
    from test_openflamingo import MEDIA as THEIR_MEDIA
    from test_openflamingo import batch, build_theirs

    from flamingo_pytorch.openflamingo import load_openflamingo

    theirs, lm, clip = build_theirs("llama", 2)
    state = theirs.state_dict()
    ours = load_openflamingo(state, lm.to(torch.bfloat16), media_token_id=THEIR_MEDIA, vision_encoder=clip)
    resampler = {k: v for k, v in ours.state_dict().items() if k.startswith("perceiver_resampler.")}
    assert all(v.dtype == torch.float32 for v in resampler.values())
    assert torch.equal(resampler["perceiver_resampler.latents"], state["perceiver.latents"])  # kept in float32
    text, mask, images = batch()
    time_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 holds 2 <image> tokens for its 3 images
    with torch.no_grad():
        got = ours(text, images, attention_mask=mask, time_mask=time_mask).logits
        want = theirs(vision_x=images[:, :, None], lang_x=text, attention_mask=mask).logits
    real = mask.bool()
    assert got.dtype == torch.bfloat16
    scale = want[real].abs().max()
    assert (got[real].float() - want[real]).abs().max() <= LOW_PRECISION_RTOL * scale


def palm_batch():
    generator = torch.Generator().manual_seed(2)
    text = torch.randint(4, TINY["num_tokens"], (2, 10), generator=generator)
    text[:, [0, 5]] = TINY["media_token_id"]
    return text, torch.randn(2, 2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def test_flamingo_palm_in_bf16_and_under_autocast():
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())
    open_gates(model, 0.5)
    text, images = palm_batch()
    labels = torch.cat((text[:, 1:], torch.full_like(text[:, :1], -100)), dim=1)
    with torch.no_grad():
        reference = model(text, images, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(text, images, labels=labels).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.gated_cross_attn.parameters())
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16)
    loss = model(text, images.to(torch.bfloat16), labels=labels)
    loss.backward()
    assert abs(loss.float() - reference) <= LOW_PRECISION_RTOL * reference
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.gated_cross_attn.parameters())
    tokens = model.eval().generate(text, images.to(torch.bfloat16), max_new_tokens=3, temperature=0)
    assert tokens.shape == (2, 13)
