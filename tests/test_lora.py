"""LoRA adapters on Flamingo's frozen language model through peft (``flamingo_pytorch.lora.add_lora``):
exact at init, only the adapters and Flamingo's parts train, and they save and load with ``save_trained``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import open_gates
from torch import nn

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="pip install -e '.[peft]'")
from flamingo_pytorch.lora import add_lora  # noqa: E402

MEDIA, VOCAB, WIDTH, LAYERS = 3, 64, 32, 3
TARGETS = ("q_proj", "v_proj")


def tiny_llama(width: int = WIDTH) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def flamingo_with_lora(lm: nn.Module | None = None) -> tuple[Flamingo, list[nn.Parameter]]:
    """Flamingo (blocks before layers 0 and 2 of 3) over a tiny Llama, with LoRA on q_proj and v_proj."""
    sizes = dict(dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=4)
    model = Flamingo(lm or tiny_llama(), media_token_id=MEDIA, cross_attn_every=2, train_token_ids=[MEDIA], **sizes)
    torch.manual_seed(1)  # the adapters' random A matrices
    adapters = add_lora(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    return model.eval(), adapters


def text_and_embeds(width: int = WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    text = torch.randint(4, VOCAB, (2, 9), generator=generator)
    text[:, [0, 4]] = MEDIA
    return text, torch.randn(2, 2, 5, width, generator=generator)


def train_step(model: Flamingo, text: torch.Tensor, embeds: torch.Tensor) -> torch.optim.Optimizer:
    model.train()
    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2)
    model(text, image_embeds=embeds, labels=text).loss.backward()
    optimizer.step()
    model.eval()
    return optimizer


def test_at_init_with_closed_gates_the_logits_are_the_language_models_exactly():
    lm = tiny_llama()
    original = copy.deepcopy(lm)
    model, adapters = flamingo_with_lora(lm)
    names = [name for name, _ in model.lm.named_parameters() if "lora_" in name]
    assert len(adapters) == len(names) == LAYERS * len(TARGETS) * 2  # A and B of q_proj and v_proj, every layer
    assert sum("layer.self_attn" in name for name in names) == 2 * len(TARGETS) * 2  # the two fused layers too
    assert all(param.abs().sum() == 0 for name, param in model.lm.named_parameters() if "lora_B" in name)
    text, embeds = text_and_embeds()
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=embeds).logits, original(input_ids=text).logits)


def test_only_the_adapters_and_flamingos_parts_train():
    model, adapters = flamingo_with_lora()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    flamingo_parts = {id(param) for param in model.flamingo_parameters()}
    expected = {name for name, param in model.named_parameters() if "lora_" in name or id(param) in flamingo_parts}
    assert trainable == expected
    assert {id(p) for p in adapters} == {id(p) for name, p in model.named_parameters() if "lora_" in name}
    text, embeds = text_and_embeds()
    open_gates(model, 0.8)
    optimizer = train_step(model, text, embeds)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == flamingo_parts | {id(p) for p in adapters}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    assert all(p.grad.abs().sum() > 0 for name, p in model.lm.named_parameters() if "lora_B" in name)
    with pytest.raises(ValueError, match="already has peft adapters"):
        add_lora(model, peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"config must be a peft\.LoraConfig, got dict"):
        add_lora(model, {"r": 4})


def test_trained_adapters_save_and_load_with_save_trained(tmp_path):
    model, _ = flamingo_with_lora()
    text, embeds = text_and_embeds()
    open_gates(model, 0.8)
    train_step(model, text, embeds)  # LoRA's B matrices leave zero
    path = tmp_path / "trained.safetensors"
    model.save_trained(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        saved = set(file.keys())
    assert sum("lora_" in key for key in saved) == LAYERS * len(TARGETS) * 2
    fresh, _ = flamingo_with_lora()  # the same LM (seed 0), fresh adapters and Flamingo parts
    with torch.no_grad():
        trained_logits = model(text, image_embeds=embeds).logits
        assert not torch.equal(fresh(text, image_embeds=embeds).logits, trained_logits)
        fresh.load_trained(str(path))
        assert torch.equal(fresh(text, image_embeds=embeds).logits, trained_logits)


def test_adapters_over_a_bfloat16_lm_are_float32_and_exact_at_init():
    lm = tiny_llama().to(torch.bfloat16)
    original = copy.deepcopy(lm)
    model, adapters = flamingo_with_lora(lm)
    assert {p.dtype for p in adapters} == {torch.float32}  # master weights, as the gated blocks'
    text, embeds = text_and_embeds()
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=embeds).logits, original(input_ids=text).logits)
    open_gates(model, 0.8)
    train_step(model, text, embeds)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in adapters)


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")  # merging is not used here
def test_lora_on_an_int8_weight_only_lm():
    quantization = pytest.importorskip("torchao.quantization", reason="pip install -e '.[quant]'")
    lm = tiny_llama()
    quantization.quantize_(lm, quantization.Int8WeightOnlyConfig())
    quantized = copy.deepcopy(lm)
    model, adapters = flamingo_with_lora(lm)
    text, embeds = text_and_embeds()
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=embeds).logits, quantized(input_ids=text).logits)
    open_gates(model, 0.8)
    train_step(model, text, embeds)
    assert all(p.grad is None for name, p in model.lm.named_parameters() if "lora_" not in name)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters)


def lora_on_nf4(tmp_path, device: str) -> None:
    """QLoRA: adapters in float32 on an NF4 LM computing in bfloat16; exact at init, one step trains them."""
    pytest.importorskip("bitsandbytes", reason="pip install -e '.[nf4]'")
    tiny_llama(width=64).save_pretrained(tmp_path)  # width 64: one quantization block per row
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    lm = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
    ).train()  # (on a CPU, bitsandbytes repacks the weights for inference on a forward in eval mode)
    text, embeds = (tensor.to(device) for tensor in text_and_embeds(width=64))
    with torch.no_grad():
        own = lm(input_ids=text).logits
    model, adapters = flamingo_with_lora(lm)
    model.train()
    assert {p.dtype for p in adapters} == {torch.float32} and {p.device.type for p in adapters} == {device}
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=embeds).logits, own)
    open_gates(model, 0.8)
    train_step(model, text, embeds)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters)
    assert all(p.abs().sum() > 0 for name, p in model.lm.named_parameters() if "lora_B" in name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes NF4 is tested on CUDA")
def test_lora_on_an_nf4_lm_on_cuda(tmp_path):
    lora_on_nf4(tmp_path, "cuda")
