"""Generation for FlamingoPaLM: key/value caches, media projected once, sampling, conversations.

Shapes:
    b batch, n new tokens, c cache capacity (slots), j slots filled, v vocabulary,
    t media items, m latents per item, h heads, k head width, d model width.

A ``GenerationState`` holds everything a conversation needs to go on without recomputing its
past: one ``KVCache`` per PaLM layer (one key head and one value head, multi-query attention),
the media keys and values of every gated block, projected once per item, and per row the rotary
position and media count reached. Rows advance in lockstep through the cache slots; a slot
that holds padding (left padding of a prompt, or a row that already finished) is masked out of
self-attention and does not count as a position or a media token, so every row computes what
it would compute alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import rearrange
from torch import Tensor, nn

from flamingo_pytorch._validation import check_bool, check_count, check_media_tokens, check_same_device, check_shape
from flamingo_pytorch.cross_attention import media_index
from flamingo_pytorch.immediate_media import ImmediateLayout, immediate_layout
from flamingo_pytorch.palm import KVCache
from flamingo_pytorch.sampling import SamplingSettings, sample_next_token

# -- state -----------------------------------------------------------------------------------------


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``, or None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if device.type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


class GenerationState:
    """What ``FlamingoPaLM.prefill`` returns and ``extend`` / ``generate_from`` carry on from.

    Attributes:
        caches: one ``KVCache`` per PaLM layer, (b, 1, c, k) keys and values.
        tokens: (b, c) long, the token ids of the conversation so far, slot by slot.
        valid: (b, c) bool, True for slots holding real tokens (False: padding, or not yet written).
        length: slots written so far, the same for every row.
        positions: (b,) long, the rotary position of each row's next real token.
        media_count: (b,) long, media tokens each row has seen.
        media_kv: per gated block, media keys and values (b, h, t, m, k) of all items so far, or None.
        time_mask: (b, t) bool, False for padded items (None before the first item).
        num_media: t, item slots so far.
        logits: (b, v) float logits for each row's next token.
    """

    def __init__(self, model: nn.Module, *, batch: int, capacity: int, device: torch.device):
        palm = model.palm
        dim_head = palm.rotary.dim_head
        dtype = autocast_dtype(device) or palm.token_emb.weight.dtype
        self.caches = [
            KVCache(batch=batch, capacity=capacity, dim_head=dim_head, dtype=dtype, device=device) for _ in palm.layers
        ]
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
        for cache in self.caches:
            cache.grow(capacity)
        for name in ("tokens", "valid"):
            old = getattr(self, name)
            new = old.new_zeros(self.batch, capacity)  # (b, c)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def items_per_row(self) -> Tensor:
        """(b,) long: each row's media items up to its last real one; its next item takes the slot after."""
        if self.num_media == 0:
            return torch.zeros(self.batch, dtype=torch.long, device=self.valid.device)
        slot = torch.arange(1, self.num_media + 1, device=self.valid.device)  # (t,)
        return (self.time_mask * slot).amax(dim=1)

    def add_media(self, model: nn.Module, media: Tensor, time_mask: Tensor | None) -> None:
        """Project resampled media (b, t, m, e) once for every gated block and store them.

        Row r's new items take the slots right after its last real item, so padded items that
        ended an earlier turn do not shift the row's later items: each row's media tokens read
        its own items in order, as they would if the row were alone.
        """
        b, t = media.shape[:2]
        starts = self.items_per_row()  # (b,)
        last = int(starts.max()) if b else 0  # the most items any row has so far
        total, kept = last + t, min(self.num_media, last)
        rows = torch.arange(b, device=media.device)[:, None]  # (b, 1)
        slots = starts[:, None] + torch.arange(t, device=media.device)  # (b, t)
        mask = self.valid.new_zeros(b, total)  # (b, t_total)
        if kept:
            mask[:, :kept] = self.time_mask[:, :kept]
        mask[rows, slots] = time_mask if time_mask is not None else True
        stored = []
        for j, block in enumerate(model.gated_cross_attn):
            old_kv = self.media_kv[j] if self.media_kv is not None else (None, None)
            pair = []
            for old, new in zip(old_kv, block.attn.project_media(media)):  # (b, h, t, m, k) each
                both = new.new_zeros(b, new.shape[1], total, *new.shape[3:])  # (b, h, t_total, m, k)
                if kept:
                    both[:, :, :kept] = old[:, :, :kept]
                both[rows, :, slots] = rearrange(new, "b h t m k -> b t h m k")
                pair.append(both)
            stored.append(tuple(pair))
        self.media_kv, self.time_mask, self.num_media = stored, mask, total

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (b',) long, e.g. to stop spending compute on finished rows."""
        for cache in self.caches:
            cache.keep_rows(rows)
        self.tokens, self.valid = self.tokens[rows], self.valid[rows]
        self.positions, self.media_count = self.positions[rows], self.media_count[rows]
        self.logits = self.logits[rows]
        if self.media_kv is not None:
            self.media_kv = [(k[rows], v[rows]) for k, v in self.media_kv]
        if self.time_mask is not None:
            self.time_mask = self.time_mask[rows]


# -- the decoder on new tokens ---------------------------------------------------------------------


def self_attention_mask(valid: Tensor, start: int) -> Tensor:
    """Which slots each new token (slots start..j-1) may read: (b, 1, n, j) bool, True = may attend.

    Causal over real slots; a padding token reads only itself, so its row is never empty.
    """
    j = valid.shape[1]
    query_slot = torch.arange(start, j, device=valid.device)[:, None]  # (n, 1)
    key_slot = torch.arange(j, device=valid.device)[None, :]  # (1, j)
    mask = ((key_slot <= query_slot) & rearrange(valid, "b j -> b 1 j")) | (key_slot == query_slot)  # (b, n, j)
    return rearrange(mask, "b n j -> b 1 n j")


def cross_attend(
    model: nn.Module, state: GenerationState, block_index: int, x: Tensor, index: Tensor, layout: ImmediateLayout | None
) -> Tensor:
    """Run gated block ``block_index`` on x (b, n, d) from the stored media keys and values.

    In immediate mode a one-token step reads only its own item (see ``immediate_media``), so a
    decoding step costs the same however many media items the conversation holds. ``layout``: the
    step's ``immediate_layout``, shared by every block (None: the block works it out, if it needs one).
    """
    k, v = state.media_kv[block_index]  # (b, h, t, m, k) each
    return model.gated_cross_attn[block_index].forward_projected(x, k, v, index, state.time_mask, layout)


def shared_layout(model: nn.Module, state: GenerationState, index: Tensor) -> ImmediateLayout | None:
    """The ``immediate_layout`` of tokens with media index (b, n) over the stored media, made once for
    all gated blocks of a step (they read the same items); None outside immediate mode or without media."""
    if state.media_kv is None or not model.gated_cross_attn[0].attn.only_attend_immediate_media:
        return None
    return immediate_layout(index, state.time_mask, state.media_kv[0][0])  # keys (b, h, t, m, k)


def forward_tokens(model: nn.Module, state: GenerationState, text: Tensor, attention_mask: Tensor | None) -> None:
    """Append text (b, n) to the state (attention_mask (b, n) bool, False = padding); sets ``state.logits``."""
    palm = model.palm
    real = attention_mask if attention_mask is not None else torch.ones_like(text, dtype=torch.bool)
    state.reserve(text.shape[1])
    start, end = state.length, state.length + text.shape[1]
    state.tokens[:, start:end], state.valid[:, start:end] = text, real
    positions = state.positions[:, None] + real.cumsum(dim=-1) - 1  # (b, n), 0 at each row's first real token
    is_media = (text == model.media_token_id) & real  # (b, n)
    index = state.media_count[:, None] + media_index(is_media)  # (b, n)
    x = palm.token_emb(text)  # (b, n, d)
    cos, sin = palm.rotary(positions.clamp(min=0), x.dtype)  # (b, 1, n, k) each
    mask = self_attention_mask(state.valid[:, :end], start)  # (b, 1, n, j)
    layout = shared_layout(model, state, index)
    for i, layer in enumerate(palm.layers):
        if state.media_kv is not None and i % model.cross_attn_every == 0:
            x = cross_attend(model, state, i // model.cross_attn_every, x, index, layout)
        x = layer.forward_cached(x, cos, sin, state.caches[i], start, mask)
    state.length = end
    state.positions = state.positions + real.sum(dim=-1)
    state.media_count = state.media_count + is_media.sum(dim=-1)
    state.logits = palm.head(x[:, -1])  # (b, v)


# -- public entry points (FlamingoPaLM's methods delegate here) ------------------------------------


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


def check_attention_mask(attention_mask: Tensor | None, text: Tensor) -> None:
    if attention_mask is None:
        return
    check_bool("attention_mask", attention_mask)
    check_shape("attention_mask", attention_mask, tuple(text.shape), "(batch, text length)")
    check_same_device("attention_mask", attention_mask, "text", text)
    if text.shape[1] and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be left-padded: the last position of every row must be True")


def extend(
    model: nn.Module,
    state: GenerationState,
    text: Tensor,
    media: dict[str, Tensor | None],
    attention_mask: Tensor | None = None,
) -> GenerationState:
    """Append text (b, n) and any new media items to ``state``; media items get the next time indices."""
    model.check_text(text)
    if not isinstance(state, GenerationState):
        raise TypeError(f"state must be a GenerationState (from prefill), got {type(state).__name__}")
    if text.shape[0] != state.batch:
        raise ValueError(f"text has batch {text.shape[0]} but the state has batch {state.batch}")
    if text.shape[1] == 0:
        raise ValueError("text must hold at least one token")
    check_same_device("text", text, "the state", state.valid)
    check_attention_mask(attention_mask, text)
    time_mask = media.get("time_mask")
    check_turn_media_tokens(model, state, text, media, attention_mask)
    resampled = encode_new_media(model, state, text, media)  # (b, t, m, e) or None
    if resampled is not None:
        check_tokens_before_new_media(state)
        first_media = state.media_kv is None
        state.add_media(model, resampled, time_mask)
        if first_media and state.length > 0:
            replay(model, state)
    forward_tokens(model, state, text, attention_mask)
    return state


def check_turn_media_tokens(
    model: nn.Module, state: GenerationState, text: Tensor, media: dict, attention_mask: Tensor | None
) -> None:
    """Raise a ValueError unless, after this turn, each row of the conversation holds one media token per
    real media item, the earlier turns' tokens and items counted with the new ones. A conversation with no
    media at all is not checked: its media tokens are ordinary tokens (as in text-only training)."""
    given = model.media_given(text, **media)
    if given is None and state.num_media == 0:
        return
    check_media_tokens(
        text,
        model.media_token_id,
        attention_mask,
        media.get("time_mask"),
        given[1].shape[1] if given is not None else 0,
        media_name="videos" if given is not None and given[0] == "videos" else "images",
        earlier_tokens=state.media_count,
        earlier_items=state.items_per_row(),
    )


def check_tokens_before_new_media(state: GenerationState) -> None:
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


def encode_new_media(model: nn.Module, state: GenerationState, text: Tensor, media: dict) -> Tensor | None:
    """Encode and resample a turn's media; each row's items get the time embeddings of their place
    among that row's items (``items_per_row``), so rows with different counts are resampled apart."""
    offsets = state.items_per_row()  # (b,)
    groups = offsets.unique().tolist()
    if len(groups) <= 1 or all(value is None for value in media.values()):  # (no groups: an empty batch)
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


def replay(model: nn.Module, state: GenerationState) -> None:
    """Recompute the cached slots from their tokens: the first media item of a conversation that
    began with text only changes its past, since with media present ``forward`` runs the gated
    blocks (their feed-forward) over every token."""
    tokens, valid = state.tokens[:, : state.length].clone(), state.valid[:, : state.length].clone()
    state.length = 0
    state.positions, state.media_count = torch.zeros_like(state.positions), torch.zeros_like(state.media_count)
    forward_tokens(model, state, tokens, valid)


def prefill(
    model: nn.Module,
    text: Tensor,
    media: dict[str, Tensor | None],
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 0,
) -> GenerationState:
    """A new state holding the prompt, with room for ``max_new_tokens`` more slots."""
    model.check_text(text)
    check_count("max_new_tokens", max_new_tokens)
    state = GenerationState(model, batch=text.shape[0], capacity=text.shape[1] + max_new_tokens, device=text.device)
    return extend(model, state, text, media, attention_mask)


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


def sample_loop(model: nn.Module, state: GenerationState, settings: SamplingSettings, *, conversation: bool) -> Tensor:
    """Sample ``max_new_tokens`` tokens per row from ``state`` -> (b, max_new_tokens) long.

    After a row emits ``eos_token_id`` its remaining tokens are ``pad_token_id``; the loop
    stops once every row has finished. In a conversation every sampled token is fed back, so
    the state ends holding them (finished rows as masked padding). Otherwise the last token is
    never fed, and finished rows are dropped from the state to stop spending compute on them.
    """
    steps, eos, pad = settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id
    out = torch.full((state.batch, steps), pad, dtype=torch.long, device=state.valid.device)
    rows = torch.arange(state.batch, device=out.device)  # the output row of each state row
    done = torch.zeros(state.batch, dtype=torch.bool, device=out.device)
    state.reserve(steps if conversation else max(steps - 1, 0))
    for step in range(steps):
        token = next_tokens(model, state.logits, settings).masked_fill(done, pad)  # (b,)
        out[rows, step] = token
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
        forward_tokens(model, state, token[:, None], real[:, None])
        if last:
            break
    return out


def generate_uncached(
    model: nn.Module, text: Tensor, media: dict, attention_mask: Tensor | None, settings: SamplingSettings
) -> Tensor:
    """Decoding by a full pass over the whole sequence (media encoded again) for every token -> (b, max_new_tokens)."""
    steps, eos, pad = settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id
    out = torch.full((text.shape[0], steps), pad, dtype=torch.long, device=text.device)
    real = attention_mask if attention_mask is not None else torch.ones_like(text, dtype=torch.bool)
    done = torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
    for step in range(steps):
        logits = prefill(model, text, media, real).logits
        out[:, step] = token = next_tokens(model, logits, settings).masked_fill(done, pad)  # (b,)
        text = torch.cat((text, token[:, None]), dim=1)  # (b, n + 1)
        real = torch.cat((real, ~done[:, None]), dim=1)
        if eos is not None:
            done = done | (token == eos)
            if bool(done.all()):
                break
    return out


def generate(
    model: nn.Module,
    text: Tensor,
    media: dict[str, Tensor | None],
    attention_mask: Tensor | None,
    settings: SamplingSettings,
    use_cache: bool = True,
) -> Tensor:
    """The prompt (b, n) followed by ``max_new_tokens`` new tokens: (b, n + max_new_tokens) long."""
    settings.check(model.palm.token_emb.num_embeddings)
    model.check_text(text)
    with generation_mode(model):
        if use_cache:
            state = prefill(model, text, media, attention_mask, max(settings.max_new_tokens - 1, 0))
            new = sample_loop(model, state, settings, conversation=False)
        else:
            check_attention_mask(attention_mask, text)
            new = generate_uncached(model, text, media, attention_mask, settings)
    return torch.cat((text, new.to(text.dtype)), dim=1)


def generate_from(model: nn.Module, state: GenerationState, settings: SamplingSettings) -> Tensor:
    """Continue a conversation: sample new tokens (b, max_new_tokens) and append them to ``state``."""
    settings.check(model.palm.token_emb.num_embeddings)
    if not isinstance(state, GenerationState):
        raise TypeError(f"state must be a GenerationState (from prefill), got {type(state).__name__}")
    with generation_mode(model):
        new = sample_loop(model, state, settings, conversation=True)
    return new.clone()  # a normal tensor, usable in autograd code
