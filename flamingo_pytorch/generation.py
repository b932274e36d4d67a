"""Generation for FlamingoPaLM: its key/value caches, media projected once, ``generate``.

Shapes:
    b batch, n new tokens, c cache capacity (slots), j slots filled, v vocabulary,
    t media items, m latents per item, h heads, k head width, d model width.

A ``GenerationState`` is a ``Conversation`` (conversation.py: turns, new media, sampled replies,
shared with ``Flamingo``) whose decoder step runs the PaLM layers over preallocated caches: one
``KVCache`` per layer (one key head and one value head, multi-query attention). A slot that holds
padding is masked out of self-attention and does not advance the rotary position.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from flamingo_pytorch._validation import check_attention_mask, check_count, check_text
from flamingo_pytorch.conversation import (
    Conversation,
    extend,
    generation_mode,
    next_tokens,
    sample_loop,
)
from flamingo_pytorch.cross_attention import media_index
from flamingo_pytorch.immediate_media import ImmediateLayout, immediate_layout
from flamingo_pytorch.palm import KVCache
from flamingo_pytorch.sampling import SamplingSettings

# -- state -----------------------------------------------------------------------------------------


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``, or None when autocast is off there."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if device.type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


class GenerationState(Conversation):
    """A conversation of ``FlamingoPaLM``: what ``prefill`` returns and ``extend`` / ``generate_from``
    carry on from. The attributes of ``Conversation`` (tokens, valid, positions (rotary), media_count,
    media_kv, time_mask, logits, ...), and:

    Attributes:
        caches: one ``KVCache`` per PaLM layer, (b, 1, c, k) keys and values.
    """

    def __init__(self, model: nn.Module, *, batch: int, capacity: int, device: torch.device):
        super().__init__(batch=batch, capacity=capacity, device=device)
        palm = model.palm
        dim_head = palm.rotary.dim_head
        dtype = autocast_dtype(device) or palm.token_emb.weight.dtype
        self.caches = [
            KVCache(batch=batch, capacity=capacity, dim_head=dim_head, dtype=dtype, device=device) for _ in palm.layers
        ]

    def grow_caches(self, capacity: int) -> None:
        for cache in self.caches:
            cache.grow(capacity)

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

    def run(self, model: nn.Module, text: Tensor, positions: Tensor, start: int) -> Tensor:
        """Text (b, n) through the PaLM layers, each cached step reading the stored media -> logits (b, v)."""
        palm = model.palm
        end = start + text.shape[1]
        is_media = (text == model.media_token_id) & self.valid[:, start:end]  # (b, n)
        index = self.media_count[:, None] + media_index(is_media)  # (b, n)
        x = palm.token_emb(text)  # (b, n, d)
        cos, sin = palm.rotary(positions.clamp(min=0), x.dtype)  # (b, 1, n, k) each
        mask = self_attention_mask(self.valid[:, :end], start)  # (b, 1, n, j)
        layout = shared_layout(model, self, index)
        for i, layer in enumerate(palm.layers):
            if self.media_kv is not None and i % model.cross_attn_every == 0:
                x = cross_attend(model, self, i // model.cross_attn_every, x, index, layout)
            x = layer.forward_cached(x, cos, sin, self.caches[i], start, mask)
        return palm.head(x[:, -1])  # (b, v)


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


# -- public entry points (FlamingoPaLM's methods delegate here) ------------------------------------


def prefill(
    model: nn.Module,
    text: Tensor,
    media: dict[str, Tensor | None],
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 0,
) -> GenerationState:
    """A new state holding the prompt, with room for ``max_new_tokens`` more slots."""
    check_text(text)
    check_count("max_new_tokens", max_new_tokens)
    state = GenerationState(model, batch=text.shape[0], capacity=text.shape[1] + max_new_tokens, device=text.device)
    return extend(model, state, text, media, attention_mask)


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
    check_text(text)
    with generation_mode(model):
        if use_cache:
            state = prefill(model, text, media, attention_mask, max(settings.max_new_tokens - 1, 0))
            new = sample_loop(model, state, settings, conversation=False)
        else:
            check_attention_mask(attention_mask, text)
            new = generate_uncached(model, text, media, attention_mask, settings)
    return torch.cat((text, new.to(text.dtype)), dim=1)
