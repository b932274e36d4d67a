"""Flamingo over a quantized frozen language model: torchao int8 weight-only on the CPU, bitsandbytes
NF4 on CUDA. The language model's linear layers are quantized, what Flamingo trains (the resampler,
the gated blocks, the token rows) stays in float32, and only it receives gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import open_gates
from torch import nn

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA, VOCAB, WIDTH = 3, 64, 64  # width 64: one bitsandbytes quantization block per row


def tiny_llama(**config) -> nn.Module:
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=3)
    lm_config = transformers.LlamaConfig(**{**sizes, "num_attention_heads": 4, "num_key_value_heads": 2, **config})
    return transformers.LlamaForCausalLM(lm_config).eval()


def wrap(lm: nn.Module) -> Flamingo:
    sizes = dict(dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=4)
    return Flamingo(lm, media_token_id=MEDIA, cross_attn_every=2, train_token_ids=[MEDIA], **sizes).eval()


def text_and_embeds(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(4, VOCAB, (2, 9), generator=generator)
    text[:, [0, 4]] = MEDIA
    return text.to(device), torch.randn(2, 2, 5, WIDTH, generator=generator).to(device)


def int8_weight_only(module: nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig())  # every nn.Linear inside ``module``, in place


def assert_what_trains_is_float32_and_alone(model: Flamingo) -> None:
    """Every trained parameter is a plain float32 Parameter; everything else is frozen."""
    trained = {id(p) for p in model.flamingo_parameters()}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.flamingo_parameters())


def train_step_and_check_gradients(model: Flamingo, text: torch.Tensor, embeds: torch.Tensor) -> None:
    """One forward with labels and backward: finite gradients reach every trained part, none the LM."""
    model.train()
    model(text, image_embeds=embeds, labels=text).loss.backward()
    model.eval()
    assert all(p.grad is None for p in model.lm.parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    for block in model.gated_cross_attn:  # the media reach the loss through every block
        assert block.attn.to_q.weight.grad.abs().sum() > 0
    assert model.token_rows.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("order", ["quantize then wrap", "wrap then quantize flamingo.lm"])
def test_int8_weight_only_lm_is_exact_with_closed_gates_and_only_flamingo_trains(order):
    pytest.importorskip("torchao", reason="pip install -e '.[quant]'")
    lm = tiny_llama()
    if order == "quantize then wrap":
        int8_weight_only(lm)
        quantized = copy.deepcopy(lm)
        model = wrap(lm)
    else:  # the gated blocks are not children of flamingo.lm: quantize_ leaves them alone
        model = wrap(lm)
        int8_weight_only(model.lm)
        quantized = None
    linears = [m for m in model.lm.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    assert all(type(m.weight) is not nn.Parameter and m.weight.qdata.dtype == torch.int8 for m in linears)
    assert_what_trains_is_float32_and_alone(model)
    text, embeds = text_and_embeds()
    if quantized is not None:
        with torch.no_grad():  # closed gates: the quantized LM's own logits, bit for bit
            assert torch.equal(model(text, image_embeds=embeds).logits, quantized(input_ids=text).logits)
    open_gates(model, 0.8)
    train_step_and_check_gradients(model, text, embeds)
    settings = dict(image_embeds=embeds, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached, uncached = model.generate(text, **settings), model.generate(text, **settings, use_cache=False)
    assert cached.shape == (2, 13) and torch.equal(cached, uncached)
    assert not (cached[:, 9:] == MEDIA).any()


def test_int8_quantization_unties_a_tied_head_and_keeps_the_embedding_float():
    """Llama-3.2-1B ties its head to its embedding: quantize_ gives the head its own int8 copy, and the
    input embedding (which Flamingo's token rows read) stays float32."""
    pytest.importorskip("torchao", reason="pip install -e '.[quant]'")
    lm = tiny_llama(tie_word_embeddings=True)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    int8_weight_only(lm)
    assert lm.lm_head.weight.qdata.dtype == torch.int8
    assert type(lm.model.embed_tokens.weight) is nn.Parameter and lm.model.embed_tokens.weight.dtype == torch.float32
    model = wrap(lm)
    text, embeds = text_and_embeds()
    open_gates(model, 0.8)
    train_step_and_check_gradients(model, text, embeds)


def assert_gradients_equal_a_dense_twins(lm: nn.Module, dequantized: dict[str, torch.Tensor], device: str) -> None:
    """Flamingo's gradients through the quantized float32 LM ``lm`` equal those through the same LM with
    plain float32 linear layers holding the dequantized weights (``dequantized``: module name -> weight).

    Tolerance: the two differ only in float32 rounding (e.g. ``(x @ q.T) * s`` against ``x @ (q * s).T``):
    a few eps per product, summed over at most 128 terms (sqrt(128) ~ 11) through ~10 matmuls forward
    and backward, so ~10 * 11 * 4 eps ~ 5e-5 of each gradient's scale; 1e-4 leaves a factor 2. A
    gradient that does not flow through the quantized layers is off by tens of percent."""
    twin = tiny_llama().to(device)
    with torch.no_grad():
        for name, weight in dequantized.items():
            twin.get_submodule(name).weight.copy_(weight)
    text, embeds = text_and_embeds(device)
    grads = []
    for model_lm in (lm, twin):
        torch.manual_seed(5)  # the same Flamingo parts for both
        model = wrap(model_lm)
        open_gates(model, 0.8)
        model.train()
        model(text, image_embeds=embeds, labels=text).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=0, atol=1e-4 * float(want.abs().max()), msg=name)


