"""Conversations on both models through one implementation (flamingo_pytorch/conversation.py).

Every check runs on FlamingoPaLM and on Flamingo over a transformers Llama, float32, with the gates
open so that the images reach the text. The reference is always a full forward over the whole
conversation so far, of each row alone: its real tokens and its real images, in order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, TINY, open_gates, tiny_image_encoder
from torch import Tensor

from flamingo_pytorch import Flamingo, FlamingoPaLM

transformers = pytest.importorskip("transformers")

MEDIA = TINY["media_token_id"]
PAD = 0


def flamingo_over_llama(lm_class=None) -> Flamingo:
    config = transformers.LlamaConfig(
        vocab_size=TINY["num_tokens"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=PAD,
        initializer_range=0.3,  # sharp attention: a wrong position or a leaked slot shows in the logits
    )
    lm = (lm_class or transformers.LlamaForCausalLM)(config)
    sizes = dict(dim_head=8, heads=4, ff_mult=2, perceiver_depth=1, perceiver_num_latents=4)
    return Flamingo(lm, media_token_id=MEDIA, vision_encoder=tiny_image_encoder(), perceiver_num_time_embeds=4, **sizes)


def flamingo_palm() -> FlamingoPaLM:
    return FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())


@pytest.fixture(params=["FlamingoPaLM", "Flamingo"])
def model(request):
    torch.manual_seed(0)
    model = flamingo_palm() if request.param == "FlamingoPaLM" else flamingo_over_llama()
    open_gates(model, 0.8)
    return model.eval()


def full_logits(model, tokens: Tensor, images: Tensor) -> Tensor:
    """One row's last-position logits from a full forward: tokens (n,), its real images (t, c, H, W)."""
    with torch.no_grad():
        media = images[None] if len(images) else None
        if isinstance(model, FlamingoPaLM):
            return model.decode(tokens[None], model.encode_media(tokens[None], media))[0, -1]
        return model(tokens[None], media).logits[0, -1]


def reference_reply(model, tokens: Tensor, images: Tensor, steps: int) -> Tensor:
    """Greedy decoding of one row by a full forward per token (never the media token) -> (steps,)."""
    reply = []
    for _ in range(steps):
        logits = full_logits(model, torch.cat((tokens, *reply)), images)
        logits[MEDIA] = float("-inf")
        reply.append(logits.argmax()[None])
    return torch.cat(reply)


def pixels(*shape: int) -> Tensor:
    return torch.randn(*shape, 3, IMAGE_SIZE, IMAGE_SIZE)


class Row:
    """One conversation of the batch as it would run alone: its real tokens and images so far."""

    def __init__(self):
        self.tokens, self.images = torch.zeros(0, dtype=torch.long), pixels(0)

    def add(self, text: Tensor, images: Tensor, real: Tensor | None = None) -> None:
        """A turn's text (n,) (``real``: False on padding; default: text != PAD) and real images (t, ...)."""
        self.tokens = torch.cat((self.tokens, text[text != PAD if real is None else real]))
        self.images = torch.cat((self.images, images))


def check_turn(model, state, rows: list[Row], steps: int = 3) -> None:
    """The state's logits and greedy reply equal each row's full forwards; the reply joins the rows."""
    for i, row in enumerate(rows):
        torch.testing.assert_close(state.logits[i], full_logits(model, row.tokens, row.images))
    reply = model.generate_from(state, max_new_tokens=steps, temperature=0)
    for i, row in enumerate(rows):
        assert torch.equal(reply[i], reference_reply(model, row.tokens, row.images, steps))
        row.add(reply[i], pixels(0), torch.ones_like(reply[i], dtype=torch.bool))


