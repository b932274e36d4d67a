"""Flamingo over Hugging Face language models: wrapping, freezing, exactness, and generation that reads the images."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import open_gates
from torch import nn

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA, VOCAB, WIDTH = 3, 64, 32


def llama_like(family: str) -> nn.Module:
    """A tiny random Llama, Qwen2 or Mistral (grouped-query attention: 4 query heads, 2 key/value heads)."""
    model_class, config_class = (getattr(transformers, f"{family}{suffix}") for suffix in ("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return model_class(config)


def llama():
    return llama_like("Llama")


FAMILIES = {
    "llama": llama,
    "qwen2": lambda: llama_like("Qwen2"),
    "mistral": lambda: llama_like("Mistral"),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=3, n_head=4, n_positions=64)
    ),
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            num_hidden_layers=3,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=WIDTH,
            max_position_embeddings=64,
        )
    ),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
        )
    ),
    "mpt": lambda: transformers.MptForCausalLM(
        transformers.MptConfig(vocab_size=VOCAB, d_model=WIDTH, n_layers=3, n_heads=4, max_seq_len=64)
    ),
}


def build(family: str = "llama", **kwargs) -> tuple[Flamingo, nn.Module]:
    """(Flamingo over a tiny random LM, an unwrapped copy of that LM)."""
    torch.manual_seed(0)
    lm = FAMILIES[family]().eval()
    original = copy.deepcopy(lm)
    sizes = dict(
        cross_attn_every=2, dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=4
    )
    model = Flamingo(lm, media_token_id=MEDIA, **{**sizes, **kwargs}).eval()
    return model, original


def prompt(b: int, n: int, media_at=(1,)) -> torch.Tensor:
    text = torch.randint(4, VOCAB, (b, n))
    text[:, list(media_at)] = MEDIA
    return text


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_gates_give_the_language_model_exactly(family):
    model, original = build(family)
    text, features = prompt(2, 9, media_at=(0, 4)), torch.randn(2, 2, 5, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=features).logits, original(input_ids=text).logits)
    assert len(model.gated_cross_attn) == 2  # before layers 0 and 2 of 3


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_are_the_language_models_own_and_load_after_wrapping(family):
    model, original = build(family)
    assert list(model.lm.state_dict()) == list(original.state_dict())
    fresh = FAMILIES[family]()
    model.lm.load_state_dict(fresh.state_dict())  # strict: every key of the plain LM loads into the wrapped one
    for (name, got), want in zip(model.lm.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_reads_the_images_and_equals_full_forwards(family):
    """Cached greedy tokens == uncached == argmax of repeated full forwards, with two images per row,
    a padded one, and tokens before the first image."""
    model, _ = build(family)
    open_gates(model, 0.8)
    text, features = prompt(2, 7, media_at=(2, 5)), torch.randn(2, 2, 5, WIDTH)
    text[1, 5] = 9  # row 1 has one image: its second item is padding, with no <image>
    time_mask = torch.tensor([[True, True], [True, False]])
    media = dict(image_embeds=features, time_mask=time_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(text, **media)
    uncached = model.generate(text, **media, use_cache=False)
    expected = text
    with torch.no_grad():
        for _ in range(5):
            logits = model(expected, image_embeds=features, time_mask=time_mask).logits[:, -1]
            logits[:, MEDIA] = float("-inf")
            expected = torch.cat((expected, logits.argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    text_only = model.generate(text, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert text_only.shape == cached.shape


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_left_padded_batch_rows_equal_rows_alone(family):
    model, _ = build(family)
    open_gates(model, 0.8)
    short, long = prompt(1, 4, media_at=(1,)), prompt(1, 7, media_at=(0, 4))
    features = torch.randn(2, 2, 5, WIDTH)
    batch = torch.cat((torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1), long))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    time_mask = torch.tensor([[True, False], [True, True]])
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    together = model.generate(batch, image_embeds=features, time_mask=time_mask, attention_mask=mask, **settings)
    alone_short = model.generate(short, image_embeds=features[:1, :1], **settings)
    alone_long = model.generate(long, image_embeds=features[1:], **settings)
    assert torch.equal(together[0, 7:], alone_short[0, 4:])
    assert torch.equal(together[1, 7:], alone_long[0, 7:])


def test_beam_search_and_several_sequences_expand_the_media_and_never_emit_the_media_token():
    model, _ = build()
    open_gates(model, 0.8)
    text, features = prompt(2, 6, media_at=(1, 3)), torch.randn(2, 2, 5, WIDTH)
    with torch.no_grad():
        bias = torch.zeros(VOCAB)
        bias[MEDIA] = 100.0  # the LM would pick the media token every time
        model.lm.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    settings = dict(max_new_tokens=4, pad_token_id=0, num_beams=3, num_return_sequences=2, repetition_penalty=1.2)
    out = model.generate(text, image_embeds=features, do_sample=False, **settings)
    assert out.shape == (4, 10) and not (out[:, 6:] == MEDIA).any()
    rows_alone = [model.generate(text[i : i + 1], image_embeds=features[i : i + 1], **settings) for i in range(2)]
    assert torch.equal(out, torch.cat(rows_alone))


def test_the_blocks_of_one_forward_share_one_immediate_layout(monkeypatch):
    """Which item each token reads is worked out once per forward of the language model, not once per
    gated block, and sharing it changes nothing (prompt: the chunk layout; decoding steps: per token)."""
    from flamingo_pytorch import fusion, immediate_media

    model, _ = build(cross_attn_every=1)  # three gated blocks
    open_gates(model, 0.8)
    text, features = prompt(2, 7, media_at=(2, 5)), torch.randn(2, 2, 5, WIDTH)
    text[1, 5] = 9  # row 1 has one image: its second item is padding, with no <image>
    media = dict(image_embeds=features, time_mask=torch.tensor([[True, True], [True, False]]))
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    calls = []

    def counted_layout(*args, **kwargs):
        calls.append(args)
        return immediate_media.immediate_layout(*args, **kwargs)

    monkeypatch.setattr(fusion, "immediate_layout", counted_layout)
    with torch.no_grad():
        shared, shared_tokens = model(text, **media).logits, model.generate(text, **media, **settings)
        assert len(calls) == 1 + 3  # the forward, then the prompt and two steps of generate
        monkeypatch.setattr(fusion.MediaState, "immediate_layout", lambda state, k: None)  # each block its own
        assert torch.equal(model(text, **media).logits, shared)
        assert torch.equal(model.generate(text, **media, **settings), shared_tokens)


def test_freezing_and_what_trains():
    encoder = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(3, WIDTH, 4, stride=4), nn.Flatten(2))
    torch.manual_seed(0)
    model = Flamingo(
        llama(),
        media_token_id=MEDIA,
        vision_encoder=nn.Sequential(encoder, Transpose()),
        dim_head=8,
        heads=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
    )
    model.train()
    assert not model.vision_encoder.training
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.flamingo_parameters()}
    text, images = prompt(2, 6), torch.randn(2, 1, 3, 8, 8)
    out = model(text, images, labels=text)
    out.loss.backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.gated_cross_attn.parameters())
    assert model.state.media is None  # cleared after the call


def test_media_are_cleared_after_an_error():
    model, _ = build()
    with pytest.raises(Exception):  # noqa: B017 - any error from inside the language model
        model(prompt(2, 5), image_embeds=torch.randn(2, 1, 5, WIDTH), position_ids="not a tensor")
    assert model.state.media is None and model.state.index is None


def test_bad_inputs_raise():
    model, _ = build()
    with pytest.raises(ValueError, match="image_embeds has batch 3 but input_ids has batch 2"):
        model(prompt(2, 5), image_embeds=torch.randn(3, 1, 5, WIDTH))
    with pytest.raises(ValueError, match="images need a vision_encoder"):
        model(prompt(2, 5), torch.randn(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        Flamingo(nn.Linear(2, 2), media_token_id=MEDIA)
    for chosen in ([], [2, 1], [1, 1], [0, 3]):
        with pytest.raises(ValueError, match=r"cross_attn_layers must be increasing indices in \[0, 3\)"):
            build(cross_attn_layers=chosen)


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # (B, e, p) -> (B, p, e)


def test_added_token_rows_train_alone_and_start_as_the_embedding():
    model, original = build(train_token_ids=[MEDIA, 5])
    text = prompt(2, 6, media_at=(1,))
    text[:, 3] = 5
    features = torch.randn(2, 1, 5, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=features).logits, original(input_ids=text).logits)
    assert model.token_rows.weight in set(model.flamingo_parameters())
    model(text, image_embeds=features, labels=text).loss.backward()
    assert model.token_rows.weight.grad.abs().sum(dim=1).gt(0).all()  # both rows get gradients
    assert model.lm.get_input_embeddings().weight.grad is None  # the embedding itself stays frozen


def test_save_and_load_only_what_trains(tmp_path):
    model, _ = build(train_token_ids=[MEDIA])
    open_gates(model, 0.5)
    with torch.no_grad():
        for param in model.flamingo_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "flamingo.safetensors"
    model.save_trained(str(path))
    saved = set(model.trained_state_dict())
    assert saved and all(key.startswith(("perceiver_resampler.", "gated_cross_attn.", "token_rows.")) for key in saved)
    torch.manual_seed(0)
    fresh_lm = FAMILIES["llama"]()  # the same random LM again (seed 0), standing in for from_pretrained
    fresh = Flamingo(
        fresh_lm,
        media_token_id=MEDIA,
        cross_attn_every=2,
        train_token_ids=[MEDIA],
        dim_head=8,
        heads=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
        perceiver_num_time_embeds=4,
    ).eval()
    fresh.load_trained(str(path))
    text, features = prompt(2, 6, media_at=(1, 4)), torch.randn(2, 2, 5, WIDTH)
    with torch.no_grad():
        assert torch.equal(fresh(text, image_embeds=features).logits, model(text, image_embeds=features).logits)
    other, _ = build(cross_attn_every=1)
    with pytest.raises(ValueError, match=r"missing keys .*gated_cross_attn.2"):
        other.load_trained(str(path))


def test_opt_with_embeddings_narrower_than_its_layers():
    """OPT-350m's layout: 16-wide embeddings projected to 32-wide decoder layers; the blocks are 32 wide."""
    from flamingo_pytorch.language_model import decoder_width

    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        word_embed_proj_dim=16,
        num_hidden_layers=3,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    lm = transformers.OPTForCausalLM(config).eval()
    original = copy.deepcopy(lm)
    assert decoder_width(lm) == WIDTH and lm.get_input_embeddings().embedding_dim == 16
    model = Flamingo(lm, media_token_id=MEDIA, dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4)
    text, features = prompt(2, 7, media_at=(1,)), torch.randn(2, 1, 5, WIDTH)
    with torch.no_grad():
        assert torch.equal(model(text, image_embeds=features).logits, original(input_ids=text).logits)
        open_gates(model, 0.8)
        assert not torch.equal(model(text, image_embeds=features).logits, original(input_ids=text).logits)