def test_gradients_through_int8_layers_equal_those_through_their_dequantized_weights():
    pytest.importorskip("torchao", reason="pip install -e '.[quant]'")
    lm = tiny_llama()
    int8_weight_only(lm)
    dequantized = {name: m.weight.dequantize() for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    assert_gradients_equal_a_dense_twins(lm, dequantized, "cpu")


def nf4_lm(tmp_path, device: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A tiny random Llama, saved and reloaded in NF4 computing in ``dtype`` (no download: a local folder)."""
    tiny_llama().save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    return transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=dtype, device_map={"": device}
    ).eval()


def check_nf4(tmp_path, device: str) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="pip install -e '.[nf4]'")
    lm = nf4_lm(tmp_path, device)
    linears = [m for m in lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 3 * 7  # every decoder layer's projections (transformers keeps the head in bf16)
    text, embeds = text_and_embeds(device)
    with torch.no_grad():
        own = lm(input_ids=text).logits
    model = wrap(lm)
    assert_what_trains_is_float32_and_alone(model)
    assert all(p.device.type == device for p in model.flamingo_parameters())
    with torch.no_grad():  # closed gates: the NF4 LM's own logits, bit for bit
        assert torch.equal(model(text, image_embeds=embeds).logits, own)
    open_gates(model, 0.8)
    train_step_and_check_gradients(model, text, embeds)
    out = model.generate(text, image_embeds=embeds, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13) and not (out[:, 9:] == MEDIA).any()


def check_nf4_gradients(tmp_path, device: str) -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="pip install -e '.[nf4]'")
    lm = nf4_lm(tmp_path, device, torch.float32).train()  # (bitsandbytes repacks CPU weights for inference in eval)
    dequantized = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        for name, m in lm.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    assert_gradients_equal_a_dense_twins(lm, dequantized, device)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 is tested on CUDA")


@CUDA
def test_nf4_lm_on_cuda_is_exact_with_closed_gates_and_only_flamingo_trains(tmp_path):
    check_nf4(tmp_path, "cuda")


@CUDA
def test_gradients_through_nf4_layers_equal_those_through_their_dequantized_weights(tmp_path):
    check_nf4_gradients(tmp_path, "cuda")