def test_conversation_equals_full_forwards(model):
    """Two rows with different image counts; row 0 left-padded, its first turn ending on a padded media
    slot; a second turn with one new image each (row 1 left-padded); a third turn of text alone."""
    rows = [Row(), Row()]
    text = torch.tensor([[PAD, PAD, MEDIA, 10, 11], [MEDIA, 12, MEDIA, 13, 14]])
    images, time_mask = pixels(2, 2), torch.tensor([[True, False], [True, True]])
    state = model.prefill(text, images, time_mask=time_mask, attention_mask=text != PAD)
    rows[0].add(text[0], images[0, :1])
    rows[1].add(text[1], images[1])
    check_turn(model, state, rows)

    text, images = torch.tensor([[MEDIA, 20, 21], [PAD, MEDIA, 22]]), pixels(2, 1)
    model.extend(state, text, images, attention_mask=text != PAD)
    for i in range(2):
        rows[i].add(text[i], images[i])
    check_turn(model, state, rows)

    text = torch.tensor([[30, 31], [32, 33]])
    model.extend(state, text)
    for i in range(2):
        rows[i].add(text[i], pixels(0))
    check_turn(model, state, rows)
    assert state.num_media == 3 and state.items_per_row().tolist() == [2, 3]


def test_images_matter(model):
    """Sanity for the test above: with other images the logits differ, so equality is not vacuous."""
    text = torch.tensor([[MEDIA, 10, 11]])
    seen, other = (model.prefill(text, pixels(1, 1)).logits for _ in range(2))
    assert not torch.allclose(seen, other)


def test_a_turn_encodes_and_projects_only_its_new_images(model):
    encoder = model.img_encoder if isinstance(model, FlamingoPaLM) else model.vision_encoder
    encoded, projected = [], []
    encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    for block in model.gated_cross_attn:
        block.attn.to_kv.register_forward_hook(lambda module, args, out: projected.append(args[0].shape[1]))
    text = torch.tensor([[MEDIA, 10, MEDIA], [MEDIA, 11, MEDIA]])
    state = model.prefill(text, pixels(2, 2))
    model.generate_from(state, max_new_tokens=2, temperature=0)
    assert encoded == [4] and projected == [2] * len(model.gated_cross_attn)  # 2 rows x 2 images; t = 2
    encoded.clear(), projected.clear()
    model.extend(state, torch.tensor([[MEDIA, 12], [MEDIA, 13]]), pixels(2, 1))
    model.generate_from(state, max_new_tokens=2, temperature=0)
    assert encoded == [2] and projected == [1] * len(model.gated_cross_attn)  # only the new image of each row


def test_first_images_after_a_text_only_turn(model):
    """A conversation that began with text alone is recomputed once when its first image arrives."""
    row = Row()
    text = torch.tensor([[10, 11, 12]])
    state = model.prefill(text)
    row.add(text[0], pixels(0))
    check_turn(model, state, [row])
    text, images = torch.tensor([[MEDIA, 13]]), pixels(1, 1)
    model.extend(state, text, images)
    row.add(text[0], images[0])
    check_turn(model, state, [row])


def test_a_rejected_turn_leaves_the_conversation_as_it_was(model):
    text = torch.tensor([[MEDIA, 10, 11]])
    images = pixels(1, 1)
    state = model.prefill(text, images)
    before = state.logits.clone()
    with pytest.raises(ValueError, match="image"):
        model.extend(state, torch.tensor([[MEDIA, MEDIA, 12]]), pixels(1, 1))  # two tokens, one image
    assert torch.equal(state.logits, before) and state.length == 3 and state.num_media == 1
    row = Row()
    row.add(text[0], images[0])
    check_turn(model, state, [row])


def test_streamer_gets_the_conversation_then_each_token(model):
    puts, ends = [], []

    class Recorder:
        def put(self, value: Tensor) -> None:
            puts.append(value)

        def end(self) -> None:
            ends.append(True)

    text = torch.tensor([[MEDIA, 10, 11]])
    state = model.prefill(text, pixels(1, 1))
    reply = model.generate_from(state, max_new_tokens=4, temperature=0, streamer=Recorder())
    assert torch.equal(puts[0], text) and len(ends) == 1
    assert torch.equal(torch.stack(puts[1:], dim=1), reply)


