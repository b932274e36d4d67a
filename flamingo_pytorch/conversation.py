"""Conversations: turns of text and new media appended to a model's caches, replies sampled from them.

Shapes:
    b batch, n new tokens, c capacity (slots), j slots filled, t media items, m latents per item,
    h heads, k head width, v vocabulary.

One implementation serves both models. A ``Conversation`` keeps, per row, the tokens so far, which
slots hold real tokens, the position and media count reached, and every gated block's media keys
and values, projected once per item. A turn (``extend``) encodes, resamples and projects only its
own media items and runs only its own tokens; ``sample_loop`` samples a reply token by token and
feeds it back. The one step that differs between the models, running new tokens through the
decoder and its key/value cache, is a subclass's ``run``: ``GenerationState`` (generation.py) for
FlamingoPaLM's PaLM, ``LanguageModelConversation`` (below) for ``Flamingo`` over a transformers model.

Rows advance in lockstep through the slots. A slot that holds padding (left padding of a turn, or
a row that already finished its reply) is masked out, is not a position and is not a media token,
so every row computes what it would compute alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import rearrange
from torch import Tensor, nn

from flamingo_pytorch._validation import check_attention_mask, check_media_tokens, check_same_device, check_text
from flamingo_pytorch.language_model import cache_keyword, cache_of
from flamingo_pytorch.sampling import SamplingSettings, sample_next_token

MEDIA_NAMES = ("images", "image_embeds", "videos")


class Conversation:
    """The state a conversation goes on from (what ``prefill`` returns and ``extend`` appends to).

    Attributes:
        tokens: (b, c) long, the token ids of the conversation so far, slot by slot.
        valid: (b, c) bool, True for slots holding real tokens (False: padding, or not yet written).
        length: slots written so far, the same for every row.
        positions: (b,) long, the position of each row's next real token.
        media_count: (b,) long, media tokens each row has seen.
        media_kv: per gated block, media keys and values (b, h, t, m, k) of all items so far, or None.
        time_mask: (b, t) bool, False for padded items (None before the first item).
        num_media: t, item slots so far.
        logits: (b, v) logits for each row's next token.
    """

    def __init__(self, *, batch: int, capacity: int, device: torch.device):
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.media_count = torch.zeros(batch, dtype=torch.long, device=device)
        self.media_kv: list[tuple[Tensor, Tensor]] | None = None
        self.time_mask: Tensor | None = None
        self.num_media = 0
        self.logits: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def reserve(self, num_new: int) -> None:
        """Make room for ``num_new`` more slots, at least doubling the capacity when it must grow."""
        needed = self.length + num_new
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in ("tokens", "valid"):
            old = getattr(self, name)
            new = old.new_zeros(self.batch, capacity)  # (b, c)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)
        self.grow_caches(capacity)

    def grow_caches(self, capacity: int) -> None:
        """Subclasses with preallocated caches make them ``capacity`` slots long."""

    def restart(self) -> None:
        """Forget every slot (the tokens stay in ``tokens``); subclasses empty their caches too."""
        self.length = 0
        self.positions, self.media_count = torch.zeros_like(self.positions), torch.zeros_like(self.media_count)

    def check_turn(self, attention_mask: Tensor | None) -> None:
        """Subclasses refuse turns their decoder cannot place (before anything changes)."""

    def run(self, model: nn.Module, text: Tensor, positions: Tensor, start: int) -> Tensor:
        """Run new tokens text (b, n) at slots start..start+n-1 (positions (b, n)) through the decoder,
        appending to its caches -> the last position's logits (b, v). Slots, ``valid``, ``media_count``
        and ``media_kv`` already describe the new tokens' context."""
        raise NotImplementedError

    def items_per_row(self) -> Tensor:
        """(b,) long: each row's media items up to its last real one; its next item takes the slot after."""
        if self.num_media == 0:
            return torch.zeros(self.batch, dtype=torch.long, device=self.valid.device)
        slot = torch.arange(1, self.num_media + 1, device=self.valid.device)  # (t,)
        return (self.time_mask * slot).amax(dim=1)

    def add_media(self, new_kv: list[tuple[Tensor, Tensor]], time_mask: Tensor | None) -> None:
        """Store new items' keys and values, (b, h, t, m, k) each per gated block, projected once.

        Row r's new items take the slots right after its last real item, so padded items that
        ended an earlier turn do not shift the row's later items: each row's media tokens read
        its own items in order, as they would if the row were alone.
        """
        b, t = self.batch, new_kv[0][0].shape[2]
        device = self.valid.device
        starts = self.items_per_row()  # (b,)
        last = int(starts.max()) if b else 0  # the most items any row has so far
        total, kept = last + t, min(self.num_media, last)
        rows = torch.arange(b, device=device)[:, None]  # (b, 1)
        slots = starts[:, None] + torch.arange(t, device=device)  # (b, t)
        mask = self.valid.new_zeros(b, total)  # (b, t_total)
        if kept:
            mask[:, :kept] = self.time_mask[:, :kept]
        mask[rows, slots] = time_mask if time_mask is not None else True
        stored = []
        for j, block_kv in enumerate(new_kv):
            old_kv = self.media_kv[j] if self.media_kv is not None else (None, None)
            pair = []
            for old, new in zip(old_kv, block_kv):  # (b, h, t, m, k) each
                both = new.new_zeros(b, new.shape[1], total, *new.shape[3:])  # (b, h, t_total, m, k)
                if kept:
                    both[:, :, :kept] = old[:, :, :kept]
                both[rows, :, slots] = rearrange(new, "b h t m k -> b t h m k")
                pair.append(both)
            stored.append(tuple(pair))
        self.media_kv, self.time_mask, self.num_media = stored, mask, total

    def forward_tokens(self, model: nn.Module, text: Tensor, attention_mask: Tensor | None) -> None:
        """Append text (b, n) (attention_mask (b, n) bool, False = padding) and set ``logits``."""
        real = attention_mask if attention_mask is not None else torch.ones_like(text, dtype=torch.bool)
        self.reserve(text.shape[1])
        start, end = self.length, self.length + text.shape[1]
        self.tokens[:, start:end], self.valid[:, start:end] = text, real
        positions = self.positions[:, None] + real.cumsum(dim=-1) - 1  # (b, n), 0 at each row's first real token
        self.logits = self.run(model, text, positions, start)
        self.length = end
        self.positions = self.positions + real.sum(dim=-1)
        self.media_count = self.media_count + ((text == model.media_token_id) & real).sum(dim=-1)


