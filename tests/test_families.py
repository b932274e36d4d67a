"""Flamingo over today's language-model families at their released widths, in bfloat16.

Each language model is built from its released ``config.json`` values (written out below, the model
named above each) with ``num_hidden_layers=2`` and random weights; nothing is downloaded. Each goes
through ``full_size.check_flamingo``: exact with the gates closed; with them open the images matter,
and cached generation and a two-turn conversation agree with full forwards.

Wide embeddings take seconds to initialize on a CPU, so most cases are ``@pytest.mark.slow``
(``pytest -m slow``); SmolLM2-1.7B and the configs' check run by default.
"""

from __future__ import annotations

import pytest
import torch
from full_size import (
    TIME_MASK,
    check_flamingo,
    free_models,  # noqa: F401 (the autouse fixture that frees each test's models)
    random_lm,
    released,
    slow,
)

# meta-llama/Llama-3.2-1B
LLAMA_3_2_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=True,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
)

# meta-llama/Llama-3.1-8B
LLAMA_3_1_8B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    vocab_size=128256,
    bos_token_id=128000,
    eos_token_id=128001,
)

# Qwen/Qwen2.5-1.5B (query/key/value biases are part of the Qwen2 architecture; sliding window off)
QWEN_2_5_1_5B = dict(
    model_type="qwen2",
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    use_sliding_window=False,
    sliding_window=131072,
    tie_word_embeddings=True,
    vocab_size=151936,
    bos_token_id=151643,
    eos_token_id=151643,
)

# Qwen/Qwen3-1.7B (RMS-normed queries and keys are part of the Qwen3 architecture)
QWEN_3_1_7B = dict(
    model_type="qwen3",
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    attention_bias=False,
    use_sliding_window=False,
    sliding_window=None,
    tie_word_embeddings=True,
    vocab_size=151936,
    bos_token_id=151643,
    eos_token_id=151645,
)

