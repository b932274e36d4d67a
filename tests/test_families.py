"""Flamingo over today's language-model families and vision encoders, at their released widths, in bfloat16.

Each language model is built from its released ``config.json`` values (written out below, the model
named above each) with ``num_hidden_layers=2`` and random weights; each vision encoder at its
released width and resolution with one layer. Nothing is downloaded. Checked for every one:

- closed gates (as built): Flamingo's logits are the bare language model's, bit for bit, with images given;
- open gates: the images reach the text (other images change the logits after the first media token,
  never before it, and a padded image changes nothing), and cached greedy ``generate`` agrees with a
  full forward over its output (``check_cached_generation``).

Wide embeddings take seconds to initialize on a CPU, so most cases are ``@pytest.mark.slow``
(``pytest -m slow``); SmolLM2-1.7B and the configs' check run by default.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import open_gates
from einops import rearrange
from torch import Tensor, nn

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA = 7  # an ordinary token id standing for <image>; prompt tokens are drawn from [10, 1000)
slow = pytest.mark.slow


def released(values: dict) -> transformers.PretrainedConfig:
    """A transformers config from a released config.json's values (``model_type`` among them), cut to two
    decoder layers."""
    values = dict(values, num_hidden_layers=2)
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


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


def random_lm(values: dict) -> nn.Module:
    """A random bfloat16 causal LM with a released config's ``values`` and two decoder layers.

    Built in bfloat16 from the start (half the memory and time of float32 and a cast), and initialized
    once by transformers' ``init_weights`` (not after torch's default initialization as well, which
    would double the seconds spent drawing the wide embedding).
    """
    from transformers.initialization import no_init_weights

    config = released(values)
    torch.manual_seed(0)
    with no_init_weights():
        lm = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lm.init_weights()
    return lm.eval()


def wrap(lm: nn.Module, **kwargs) -> Flamingo:
    """Flamingo with a gated block before both decoder layers; small resampler and blocks of our own sizes."""
    torch.manual_seed(0)
    sizes = dict(dim_head=64, heads=8, ff_mult=1, perceiver_depth=1, perceiver_num_latents=8)
    return Flamingo(lm, media_token_id=MEDIA, cross_attn_every=1, perceiver_num_time_embeds=2, **sizes, **kwargs).eval()


def prompt() -> Tensor:
    """(2, 10) token ids: <image> at positions 1 and 6 of the first row, at position 1 of the second."""
    text = torch.randint(10, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    text[0, [1, 6]] = MEDIA
    text[1, 1] = MEDIA
    return text


TIME_MASK = torch.tensor([[True, True], [True, False]])  # the second row has one image: its second item is padding
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: one bf16 ulp, relative (a rounding errs by half of it)


def logit_tolerance(logits: Tensor) -> Tensor:
    """How far a cached bf16 step's logits (..., V) may lie from a full forward's: 4 eps max|z| per position.

    The two computations do the same arithmetic in other orders and shapes, so any bf16 rounding on
    the way may land on the other neighbour: about 16 roundings of the hidden states (attention, MLP
    and their residual adds in 2 decoder layers, the same in 2 gated blocks) and the final norm, each
    up to eps/2 relative. Independent, they leave the final hidden state off by about
    sqrt(17) eps/2 = 2 eps relative, so each logit by about 2 eps times the logits' rms, and the
    largest such error over the vocabulary (about 4.5 standard deviations) by about 2 eps max|z|
    (max|z| is about 4.5 rms for random weights). Rounding the logits themselves adds eps/2 max|z|.
    4 eps max|z| covers the 2.5 with room; the worst measured (10 families, 1 and 2 threads) is 1.35.
    """
    return 4 * BF16_EPS * logits.abs().amax(dim=-1, keepdim=True)


def check_images_matter(model: Flamingo, text: Tensor, media: dict, *, above_tolerance: bool) -> None:
    """With the gates open: other images change every logit row from the first <image> on (by more than
    ``logit_tolerance`` if ``above_tolerance``), and no row before it; changing a padded item (time_mask
    False) changes nothing."""
    (name, given), time_mask = next((k, v) for k, v in media.items() if k != "time_mask"), media["time_mask"]
    other, padded = torch.randn_like(given), given.clone()
    padded[1, 1] = torch.randn_like(padded[1, 1])  # the second row's padding item
    with torch.no_grad():
        seen = model(text, **media).logits
        changed = model(text, **{name: other}, time_mask=time_mask).logits
        repadded = model(text, **{name: padded}, time_mask=time_mask).logits
    assert torch.equal(changed[:, :1], seen[:, :1])  # position 0 comes before every <image>
    change = (changed[:, 1:] - seen[:, 1:]).float().abs().amax(dim=-1, keepdim=True)  # (b, n - 1, 1)
    assert (change > (logit_tolerance(seen[:, 1:].float()) if above_tolerance else 0)).all()
    assert torch.equal(repadded, seen)


def check_cached_generation(model: Flamingo, text: Tensor, media: dict, steps: int = 8) -> None:
    """Greedy ``generate`` with its key/value cache against one full forward (no cache) over its output.

    At every step and every vocabulary entry the cached logits lie within ``logit_tolerance`` of the
    full forward's at the same position. The chosen token is the full forward's argmax wherever that
    argmax leads by more than twice the tolerance (elsewhere a near-tie may go either way in bf16, and
    the chosen token's logit must be within twice the tolerance of the best); at least one step is that
    decisive. The top two of V ~ 10^5 random logits lie about sigma / sqrt(2 ln V) = max|z| / 22 = 6 eps max|z|
    apart on average, so near-ties under 8 eps max|z| are common: the strict part is the logits' agreement
    at every entry.
    """
    out = model.generate(
        text,
        **media,
        max_new_tokens=steps,
        do_sample=False,
        eos_token_id=None,  # run all the steps
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens, prompt_length = out.sequences, text.shape[1]
    assert tokens.shape == (text.shape[0], prompt_length + steps)
    check_steps_against_full_forward(model, torch.stack(out.logits, dim=1), tokens, prompt_length, media)


def check_steps_against_full_forward(model: Flamingo, cached: Tensor, tokens: Tensor, start: int, media: dict) -> None:
    """Cached decoding's logits (b, steps, V), from which tokens[:, start:] were chosen greedily, against one
    full forward over ``tokens`` (b, start + steps): within ``logit_tolerance`` at every entry; the chosen
    token is the full forward's argmax wherever that leads by more than twice the tolerance (at least once)."""
    with torch.no_grad():
        full = model(tokens, **media).logits[:, start - 1 : -1].float()  # (b, steps, V)
    tolerance = logit_tolerance(full)
    assert ((cached.float() - full).abs() <= tolerance).all()
    full[..., MEDIA] = float("-inf")  # generation never emits <image>
    chosen, top2 = tokens[:, start:], full.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * tolerance[..., 0]  # (b, steps)
    assert decisive.any()
    assert torch.equal(chosen[decisive], full.argmax(dim=-1)[decisive])
    assert (full.gather(-1, chosen[..., None]) >= top2[..., :1] - 2 * tolerance).all()  # near-ties: within reach


def check_conversation(model: Flamingo, text: Tensor, media: dict, steps: int = 4) -> None:
    """The same prompt as a two-turn conversation (``prefill``, ``extend``, ``generate_from``): the first
    turn holds each row's first image; the second turn row 0's second image and row 1's padded item
    slot. The logits each reply token is chosen from are checked like cached generation's."""
    (name, given), time_mask = next((k, v) for k, v in media.items() if k != "time_mask"), media["time_mask"]
    state = model.prefill(text[:, :5], **{name: given[:, :1]}, time_mask=time_mask[:, :1])
    model.extend(state, text[:, 5:], **{name: given[:, 1:]}, time_mask=time_mask[:, 1:])
    chosen_from = []

    class Recorder:  # sees each token as it is streamed, before it is fed back
        def put(self, value: Tensor) -> None:
            chosen_from.append(state.logits.clone())

        def end(self) -> None:
            pass

    reply = model.generate_from(state, max_new_tokens=steps, temperature=0, streamer=Recorder())
    cached = torch.stack(chosen_from[1:], dim=1)  # (b, steps, V); the first put is the conversation so far
    check_steps_against_full_forward(model, cached, torch.cat((text, reply), dim=1), text.shape[1], media)


def check_flamingo(lm: nn.Module, media: dict, *, above_tolerance: bool = True, **kwargs) -> Flamingo:
    """Closed gates: the bare LM's logits exactly; open gates: the images matter, cached generation agrees.

    With ``above_tolerance`` the images must move the logits by more than the generation check's
    tolerance, so that a decoding step reading the wrong media could not hide in it (true of random
    1152-wide features; a random one-layer encoder maps random images to features that differ less).
    """
    text = prompt()
    with torch.no_grad():
        bare = lm(input_ids=text).logits  # before wrapping
    model = wrap(lm, **kwargs)
    with torch.no_grad():
        closed = model(text, **media).logits
    assert closed.dtype == torch.bfloat16 and torch.equal(closed, bare)
    open_gates(model, 1.0)
    check_images_matter(model, text, media, above_tolerance=above_tolerance)
    check_cached_generation(model, text, media)
    check_conversation(model, text, media)
    return model


@pytest.fixture(autouse=True)
def _free_models():
    """Free each test's models before the next test builds its own (a Flamingo and its language model
    refer to each other through the model's forward hook, so only the cycle collector frees them)."""
    yield
    gc.collect()


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


def small_lm() -> nn.Module:
    """A small random bf16 Llama (width 256, vocabulary 1000) for the vision encoders to feed."""
    values = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    return random_lm(dict(values, num_key_value_heads=2, vocab_size=1000))


def siglip_so400m_384() -> nn.Module:
    """google/siglip-so400m-patch14-384's vision tower (1 of its 27 layers): 27 x 27 = 729 patches."""
    config = transformers.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=14,
        image_size=384,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,  # its attention-pooling head's output is not what Flamingo reads (see the docs)
    )
    return transformers.SiglipVisionModel(config)