class LanguageModelConversation(Conversation):
    """A conversation of ``Flamingo`` over a transformers language model: its own key/value cache.

    Attributes (beyond ``Conversation``'s):
        cache: the language model's ``past_key_values`` (None before the first turn).
    """

    def __init__(self, model: nn.Module, *, batch: int, capacity: int, device: torch.device):
        super().__init__(batch=batch, capacity=capacity, device=device)
        self.cache = None
        accepted = inspect.signature(model.lm.forward).parameters
        self.pass_positions = "position_ids" in accepted
        self.keep_last_logits = "logits_to_keep" in accepted
        self.cache_keyword = cache_keyword(model.lm)
        if not self.pass_positions and batch > 1:
            raise ValueError(
                f"{type(model.lm).__name__}.forward takes no position_ids, so the rows of a batch could not each keep "
                f"their own positions across padding: hold its conversations one at a time (batch 1, got {batch})"
            )

    def check_turn(self, attention_mask: Tensor | None) -> None:
        if not self.pass_positions and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a language model whose forward takes no position_ids holds conversations without padding")

    def restart(self) -> None:
        super().restart()
        self.cache = None

    def run(self, model: nn.Module, text: Tensor, positions: Tensor, start: int) -> Tensor:
        end = start + text.shape[1]
        extra = {"logits_to_keep": 1} if self.keep_last_logits else {}
        if self.pass_positions:  # left padding: each row's first real token is position 0
            extra["position_ids"] = positions.clamp(min=0)
        extra[self.cache_keyword] = self.cache
        with model.reading_projected(self.media_kv, self.time_mask, self.media_count):
            out = model.lm(input_ids=text, attention_mask=self.valid[:, :end].long(), use_cache=True, **extra)
        self.cache = cache_of(out)
        return out.logits[:, -1]  # (b, v)


# -- turns ----------------------------------------------------------------------------------------