# google/gemma-2-2b: embeddings scaled by sqrt(hidden_size) and (1 + weight) RMS norms are part of the
# architecture; layers alternate local (sliding, 4096) and global attention, layer 0 local.
GEMMA_2_2B = dict(
    model_type="gemma2",
    hidden_size=2304,
    intermediate_size=9216,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    layer_types=["sliding_attention", "full_attention"],
    tie_word_embeddings=True,
    vocab_size=256000,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# google/gemma-3-1b-pt: five local layers (sliding window 512, rope theta 10k) per global one (rope theta
# 1M); the two layers here are one of each. qk-norm and the sqrt(hidden_size) embedding scale are built in.
GEMMA_3_1B = dict(
    model_type="gemma3_text",
    hidden_size=1152,
    intermediate_size=6912,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    rope_scaling=None,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    sliding_window=512,
    layer_types=["sliding_attention", "full_attention"],
    attention_bias=False,
    tie_word_embeddings=True,
    vocab_size=262144,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# mistralai/Mistral-7B-v0.1 (v0.1 rather than v0.3 for its 4096-token sliding window)
MISTRAL_7B_V0_1 = dict(
    model_type="mistral",
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
    vocab_size=32000,
    bos_token_id=1,
    eos_token_id=2,
)

# microsoft/Phi-4-mini-instruct's LongRoPE factors beyond 4096 tokens, one per rotary frequency (48 = 96 / 2)
# fmt: off
PHI_4_MINI_LONG_FACTOR = [
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533,
    5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651,
    14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03,
    32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
# fmt: on

# microsoft/Phi-4-mini-instruct: rotary on 3/4 of each 128-wide head, LongRoPE (short factors below 4096 tokens)
PHI_4_MINI = dict(
    model_type="phi3",
    hidden_size=3072,
    intermediate_size=8192,
    num_attention_heads=24,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    partial_rotary_factor=0.75,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=dict(
        type="longrope",
        short_factor=[1.0] * 48,
        long_factor=PHI_4_MINI_LONG_FACTOR,
    ),
    sliding_window=262144,
    attention_bias=False,
    tie_word_embeddings=True,
    vocab_size=200064,
    bos_token_id=199999,
    eos_token_id=200020,
    pad_token_id=199999,
)

# HuggingFaceTB/SmolLM2-1.7B (a Llama: full multi-head attention, tied embeddings)
SMOLLM2_1_7B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=130000.0,
    tie_word_embeddings=True,
    vocab_size=49152,
    bos_token_id=0,
    eos_token_id=0,
)

# allenai/OLMo-2-0425-1B: norms after attention and MLP (not before), RMS-normed queries and keys
OLMO_2_1B = dict(
    model_type="olmo2",
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=16,
    num_key_value_heads=16,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    attention_bias=False,
    tie_word_embeddings=False,
    vocab_size=100352,
    pad_token_id=100277,
    eos_token_id=100257,
)

FAMILIES = {
    "SmolLM2-1.7B": SMOLLM2_1_7B,
    "Llama-3.2-1B": pytest.param(LLAMA_3_2_1B, marks=slow),
    "Llama-3.1-8B": pytest.param(LLAMA_3_1_8B, marks=slow),
    "Qwen2.5-1.5B": pytest.param(QWEN_2_5_1_5B, marks=slow),
    "Qwen3-1.7B": pytest.param(QWEN_3_1_7B, marks=slow),
    "Gemma-2-2B": pytest.param(GEMMA_2_2B, marks=slow),
    "Gemma-3-1B": pytest.param(GEMMA_3_1B, marks=slow),
    "Mistral-7B-v0.1": pytest.param(MISTRAL_7B_V0_1, marks=slow),
    "Phi-4-mini": pytest.param(PHI_4_MINI, marks=slow),
    "OLMo-2-1B": pytest.param(OLMO_2_1B, marks=slow),
}


def test_released_configs_keep_their_settings_in_transformers_5():
    """config.json's rope_theta, rope_scaling and rope_local_base_freq are rope_parameters in transformers 5;
    the layer kinds and soft-capping survive the cut to two layers."""
    llama = released(LLAMA_3_2_1B)
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["rope_theta"] == 500000.0
    assert llama.rope_parameters["factor"] == 32.0 and llama.rope_parameters["original_max_position_embeddings"] == 8192
    for gemma in (released(GEMMA_2_2B), released(GEMMA_3_1B)):
        assert gemma.layer_types == ["sliding_attention", "full_attention"]
    gemma2, gemma3 = released(GEMMA_2_2B), released(GEMMA_3_1B)
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)
    assert gemma3.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert gemma3.rope_parameters["full_attention"]["rope_theta"] == 1000000.0
    phi = released(PHI_4_MINI)
    assert phi.rope_parameters["rope_type"] == "longrope" and phi.partial_rotary_factor == 0.75
    assert len(phi.rope_parameters["long_factor"]) == len(phi.rope_parameters["short_factor"]) == 48
    assert released(MISTRAL_7B_V0_1).sliding_window == 4096


@pytest.mark.parametrize("values", FAMILIES.values(), ids=FAMILIES.keys())
def test_language_model_family(values):
    """A released LM's config (2 layers, random bf16 weights) under Flamingo, fed 1152-wide features
    (a SigLIP so400m's width): exact with the gates closed; with them open the images matter and
    cached generation and a two-turn conversation agree with full forwards."""
    media_dim = 1152
    embeds = torch.randn(2, 2, 16, media_dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    media = dict(image_embeds=embeds, time_mask=TIME_MASK)
    # Gemma scales its embeddings by sqrt(hidden_size) (48 for Gemma-2-2B, 34 for Gemma-3-1B), so its hidden
    # states are 34-48 times a Llama's and random gated blocks move its logits by less than the bf16 tolerance.
    above_tolerance = not values["model_type"].startswith("gemma")
    check_flamingo(random_lm(values), media, media_dim=media_dim, above_tolerance=above_tolerance)