def clip_vit_l_14_336() -> nn.Module:
    """openai/clip-vit-large-patch14-336's vision tower (1 of its 24 layers): 24 x 24 patches and the class token."""
    config = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=14,
        image_size=336,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return transformers.CLIPVisionModel(config)


def open_clip_vit_l_14() -> nn.Module:
    """open_clip's ViT-L-14 (OpenFlamingo's encoder), both towers cut to 1 layer through create_model's
    config overrides; VisionEncoder returns the visual tower's 16 x 16 patch tokens."""
    open_clip = pytest.importorskip("open_clip")
    config = open_clip.get_model_config("ViT-L-14")
    vision, text = dict(config["vision_cfg"], layers=1), dict(config["text_cfg"], layers=1)
    return open_clip.create_model("ViT-L-14", pretrained=None, vision_cfg=vision, text_cfg=text)


def dinov2_vit_l_14() -> nn.Module:
    """timm's vit_large_patch14_dinov2 (1 of its 24 blocks) at 518 pixels: 37 x 37 patches and the class token."""
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_large_patch14_dinov2", pretrained=False, depth=1)


ENCODERS = {  # name -> (builder, image size, patches, width)
    "CLIP-ViT-L/14-336": pytest.param(clip_vit_l_14_336, 336, 577, 1024, marks=slow),
    "SigLIP-so400m/14-384": pytest.param(siglip_so400m_384, 384, 729, 1152, marks=slow),
    "open_clip-ViT-L-14": pytest.param(open_clip_vit_l_14, 224, 256, 1024, marks=slow),
    "DINOv2-ViT-L/14": pytest.param(dinov2_vit_l_14, 518, 1370, 1024, marks=slow),
}


