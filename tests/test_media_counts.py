"""Media tokens and media items must match one to one (the k-th <image> token reads the k-th item):
a mismatch is a ValueError naming the row and both counts, in Flamingo and FlamingoPaLM, in forward,
generate and conversations. The legitimate cases (padded items, left padding, text alone, a cached
continuation, a conversation's later turns) still run."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from conftest import IMAGE_SIZE, TINY, full_logits, open_gates

from flamingo_pytorch import Flamingo

transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

MEDIA, VOCAB, WIDTH = TINY["media_token_id"], 64, 32
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)


def mismatch(row: int, tokens: int, items: int, noun: str = "images") -> str:
    noun = noun.removesuffix("s") if items == 1 else noun
    return rf"row {row} has {tokens} <image> tokens \(media_token_id={MEDIA}\) but {items} {noun}"


def text_with_media(rows: list[list[int]], length: int = 8) -> torch.Tensor:
    """(b, length) random words, with a media token at each row's listed positions."""
    text = torch.randint(4, VOCAB, (len(rows), length))
    for i, positions in enumerate(rows):
        text[i, positions] = MEDIA
    return text


@pytest.fixture
def flamingo() -> Flamingo:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Flamingo(
        transformers.LlamaForCausalLM(config),
        media_token_id=MEDIA,
        dim_head=8,
        heads=4,
        perceiver_depth=1,
        perceiver_num_latents=4,
        perceiver_num_time_embeds=4,
    ).eval()
    open_gates(model, 0.8)
    return model


def continuing(model: Flamingo, output) -> dict:
    """The keyword that hands a call's key/value cache to the next call: ``cache`` since transformers 5.x."""
    name = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"
    return {name: output.past_key_values}


def embeds(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, 5, WIDTH)


# -- Flamingo over a transformers model ------------------------------------------------------------


@pytest.mark.parametrize(
    ("row1", "tokens"),
    [([1, 4, 6], 3), ([1], 1), ([], 0)],
    ids=["too-many-tokens", "too-few-tokens", "no-token"],
)
def test_flamingo_forward_and_generate_refuse_a_mismatch(flamingo, row1, tokens):
    text, features = text_with_media([[1, 4], row1]), embeds(2, 2)
    with torch.no_grad(), pytest.raises(ValueError, match=mismatch(1, tokens, 2)):
        flamingo(text, image_embeds=features)
    with pytest.raises(ValueError, match=mismatch(1, tokens, 2)):
        flamingo.generate(text, image_embeds=features, **GREEDY)


def test_flamingo_beam_search_names_the_prompt_row(flamingo):
    """The check runs on the prompt rows, before beam search repeats them."""
    beams = dict(GREEDY, num_beams=2, num_return_sequences=2)
    text, features = text_with_media([[1, 4], [1, 4]]), embeds(2, 2)
    assert flamingo.generate(text, image_embeds=features, **beams).shape == (4, 11)
    text[1, 4] = 7
    with pytest.raises(ValueError, match=mismatch(1, 1, 2)):
        flamingo.generate(text, image_embeds=features, **beams)


def test_flamingo_padded_items_and_left_padding_do_not_count(flamingo):
    """Row 1: one image, its second item padded (time_mask False), left-padded with the media token
    itself (attention_mask 0). It runs, and reads what it reads alone."""
    row0, row1 = text_with_media([[1, 4]]), text_with_media([[2]], length=5)
    text = torch.cat((row0, torch.cat((torch.full((1, 3), MEDIA), row1), dim=1)))  # (2, 8)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, :3] = 0
    features, time_mask = embeds(2, 2), torch.tensor([[True, True], [True, False]])
    media = dict(image_embeds=features, time_mask=time_mask, attention_mask=attention_mask)
    together = flamingo.generate(text, **media, **GREEDY)
    alone = flamingo.generate(row1, image_embeds=features[1:, :1], **GREEDY)
    assert torch.equal(together[1, 8:], alone[0, 5:])
    with torch.no_grad():
        flamingo(text, **media)
    # a token for the padded item, or a real item after a padded one, is refused
    with torch.no_grad(), pytest.raises(ValueError, match=mismatch(1, 2, 1, "images")):
        flamingo(text_with_media([[1, 4], [1, 4]]), image_embeds=features, time_mask=time_mask)
    with torch.no_grad(), pytest.raises(ValueError, match=r"row 1 of time_mask is \[False, True\]"):
        flamingo(
            text_with_media([[1], [4]]), image_embeds=features, time_mask=torch.tensor([[True, False], [False, True]])
        )