def vision_encoders(width: int) -> dict:
    """Tiny encoders of each kind whose feature width can be read off them."""
    clip = transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    encoders = {"transformers": lambda: transformers.CLIPVisionModel(clip)}
    timm = pytest.importorskip("timm")
    encoders["timm"] = lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=width, depth=1, num_heads=2
    )
    open_clip = pytest.importorskip("open_clip")
    vision = open_clip.CLIPVisionCfg(layers=1, width=width, head_width=12, image_size=8, patch_size=4)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    encoders["open_clip"] = lambda: open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text)
    return encoders


@pytest.mark.parametrize("kind", ["transformers", "timm", "open_clip"])
def test_media_dim_is_read_off_the_vision_encoder(kind):
    encoder = vision_encoders(24)[kind]()
    sizes = dict(dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4)
    model = Flamingo(llama(), media_token_id=MEDIA, vision_encoder=encoder, **sizes)
    assert model.perceiver_resampler.dim == 24 and model.gated_cross_attn[0].attn.media_dim == 24
    out = model(prompt(2, 6), torch.randn(2, 1, 3, 8, 8)).logits
    assert out.shape == (2, 6, VOCAB)
    with pytest.raises(ValueError, match="media_dim=32 but the vision encoder returns features of width 24"):
        Flamingo(llama(), media_token_id=MEDIA, vision_encoder=encoder, media_dim=32, **sizes)