def test_transformers_text_streamer(model):
    """transformers' TextIteratorStreamer, as a chat server uses it: the words arrive as they are made."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(TINY["num_tokens"])}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True)
    state = model.prefill(torch.tensor([[MEDIA, 10, 11]]), pixels(1, 1))
    reply = model.generate_from(state, max_new_tokens=5, temperature=0, streamer=streamer)
    assert "".join(streamer).split() == [f"w{int(i)}" for i in reply[0]]


def test_eos_ends_a_row_and_its_padding_stays_out_of_the_conversation(model):
    text = torch.tensor([[MEDIA, 10, 11], [MEDIA, 12, 13]])
    images = pixels(2, 1)
    free = model.generate_from(model.prefill(text, images), max_new_tokens=4, temperature=0)
    eos = int(free[0, 0])  # row 0 ends at once; row 1 wherever it emits it, if at all
    state = model.prefill(text, images)
    reply = model.generate_from(state, max_new_tokens=4, temperature=0, eos_token_id=eos, pad_token_id=PAD)
    rows = [Row(), Row()]
    for i in range(2):
        ended = (free[i] == eos).cumsum(0) - (free[i] == eos).long() > 0  # (steps,) after the row's first eos
        assert torch.equal(reply[i], free[i].masked_fill(ended, PAD))
        rows[i].add(torch.cat((text[i], reply[i])), images[i], torch.cat((text[i] != PAD, ~ended)))
    text = torch.tensor([[20], [21]])
    model.extend(state, text)
    for i in range(2):
        rows[i].add(text[i], pixels(0))
    check_turn(model, state, rows)


def test_a_model_continues_only_its_own_conversations():
    palm, flamingo = flamingo_palm().eval(), flamingo_over_llama().eval()
    text = torch.tensor([[MEDIA, 10]])
    with pytest.raises(TypeError, match="LanguageModelConversation"):
        flamingo.extend(palm.prefill(text, pixels(1, 1)), text)
    with pytest.raises(TypeError, match="GenerationState"):
        palm.generate_from(flamingo.prefill(text, pixels(1, 1)), max_new_tokens=1)


def test_a_language_model_without_position_ids_holds_conversations_one_at_a_time():
    """Without position_ids a padded row's positions could not be kept: batches refuse, batch 1 is exact."""

    class NoPositions(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                logits_to_keep=logits_to_keep,
            )  # fmt: skip

    torch.manual_seed(0)
    model = flamingo_over_llama(NoPositions)
    open_gates(model, 0.8)
    model.eval()
    with pytest.raises(ValueError, match="position_ids"):
        model.prefill(torch.tensor([[MEDIA, 10], [MEDIA, 11]]), pixels(2, 1))
    row, text, images = Row(), torch.tensor([[MEDIA, 10, 11]]), pixels(1, 1)
    state = model.prefill(text, images)
    row.add(text[0], images[0])
    check_turn(model, state, [row])
    with pytest.raises(ValueError, match="without padding"):
        model.extend(state, torch.tensor([[PAD, 12]]), attention_mask=torch.tensor([[False, True]]))
    text = torch.tensor([[MEDIA, 12]])
    model.extend(state, text, images := pixels(1, 1))
    row.add(text[0], images[0])
    check_turn(model, state, [row])


def test_a_conversation_over_mpt_equals_full_forwards():
    """MPT (OpenFlamingo-3B's language model; ALiBi, no position_ids), one conversation at a time."""
    torch.manual_seed(0)
    config = transformers.MptConfig(vocab_size=TINY["num_tokens"], d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    lm = transformers.MptForCausalLM(config)
    sizes = dict(dim_head=8, heads=4, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=4)
    model = Flamingo(lm, media_token_id=MEDIA, vision_encoder=tiny_image_encoder(), **sizes)
    open_gates(model, 0.8)
    model.eval()
    row, state = Row(), None
    for text in (torch.tensor([[MEDIA, 10, 11]]), torch.tensor([[12, MEDIA, 13]])):
        images = pixels(1, 1)
        state = model.prefill(text, images) if state is None else model.extend(state, text, images)
        row.add(text[0], images[0])
        check_turn(model, state, [row])
