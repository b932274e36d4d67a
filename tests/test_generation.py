"""Generation: cached decoding equals repeated full forwards; conversations; sampling; caches."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, TINY, full_logits, greedy_by_full_forward, open_gates, tiny_image_encoder

from flamingo_pytorch import FlamingoPaLM, PerceiverResampler
from flamingo_pytorch import generation as generation_module
from flamingo_pytorch.sampling import keep_top_k, keep_top_p, sample_next_token

MEDIA = TINY["media_token_id"]
STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads that wait on each other cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> FlamingoPaLM:
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()).eval()
    open_gates(model, 0.8)
    return model


def images(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, 3, IMAGE_SIZE, IMAGE_SIZE)


def prompt(b: int, n: int, media_at: tuple[int, ...] = ()) -> torch.Tensor:
    text = torch.randint(4, TINY["num_tokens"], (b, n))
    text[:, list(media_at)] = MEDIA
    return text


def greedy(model: FlamingoPaLM, text: torch.Tensor, steps: int = STEPS, **kwargs) -> torch.Tensor:
    return model.generate(text, max_new_tokens=steps, temperature=0, **kwargs)


# -- cached greedy decoding equals repeated full forwards -----------------------------------------


def test_text_only_matches_full_forward(model):
    text = prompt(2, 7)
    assert torch.equal(greedy(model, text), greedy_by_full_forward(model, text))


def test_one_image_matches_full_forward(model):
    text, pixels = prompt(2, 8, media_at=(1,)), images(2, 1)
    expected = greedy_by_full_forward(model, text, images=pixels)
    assert torch.equal(greedy(model, text, images=pixels), expected)
    assert not torch.equal(expected, greedy_by_full_forward(model, text, images=images(2, 1))), "media must matter"


def test_the_blocks_of_a_cached_step_share_one_immediate_layout(model, monkeypatch):
    """Which item each new token reads is worked out once per cached forward, for all gated blocks
    (TINY has two), and sharing it changes no token."""
    from flamingo_pytorch import immediate_media

    text, pixels = prompt(2, 9, media_at=(0, 4)), images(2, 2)
    text[1, 4] = 7  # row 1 has one image; its second item is padding
    time_mask = torch.tensor([[True, True], [True, False]])
    calls = []

    def counted_layout(*args, **kwargs):
        calls.append(args)
        return immediate_media.immediate_layout(*args, **kwargs)

    monkeypatch.setattr(generation_module, "immediate_layout", counted_layout)
    shared = greedy(model, text, steps=4, images=pixels, time_mask=time_mask)
    assert len(calls) == 4  # the prompt, then three steps (the fourth token needs no forward)
    monkeypatch.setattr(generation_module, "shared_layout", lambda *args: None)  # each block its own
    assert torch.equal(greedy(model, text, steps=4, images=pixels, time_mask=time_mask), shared)
    assert torch.equal(shared, greedy_by_full_forward(model, text, steps=4, images=pixels, time_mask=time_mask))


def test_several_images_with_time_mask_padding_match_full_forward(model):
    text = prompt(2, 10, media_at=(0, 4))
    text[1, 4] = 7  # row 1 has a single image; its second item is padding
    text[0, 8] = MEDIA  # row 0: three images
    pixels, time_mask = images(2, 3), torch.tensor([[True, True, True], [True, False, False]])
    expected = greedy_by_full_forward(model, text, images=pixels, time_mask=time_mask)
    assert torch.equal(greedy(model, text, images=pixels, time_mask=time_mask), expected)


def test_videos_match_full_forward(model):
    text, videos = prompt(2, 9, media_at=(2, 5)), torch.randn(2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(greedy(model, text, videos=videos), greedy_by_full_forward(model, text, videos=videos))


def test_image_embeds_and_all_previous_media_mode_match_full_forward():
    torch.manual_seed(1)
    model = FlamingoPaLM(**TINY, only_attend_immediate_media=False).eval()
    open_gates(model, 0.8)
    text, embeds = prompt(2, 9, media_at=(1, 5)), torch.randn(2, 2, 5, TINY["dim"])
    expected = greedy_by_full_forward(model, text, image_embeds=embeds)
    assert torch.equal(greedy(model, text, image_embeds=embeds), expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_rows_equal_rows_alone(model, use_cache):
    rows = [prompt(1, 9, media_at=(0, 5)), prompt(1, 5, media_at=(1,)), prompt(1, 3)]
    pixels = images(3, 2)
    time_mask = torch.tensor([[True, True], [True, False], [False, False]])
    # Pad with the media token itself: padding must not count as media.
    text = torch.full((3, 9), MEDIA)
    attention_mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, row in enumerate(rows):
        text[i, 9 - row.shape[1] :], attention_mask[i, 9 - row.shape[1] :] = row, True
    batch = greedy(model, text, images=pixels, time_mask=time_mask, attention_mask=attention_mask, use_cache=use_cache)
    for i, row in enumerate(rows):
        alone = greedy_by_full_forward(model, row, images=pixels[i : i + 1], time_mask=time_mask[i : i + 1])
        assert torch.equal(batch[i, 9 - row.shape[1] :], alone[0]), f"row {i}"


def test_uncached_equals_cached(model):
    text, pixels = prompt(2, 6, media_at=(0,)), images(2, 1)
    assert torch.equal(greedy(model, text, images=pixels, use_cache=False), greedy(model, text, images=pixels))


# -- conversations ---------------------------------------------------------------------------------


def test_conversation_with_appended_images_matches_full_forward(model):
    pixels = images(2, 3)
    turns = [prompt(2, 5, media_at=(0,)), prompt(2, 4, media_at=(1,)), prompt(2, 3), prompt(2, 4, media_at=(0,))]
    turn_items = [1, 1, 0, 1]
    state = model.prefill(turns[0], pixels[:, :1])
    conversation, seen = turns[0], 1
    torch.testing.assert_close(state.logits, full_logits(model, conversation, images=pixels[:, :1]))
    for turn, items in zip(turns[1:], turn_items[1:]):
        reply = model.generate_from(state, max_new_tokens=3, temperature=0)
        new_images = pixels[:, seen : seen + items] if items else None
        model.extend(state, turn, new_images)
        conversation, seen = torch.cat((conversation, reply, turn), dim=1), seen + items
        torch.testing.assert_close(state.logits, full_logits(model, conversation, images=pixels[:, :seen]))
    assert state.num_media == 3


def test_batched_conversation_rows_with_unequal_images_equal_rows_alone(model):
    # Row 1 has one image fewer in turn 0 and one more in turn 2: padding ends its turn-0 items.
    turns = [prompt(2, 6, media_at=(0, 3)), prompt(2, 3, media_at=(1,)), prompt(2, 4, media_at=(0,))]
    turns[0][1, 3], turns[2][0, 0] = 9, 9
    pixels = [images(2, 2), images(2, 1), images(2, 1)]
    masks = [torch.tensor([[True, True], [True, False]]), None, torch.tensor([[False], [True]])]
    state = model.prefill(turns[0], pixels[0], time_mask=masks[0])
    for turn, turn_pixels, mask in zip(turns[1:], pixels[1:], masks[1:]):
        model.extend(state, turn, turn_pixels, time_mask=mask)
    for row in range(2):
        real = [p[row, m[row]] if m is not None else p[row] for p, m in zip(pixels, masks)]  # each (t_i, c, H, W)
        conversation = torch.cat([turn[row : row + 1] for turn in turns], dim=1)
        alone = full_logits(model, conversation, images=torch.cat(real)[None])
        torch.testing.assert_close(state.logits[row : row + 1], alone)


def test_token_by_token_extend_matches_every_position(model):
    # Text first, the images later: the first image makes the state recompute its text-only past.
    text, pixels = prompt(1, 8, media_at=(2, 5)), images(1, 2)
    state = model.prefill(text[:, :1], max_new_tokens=1)
    torch.testing.assert_close(state.logits, full_logits(model, text[:, :1]))
    for i in range(1, 8):
        seen = int((text[0, : i + 1] == MEDIA).sum())
        new_image = pixels[:, seen - 1 : seen] if text[0, i] == MEDIA else None
        model.extend(state, text[:, i : i + 1], new_image)
        media = {"images": pixels[:, :seen]} if seen else {}
        torch.testing.assert_close(state.logits, full_logits(model, text[:, : i + 1], **media))


def test_reply_finished_by_eos_is_left_out_of_the_conversation(model):
    text = prompt(2, 4)
    state = model.prefill(text)
    reply = model.generate_from(state, max_new_tokens=4, temperature=0)
    eos = int(reply[0, 1])
    state = model.prefill(text)
    reply = model.generate_from(state, max_new_tokens=4, temperature=0, eos_token_id=eos, pad_token_id=1)
    turn = prompt(2, 2)
    model.extend(state, turn)
    row0 = torch.cat((text[:1], reply[:1, : int((reply[0] == eos).nonzero()[0]) + 1], turn[:1]), dim=1)
    torch.testing.assert_close(state.logits[:1], full_logits(model, row0))


# -- sampling --------------------------------------------------------------------------------------


def test_media_token_is_never_generated(model):
    with torch.no_grad():
        model.palm.token_emb.weight[MEDIA] *= 50  # tied: the media token now dominates the logits
    text = prompt(2, 4)
    assert (full_logits(model, text).argmax(dim=-1) == MEDIA).all()
    for kwargs in (dict(temperature=0), dict(temperature=1.0), dict(top_k=3)):
        assert not (model.generate(text, max_new_tokens=5, **kwargs)[:, 4:] == MEDIA).any()


def test_sampling_is_reproducible_with_a_generator(model):
    text = prompt(2, 4)

    def run(seed):
        return model.generate(text, max_new_tokens=8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    text, pixels = prompt(2, 5, media_at=(0,)), images(2, 1)
    expected = greedy(model, text, images=pixels)
    assert torch.equal(model.generate(text, pixels, max_new_tokens=STEPS, top_k=1), expected)
    assert torch.equal(model.generate(text, pixels, max_new_tokens=STEPS, top_p=1e-6), expected)


def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.randn(4, 50) * 3
    generator = torch.Generator().manual_seed(0)
    order = logits.argsort(dim=-1, descending=True)
    probs = logits.softmax(dim=-1).gather(-1, order)
    for _ in range(200):
        token = sample_next_token(logits, top_k=5, generator=generator)
        assert (order[:, :5] == token[:, None]).any(dim=-1).all()
        token = sample_next_token(logits, top_p=0.6, generator=generator)
        rank = (order == token[:, None]).float().argmax(dim=-1)  # (b,)
        mass_before = probs.cumsum(dim=-1).gather(-1, rank[:, None])[:, 0] - probs.gather(-1, rank[:, None])[:, 0]
        assert (mass_before < 0.6 + 1e-6).all()
    assert (keep_top_k(logits, 5) > float("-inf")).sum(dim=-1).eq(5).all()
    assert (keep_top_p(logits, 1.0) > float("-inf")).all()


# -- eos, modes, caches ----------------------------------------------------------------------------


def test_eos_pads_the_row_and_stops_early(model, monkeypatch):
    text = prompt(2, 4)
    free = greedy(model, text, steps=8)
    eos = int(free[0, 6])  # row 0 emits it at its third new token
    out = greedy(model, text, steps=8, eos_token_id=eos, pad_token_id=1)
    first = int((out[0, 4:] == eos).nonzero()[0]) + 4
    assert torch.equal(out[0, : first + 1], free[0, : first + 1]) and (out[0, first + 1 :] == 1).all()
    for i in range(2):  # each row equals the row generated alone
        assert torch.equal(out[i], greedy(model, text[i : i + 1], steps=8, eos_token_id=eos, pad_token_id=1)[0])
    calls = []
    run = generation_module.GenerationState.run
    monkeypatch.setattr(generation_module.GenerationState, "run", lambda *a: calls.append(a[2].shape) or run(*a))
    out = greedy(model, text[:1], steps=8, eos_token_id=eos, pad_token_id=1)
    assert len(calls) == 1 + (first - 4), "prefill, then one step per token before eos"


def test_generate_restores_modes_and_leaves_requires_grad_alone(model):
    model.train()
    model.perceiver_resampler.eval()
    model.palm.layers[0].requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    text, pixels = prompt(1, 4, media_at=(0,)), images(1, 1)
    out = model.generate(text, pixels, max_new_tokens=3)
    state = model.prefill(text, pixels)
    model.extend(state, prompt(1, 2))
    model.generate_from(state, max_new_tokens=2)
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert grads == {name: p.requires_grad for name, p in model.named_parameters()}
    assert not out.is_inference() and not out.requires_grad
    model(out[:, :-1]).sum().backward()  # the tokens can feed training code


def test_media_encoded_and_projected_once_per_prompt(model, monkeypatch):
    counts = {"encoder": 0, "resampler": 0, "project_media": 0}
    model.img_encoder.register_forward_hook(lambda *a: counts.__setitem__("encoder", counts["encoder"] + 1))
    model.perceiver_resampler.register_forward_hook(lambda *a: counts.__setitem__("resampler", counts["resampler"] + 1))
    project = type(model.gated_cross_attn[0].attn).project_media

    def counted(self, media):
        counts["project_media"] += 1
        return project(self, media)

    monkeypatch.setattr(type(model.gated_cross_attn[0].attn), "project_media", counted)
    model.generate(prompt(2, 5, media_at=(0, 2)), images(2, 2), max_new_tokens=5)
    assert counts == {"encoder": 1, "resampler": 1, "project_media": len(model.gated_cross_attn)}


def test_caches_are_preallocated_and_grow_geometrically(model):
    text = prompt(2, 5)
    state = model.prefill(text, max_new_tokens=4)
    assert state.capacity == 9 and state.caches[0].keys.shape == (2, 1, 9, TINY["dim_head"])
    pointer = state.caches[0].keys.data_ptr()
    model.generate_from(state, max_new_tokens=4, temperature=0)
    assert state.length == 9 and state.caches[0].keys.data_ptr() == pointer, "no reallocation within capacity"
    model.extend(state, prompt(2, 1))
    assert state.capacity == 18, "doubles when full"
    assert not any("keys" in name or "values" in name for name in model.state_dict())


def test_resampler_time_offset_matches_a_longer_sequence():
    resampler = PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, num_time_embeds=4)
    media = torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(resampler(media[:, 1:], time_offset=1), resampler(media)[:, 1:])
    with pytest.raises(ValueError, match="num_time_embeds"):
        resampler(media, time_offset=2)


# -- input validation ------------------------------------------------------------------------------


def test_bad_inputs_raise(model):
    text = prompt(2, 4)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(text, max_new_tokens=2, attention_mask=torch.tensor([[True] * 4, [True, True, True, False]]))
    with pytest.raises(TypeError, match="attention_mask"):
        model.generate(text, max_new_tokens=2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(text, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(text, max_new_tokens=2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(text, max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(text, max_new_tokens=-1)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(text, max_new_tokens=2, eos_token_id=TINY["num_tokens"])
    state = model.prefill(prompt(2, 4, media_at=(0, 1, 2)), images(2, 3))
    with pytest.raises(ValueError, match="batch"):
        model.extend(state, prompt(1, 2))
    with pytest.raises(ValueError, match="perceiver_num_time_embeds"):
        model.extend(state, prompt(2, 2, media_at=(0, 1)), images(2, 2))
    with pytest.raises(TypeError, match="GenerationState"):
        model.extend(text, text)


def test_more_bad_inputs_raise_naming_the_argument(model):
    text = prompt(2, 4, media_at=(0,))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -10"):
        model.prefill(text, max_new_tokens=-10)
    for temperature in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            model.generate(text, max_new_tokens=2, temperature=temperature)
    with pytest.raises(ValueError, match="time_offset must be an integer >= 0, got -1"):
        model.encode_media(text, images(2, 1), time_offset=-1)
    with pytest.raises(ValueError, match="time_offset must be an integer >= 0, got -2"):
        model.perceiver_resampler(torch.randn(2, 1, 4, TINY["dim"]), time_offset=-2)


def test_an_empty_batch_generates_an_empty_batch(model):
    for media in ({}, {"images": images(0, 1)}):
        out = greedy(model, prompt(0, 5, media_at=(0,)), steps=3, **media)
        assert out.shape == (0, 8)
        state = model.prefill(prompt(0, 5, media_at=(0,)), **media)
        assert state.logits.shape == (0, TINY["num_tokens"])
        assert model.generate_from(state, max_new_tokens=2).shape == (0, 2)


def test_decoding_after_an_autocast_prefill_works_and_matches(model):
    text, pixels = prompt(2, 6, media_at=(0,)), images(2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.prefill(text, pixels, max_new_tokens=4)
        expected = model.generate(text, pixels, max_new_tokens=4, temperature=0)
    assert state.caches[0].keys.dtype == torch.bfloat16
    reply = model.generate_from(state, max_new_tokens=4, temperature=0)  # float32, reading bf16 caches
    assert reply.shape == (2, 4)
    # the first token comes from the bf16 prefill's logits in both
    assert torch.equal(reply[:, 0], expected[:, 6])
    model.extend(state, prompt(2, 2))  # and a float32 turn extends the bf16 caches
    assert torch.isfinite(state.logits).all()


def test_media_tokens_of_a_text_only_past_cannot_be_given_new_media(model):
    """A conversation without media reads its <image> tokens as ordinary tokens; media that arrive in a
    later turn cannot be given to them (each item comes in the turn whose text holds its token)."""
    state = model.prefill(prompt(2, 6, media_at=(0,)))  # text alone: allowed, as in text-only training
    with pytest.raises(ValueError, match=r"row 0's earlier turns hold 1 <image> tokens but 0 media items"):
        model.extend(state, prompt(2, 3), images(2, 1))
    # a token for a padded item is refused at once, by the turn that holds it
    first = prompt(2, 6, media_at=(0, 3))
    padded = torch.tensor([[True, True], [True, False]])
    with pytest.raises(ValueError, match=r"row 1 has 2 <image> tokens \(media_token_id=3\) but 1 image"):
        model.prefill(first, images(2, 2), time_mask=padded)
    # without a token for the padded item, row 1's next image is its second item, as alone
    first[1, 3] = 9
    state = model.prefill(first, images(2, 2), time_mask=padded)
    model.extend(state, prompt(2, 3, media_at=(0,)), images(2, 1))
    assert state.items_per_row().tolist() == [3, 2] and state.media_count.tolist() == [3, 2]