def test_flamingo_text_alone_and_a_truncated_last_image(flamingo):
    """Without media, <image> tokens are ordinary tokens: the language model alone. A document whose
    last image lost its <image> to truncation runs once that item is marked padding."""
    text = text_with_media([[1, 4], [2]])
    with torch.no_grad():
        assert torch.equal(flamingo(text).logits, flamingo.lm(input_ids=text).logits)
        features = embeds(2, 3)
        with pytest.raises(ValueError, match=mismatch(0, 2, 3)):
            flamingo(text, image_embeds=features)
        time_mask = torch.tensor([[True, True, False], [True, False, False]])
        cut = flamingo(text, image_embeds=features, time_mask=time_mask).logits
        dropped = flamingo(text, image_embeds=features[:, :2], time_mask=time_mask[:, :2]).logits
    torch.testing.assert_close(cut, dropped)  # the padded last image changes nothing (float32 defaults)
    assert flamingo.generate(text, **GREEDY).shape == (2, 11)


def test_flamingo_forward_continuing_a_cache_is_not_recounted(flamingo):
    """The new tokens of a cached step hold no <image>: the images were counted with the prompt."""
    text, features = text_with_media([[1, 4], [1, 4]], length=7), embeds(2, 2)
    with torch.no_grad():
        prompt = flamingo(text[:, :6], image_embeds=features, use_cache=True)
        step = flamingo(text[:, 6:], image_embeds=features, **continuing(flamingo, prompt))
    assert step.logits.shape == (2, 1, VOCAB)


def test_flamingo_forward_continuing_a_cache_reads_the_latest_image(flamingo):
    text, features = text_with_media([[1, 4], [1, 4]], length=7), embeds(2, 2)
    with torch.no_grad():
        full = flamingo(text, image_embeds=features).logits[:, -1]
        prompt = flamingo(text[:, :6], image_embeds=features, use_cache=True)
        step = flamingo(text[:, 6:], image_embeds=features, **continuing(flamingo, prompt)).logits[:, -1]
    torch.testing.assert_close(step, full)  # float32 defaults, as tests/test_generation.py compares cached logits


def test_a_turn_continuing_a_cache_with_a_new_image_equals_the_full_forward(flamingo):
    """A conversation over a transformers LM: the second call adds an <image> and its image, and its
    tokens read it, counting on from the two <image> tokens already in the cache."""
    text, features = text_with_media([[1, 4, 8], [0, 2, 9]], length=11), embeds(2, 3)
    with torch.no_grad():
        full = flamingo(text, image_embeds=features).logits[:, 7:]
        first = flamingo(text[:, :7], image_embeds=features[:, :2], use_cache=True)
        turn = flamingo(text[:, 7:], image_embeds=features, **continuing(flamingo, first)).logits
    torch.testing.assert_close(turn, full)  # float32 defaults, as tests/test_generation.py compares cached logits
    with torch.no_grad(), pytest.raises(ValueError, match=mismatch(0, 2, 3)):
        second = flamingo(text[:, :7], image_embeds=features[:, :2], use_cache=True)
        flamingo(torch.full((2, 1), 5), image_embeds=features, **continuing(flamingo, second))  # no 3rd <image>


def test_continuing_a_cache_this_flamingo_did_not_fill_raises(flamingo):
    text, features = text_with_media([[1, 4], [1, 4]], length=7), embeds(2, 2)
    with torch.no_grad():
        prompt = flamingo(text[:, :6], image_embeds=features, use_cache=True)
        ((name, cache),) = continuing(flamingo, prompt).items()
        with pytest.raises(ValueError, match="not filled through this Flamingo"):
            flamingo(text[:, 6:], image_embeds=features, **{name: copy.deepcopy(cache)})


def test_a_flamingo_pickles_and_its_copy_counts_caches_of_its_own(flamingo):
    text, features = text_with_media([[1, 4], [1, 4]], length=7), embeds(2, 2)
    buffer = io.BytesIO()
    with torch.no_grad():
        prompt = flamingo(text[:, :6], image_embeds=features, use_cache=True)
        torch.save(flamingo, buffer)
        restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        assert torch.equal(restored(text, image_embeds=features).logits, flamingo(text, image_embeds=features).logits)
        with pytest.raises(ValueError, match="not filled through this Flamingo"):
            restored(text[:, 6:], image_embeds=features, **continuing(restored, prompt))