@contextmanager
def generation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` inside; every submodule's train/eval flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


def check_state(state: object, expected: type) -> None:
    """A model continues only its own kind of conversation (``model.conversation_type``, from its ``prefill``)."""
    if not isinstance(state, expected):
        raise TypeError(f"state must be a {expected.__name__} (from prefill), got {type(state).__name__}")


def extend(
    model: nn.Module,
    state: Conversation,
    text: Tensor,
    media: dict[str, Tensor | None],
    attention_mask: Tensor | None = None,
) -> Conversation:
    """Append text (b, n) and any new media items to ``state``; media items get the next time indices.

    Only the new media are encoded, resampled and projected, and only the new tokens run. On a
    ValueError the state is left as it was.
    """
    check_text(text)
    check_state(state, model.conversation_type)
    if text.shape[0] != state.batch:
        raise ValueError(f"text has batch {text.shape[0]} but the state has batch {state.batch}")
    if text.shape[1] == 0:
        raise ValueError("text must hold at least one token")
    check_same_device("text", text, "the state", state.valid)
    check_attention_mask(attention_mask, text)
    state.check_turn(attention_mask)
    time_mask = media.get("time_mask")
    resampled = encode_new_media(model, state, text, media)  # (b, t, m, e) or None; checks the media
    check_turn_media_tokens(model, state, text, media, resampled, attention_mask)
    if resampled is not None:
        check_tokens_before_new_media(state)
        first_media = state.media_kv is None
        state.add_media(model.media_keys_values(resampled), None if time_mask is None else time_mask.bool())
        if first_media and state.length > 0:
            replay(model, state)
    state.forward_tokens(model, text, attention_mask)
    return state


def check_turn_media_tokens(
    model: nn.Module,
    state: Conversation,
    text: Tensor,
    media: dict,
    resampled: Tensor | None,
    attention_mask: Tensor | None,
) -> None:
    """Raise a ValueError unless, after this turn, each row of the conversation holds one media token per
    real media item, the earlier turns' tokens and items counted with the new ones. A conversation with no
    media at all is not checked: its media tokens are ordinary tokens (as in text-only training)."""
    if resampled is None and state.num_media == 0:
        return
    check_media_tokens(
        text,
        model.media_token_id,
        attention_mask,
        media.get("time_mask"),
        resampled.shape[1] if resampled is not None else 0,
        media_name="videos" if media.get("videos") is not None else "images",
        earlier_tokens=state.media_count,
        earlier_items=state.items_per_row(),
    )


def check_tokens_before_new_media(state: Conversation) -> None:
    """New items take each row's slots after its last real item; raise if the row's earlier turns
    already hold more media tokens than items. (``check_turn_media_tokens`` keeps the two equal once
    a conversation has media, so this is a conversation that so far ran as text alone.)"""
    items, tokens = state.items_per_row(), state.media_count  # (b,) each
    if bool((tokens > items).any()):
        row = int((tokens > items).nonzero()[0, 0])
        raise ValueError(
            f"row {row}'s earlier turns hold {int(tokens[row])} <image> tokens but {int(items[row])} media items "
            "(a conversation without media reads them as ordinary tokens); new media cannot be given to them: "
            "pass each media item in the turn whose text holds its <image> token"
        )


def encode_new_media(model: nn.Module, state: Conversation, text: Tensor, media: dict) -> Tensor | None:
    """Encode and resample a turn's media; each row's items get the time embeddings of their place
    among that row's items (``items_per_row``), so rows with different counts are resampled apart."""
    offsets = state.items_per_row()  # (b,)
    groups = offsets.unique().tolist()
    if len(groups) <= 1 or all(media.get(name) is None for name in MEDIA_NAMES):  # (no groups: an empty batch)
        return model.encode_media(text, **media, time_offset=groups[0] if groups else 0)
    resampled = None
    for offset in groups:
        rows = (offsets == offset).nonzero()[:, 0]
        part = model.encode_media(
            text[rows], **{name: None if v is None else v[rows] for name, v in media.items()}, time_offset=offset
        )  # (b', t, m, e)
        if resampled is None:
            resampled = part.new_zeros(text.shape[0], *part.shape[1:])
        resampled[rows] = part
    return resampled


def replay(model: nn.Module, state: Conversation) -> None:
    """Recompute the cached slots from their tokens: the first media item of a conversation that
    began with text only changes its past, since with media present the gated blocks (their
    feed-forward) run over every token."""
    tokens, valid = state.tokens[:, : state.length].clone(), state.valid[:, : state.length].clone()
    state.restart()
    state.forward_tokens(model, tokens, valid)


# -- replies --------------------------------------------------------------------------------------


def next_tokens(model: nn.Module, logits: Tensor, settings: SamplingSettings) -> Tensor:
    """Sample from logits (b, v) with the media token masked out: the model never emits an image."""
    logits = logits.clone()
    logits[:, model.media_token_id] = float("-inf")
    return sample_next_token(
        logits,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=settings.generator,
    )


def sample_loop(
    model: nn.Module, state: Conversation, settings: SamplingSettings, *, conversation: bool, streamer=None
) -> Tensor:
    """Sample ``max_new_tokens`` tokens per row from ``state`` -> (b, max_new_tokens) long.

    After a row emits ``eos_token_id`` its remaining tokens are ``pad_token_id``; the loop
    stops once every row has finished. In a conversation every sampled token is fed back, so
    the state ends holding them (finished rows as masked padding). Otherwise (``generate``, on a
    state with ``keep_rows``) the last token is never fed, and finished rows are dropped from the
    state to stop spending compute on them. ``streamer`` (transformers' streamer protocol) gets the
    conversation so far (b, j), then each new token (b,), then ``end()``.
    """
    steps, eos, pad = settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id
    out = torch.full((state.batch, steps), pad, dtype=torch.long, device=state.valid.device)
    rows = torch.arange(state.batch, device=out.device)  # the output row of each state row
    done = torch.zeros(state.batch, dtype=torch.bool, device=out.device)
    state.reserve(steps if conversation else max(steps - 1, 0))
    if streamer is not None:
        streamer.put(state.tokens[:, : state.length].cpu())
    for step in range(steps):
        token = next_tokens(model, state.logits, settings).masked_fill(done, pad)  # (b,)
        out[rows, step] = token
        if streamer is not None:
            streamer.put(out[:, step].cpu())
        real = ~done
        if eos is not None:
            done = done | (token == eos)
        last = step == steps - 1 or (eos is not None and bool(done.all()))
        if not conversation:
            if last:
                break
            if eos is not None and bool(done.any()):
                keep = (~done).nonzero()[:, 0]  # (b',)
                state.keep_rows(keep)
                rows, token, done, real = rows[keep], token[keep], done[keep], real[keep]
        state.forward_tokens(model, token[:, None], real[:, None])
        if last:
            break
    if streamer is not None:
        streamer.end()
    return out


def generate_from(model: nn.Module, state: Conversation, settings: SamplingSettings, streamer=None) -> Tensor:
    """Continue a conversation: sample new tokens (b, max_new_tokens) and append them to ``state``."""
    check_state(state, model.conversation_type)
    settings.check(state.logits.shape[-1])
    with generation_mode(model):
        new = sample_loop(model, state, settings, conversation=True, streamer=streamer)
    return new.clone()  # a normal tensor, usable in autograd code


class Conversing:
    """``generate_from``, the same on both models (a mixin of ``FlamingoPaLM`` and ``Flamingo``, whose
    ``prefill`` and ``extend`` start and continue the conversation)."""

    def generate_from(
        self,
        state: Conversation,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        generator: torch.Generator | None = None,
        streamer=None,
    ) -> Tensor:
        """Sample a reply from a conversation ``state`` -> new tokens (b, max_new_tokens).

        The reply is appended to ``state`` so that ``extend`` can continue after it; tokens a row
        emits after ``eos_token_id`` are ``pad_token_id`` and are left out of the conversation.

        Args:
            state: from this model's ``prefill``.
            max_new_tokens: how many tokens to sample per row.
            temperature: softmax temperature; 0 is greedy decoding.
            top_k: sample among the k most likely tokens only.
            top_p: sample among the most likely tokens whose probability reaches top_p.
            eos_token_id: a row that emits it is finished; its later tokens are ``pad_token_id``.
            pad_token_id: filler after ``eos_token_id``.
            generator: a torch.Generator, for reproducible sampling.
            streamer: a transformers streamer (``TextIteratorStreamer``...), or any object with ``put``
                and ``end``: it gets the conversation so far (b, j), then each new token (b,), then ``end()``.
        """
        settings = SamplingSettings(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
        return generate_from(self, state, settings, streamer)