@pytest.mark.parametrize(("build", "size", "patches", "width"), ENCODERS.values(), ids=ENCODERS.keys())
def test_vision_encoder(build, size, patches, width):
    """A released encoder's width (1 layer, random bf16 weights) feeds Flamingo, which reads that width off
    it: exact with the gates closed; with them open the images matter and cached generation agrees;
    images give exactly what their precomputed features give."""
    torch.manual_seed(0)
    encoder = build().to(torch.bfloat16)
    images = torch.randn(2, 2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    media = dict(images=images, time_mask=TIME_MASK)
    model = check_flamingo(small_lm(), media, vision_encoder=encoder, above_tolerance=False)
    assert model.perceiver_resampler.dim == width
    with torch.no_grad():
        features = model.vision_encoder(images.flatten(0, 1))  # (b t, p, e)
        assert features.shape == (4, patches, width) and features.dtype == torch.bfloat16
        from_images = model(prompt(), images, time_mask=TIME_MASK).logits
        given = model(prompt(), image_embeds=features.unflatten(0, (2, 2)), time_mask=TIME_MASK).logits
    assert torch.equal(from_images, given)


def siglip2_so400m_naflex() -> nn.Module:
    """google/siglip2-so400m-patch16-naflex's vision tower (1 of its 27 layers): 16-pixel patches at any
    aspect ratio, its 16 x 16 grid of position embeddings resized to each image's grid. (The fixed-size
    SigLIP2 checkpoints, e.g. siglip2-so400m-patch14-384, are SiglipVisionModel towers: tested above.)"""
    config = transformers.Siglip2VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=16,
        num_patches=256,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return transformers.Siglip2VisionModel(config)


class NaFlexPatches(nn.Module):
    """A SigLIP2 NaFlex tower as a (B, c, H, W) -> (B, H/16 W/16, e) encoder: it reads images cut into
    patches the way its image processor cuts them, with the patches' mask and grid shape."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images: Tensor) -> Tensor:
        size = self.tower.config.patch_size
        patches = rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=size, q=size)
        mask = torch.ones(patches.shape[:2], dtype=torch.long)  # (b, h w): every patch is real
        grid = torch.tensor([[images.shape[-2] // size, images.shape[-1] // size]] * len(images))  # (b, 2)
        return self.tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid).last_hidden_state


@slow
def test_siglip2_naflex_tower_as_given():
    """The SigLIP2 NaFlex tower at its width, passed to Flamingo as it is (VisionEncoder cuts the patches),
    under the same checks as the encoders above (256 x 256 images: its native 16 x 16 grid); its
    features equal those of the tower fed by NaFlexPatches, the image processor's cut written out here."""
    torch.manual_seed(0)
    tower = siglip2_so400m_naflex().to(torch.bfloat16)
    images = torch.randn(2, 2, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    media = dict(images=images, time_mask=TIME_MASK)
    model = check_flamingo(small_lm(), media, vision_encoder=tower, above_tolerance=False)
    with torch.no_grad():
        features = model.vision_encoder(images.flatten(0, 1))
        assert features.shape == (4, 256, 1152)
        assert torch.equal(features, NaFlexPatches(tower)(images.flatten(0, 1)))