def test_media_of_another_width_name_media_dim():
    encoder = nn.Sequential(nn.Conv2d(3, 24, 4, stride=4), nn.Flatten(2), Transpose())  # width unknown until run
    model = Flamingo(llama(), media_token_id=MEDIA, vision_encoder=encoder, dim_head=8, heads=2, perceiver_depth=1)
    with pytest.raises(ValueError, match=r"the vision encoder returns features of width 24 .* pass media_dim=24"):
        model(prompt(2, 6), torch.randn(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"image_embeds have features of width 24 .*media_dim=32"):
        model(prompt(2, 6), image_embeds=torch.randn(2, 1, 5, 24))


def test_token_ids_outside_the_vocabulary_and_wrapping_twice_raise():
    for token in (VOCAB, 5000, -1, 2.0):
        with pytest.raises(ValueError, match=rf"media_token_id must be a token id in \[0, {VOCAB}\).*got {token}"):
            Flamingo(llama(), media_token_id=token)
    model, _ = build()
    with pytest.raises(ValueError, match="lm is already wrapped by a Flamingo"):
        Flamingo(model.lm, media_token_id=MEDIA)
    for ids in (prompt(2, 5).float(), prompt(2, 5).bool()):
        with pytest.raises(TypeError, match=f"input_ids must be an integer tensor of token ids, got {ids.dtype}"):
            model(ids, image_embeds=torch.randn(2, 1, 5, WIDTH))
        with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
            model.generate(ids, max_new_tokens=1)


def test_a_language_model_on_the_meta_device_wraps_with_trained_token_rows():
    """Counting a large model's parameters without memory: nothing reads a meta tensor's value."""
    with torch.device("meta"):
        model = Flamingo(llama(), media_token_id=MEDIA, train_token_ids=[MEDIA, 5])
    assert model.token_rows.weight.is_meta and model.token_rows.token_ids.is_meta
    assert all(param.is_meta for param in model.flamingo_parameters())
    with torch.device("meta"), pytest.raises(ValueError, match=rf"train_token_ids must lie in \[0, {VOCAB}\)"):
        Flamingo(llama(), media_token_id=MEDIA, train_token_ids=[VOCAB])


def test_time_mask_of_0_1_integers_equals_a_bool_one_in_both_models(tiny_model):
    model, _ = build()
    open_gates(model, 0.8)
    text, features = prompt(2, 7, media_at=(1, 4)), torch.randn(2, 2, 5, WIDTH)
    time_mask = torch.tensor([[True, True], [True, False]])
    text[1, 4] = 7  # row 1: one image, its second item padded
    with torch.no_grad():
        want = model(text, image_embeds=features, time_mask=time_mask).logits
        assert torch.equal(model(text, image_embeds=features, time_mask=time_mask.long()).logits, want)
        with pytest.raises(ValueError, match=r"time_mask holds integers other than 0 and 1: \[0, 2\]"):
            model(text, image_embeds=features, time_mask=time_mask.long() * 2)
        open_gates(tiny_model, 0.8)
        text = torch.randint(4, 64, (2, 7))
        text[:, 1], text[0, 4] = MEDIA, MEDIA
        images = torch.randn(2, 2, 3, 8, 8)
        want = tiny_model(text, images, time_mask=time_mask)
        assert torch.equal(tiny_model(text, images, time_mask=time_mask.to(torch.uint8)), want)
        with pytest.raises(ValueError, match="time_mask holds integers other than 0 and 1"):
            tiny_model(text, images, time_mask=time_mask.long() - 1)