# -- FlamingoPaLM ----------------------------------------------------------------------------------


def images(b: int, t: int) -> torch.Tensor:
    return torch.randn(b, t, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize(("row1", "tokens"), [([1, 4, 6], 3), ([1], 1), ([], 0)], ids=["too-many", "too-few", "none"])
def test_flamingo_palm_forward_and_generate_refuse_a_mismatch(tiny_model, row1, tokens):
    """generate refuses every mismatch. forward refuses tokens without an item, but only warns about items
    that no token reads: the original README trains on random text beside two images per row, and that
    call must keep running; its logits are then those of the images that tokens do read."""
    text, pixels = text_with_media([[1, 4], row1]), images(2, 2)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=mismatch(1, tokens, 2)):
            tiny_model.generate(text, pixels, max_new_tokens=2, use_cache=use_cache)
    videos = torch.randn(2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    if tokens > 2:
        with pytest.raises(ValueError, match=mismatch(1, tokens, 2)):
            tiny_model(text, pixels)
        with pytest.raises(ValueError, match=mismatch(1, tokens, 2, "videos")):
            tiny_model(text, videos=videos)
        return
    unread = rf"row 1 has {tokens} <image> tokens \(media_token_id={MEDIA}\) but 2 real images: the items after"
    open_gates(tiny_model)
    with torch.no_grad(), pytest.warns(UserWarning, match=unread):
        logits = tiny_model(text, pixels)
    with torch.no_grad():  # the same as marking the unread items padding
        time_mask = torch.tensor([[True, True], [i < tokens for i in range(2)]])
        torch.testing.assert_close(logits, tiny_model(text, pixels, time_mask=time_mask), rtol=0, atol=0)
    with torch.no_grad(), pytest.warns(UserWarning, match=unread.replace("images", "videos")):
        tiny_model(text, videos=videos)


def test_flamingo_palm_padding_text_alone_and_left_padding(tiny_model):
    text, pixels = text_with_media([[1, 4], [2]]), images(2, 2)
    time_mask = torch.tensor([[True, True], [True, False]])
    tiny_model(text, pixels, time_mask=time_mask)
    assert torch.equal(tiny_model(text), tiny_model.palm(text))  # text alone (stage 1): ordinary tokens
    with pytest.raises(ValueError, match=r"row 1 of time_mask is \[False, True\]"):
        tiny_model(text_with_media([[4, 6], [2]]), pixels, time_mask=time_mask.flip(1))
    # left padding with the media token itself never counts (generate's attention_mask)
    padded = torch.cat((torch.full((2, 2), MEDIA), text), dim=1)
    attention_mask = torch.ones(2, 10, dtype=torch.bool)
    attention_mask[:, :2] = False
    out = tiny_model.generate(padded, pixels, time_mask=time_mask, attention_mask=attention_mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=mismatch(0, 4, 2)):
        tiny_model.generate(padded, pixels, time_mask=time_mask, max_new_tokens=2)
    assert out.shape == (2, 12)


def test_flamingo_palm_conversation_counts_over_all_turns(tiny_model):
    """A turn's new images are counted with the earlier turns' tokens and items; a refused turn leaves
    the conversation as it was, and the right turn then gives a full forward's logits."""
    open_gates(tiny_model, 0.8)
    first, pixels = text_with_media([[1], [1]], length=4), images(2, 2)
    state = tiny_model.prefill(first, pixels[:, :1])
    reply = tiny_model.generate_from(state, max_new_tokens=2, temperature=0)
    turn = text_with_media([[0], [0]], length=3)
    logits, length = state.logits.clone(), state.length
    with pytest.raises(ValueError, match=mismatch(0, 2, 1) + " in the conversation so far"):
        tiny_model.extend(state, turn)  # its <image> without an image
    with pytest.raises(ValueError, match=mismatch(0, 1, 2) + " in the conversation so far"):
        tiny_model.extend(state, turn[:, 1:], pixels[:, 1:])  # an image without its <image>
    assert torch.equal(state.logits, logits) and state.length == length and state.num_media == 1
    tiny_model.extend(state, turn, pixels[:, 1:])
    conversation = torch.cat((first, reply, turn), dim=1)
    torch.testing.assert_close(state.logits, full_logits(tiny_model, conversation, images=pixels))
    assert tiny_model.generate_from(state, max_new_tokens=2, temperature=0).shape == (2, 2)
