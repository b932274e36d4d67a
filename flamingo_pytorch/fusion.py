"""Fusing gated cross-attention into someone else's decoder: the per-call media state and the fusion layer.

Shapes:
    b batch, n new tokens, j tokens so far, t media items, m latents per item, h heads, k head width,
    d text width.

A ``FusionLayer`` holds one of the language model's own decoder layers and calls it unchanged,
after its ``GatedCrossAttentionBlock`` has let the hidden states read the media (the paper puts
the cross-attention before the frozen layer). The media reach it through a ``MediaState`` that
the Flamingo wrapper fills for the duration of one call (or one ``generate``) and clears after,
also on error, so the language model's forward signature never changes.

The wrapped model's ``state_dict`` keys are the language model's own (``model.layers.3.mlp...``,
not ``model.layers.3.layer.mlp...``), and its checkpoints load before or after wrapping: the layer's
state-dict hooks drop and restore the ``layer.`` prefix. The gated blocks are not children of the
fusion layer (the Flamingo wrapper owns them), so the language model's ``state_dict`` holds
exactly what it held before.
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flamingo_pytorch import cross_attention
from flamingo_pytorch.cross_attention import GatedCrossAttentionBlock
from flamingo_pytorch.immediate_media import ImmediateLayout, immediate_layout
from flamingo_pytorch.language_model import cache_of, tokens_in_cache
from flamingo_pytorch.perceiver import PerceiverResampler


def resampler_and_blocks(
    num_blocks: int,
    *,
    dim: int,
    media_dim: int,
    dim_head: int,
    heads: int,
    ff_mult: int,
    perceiver_depth: int,
    perceiver_num_latents: int,
    perceiver_num_time_embeds: int | None,
    num_frame_embeds: int | None = None,
    only_attend_immediate_media: bool = True,
) -> tuple[PerceiverResampler, nn.ModuleList]:
    """What Flamingo trains: a Perceiver Resampler over media of width e = ``media_dim``, and
    ``num_blocks`` gated cross-attention blocks from text of width d = ``dim`` to its latents, one
    per fused decoder layer. ``Flamingo``, ``FlamingoPaLM`` and the OpenFlamingo loader's shape
    check all build them here, so they cannot disagree."""
    resampler = PerceiverResampler(
        dim=media_dim,
        depth=perceiver_depth,
        dim_head=dim_head,
        heads=heads,
        num_latents=perceiver_num_latents,
        num_time_embeds=perceiver_num_time_embeds,
        num_frame_embeds=num_frame_embeds,
    )
    blocks = nn.ModuleList(
        GatedCrossAttentionBlock(
            dim=dim,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            only_attend_immediate_media=only_attend_immediate_media,
            media_dim=media_dim,
        )
        for _ in range(num_blocks)
    )
    return resampler, blocks


def compute_in(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    """Mixed precision for what Flamingo trains: float32 weights computing in ``dtype`` when that is
    bfloat16 or float16 (``torch.autocast``, which casts the weights per call), else nothing (an
    enclosing autocast, if any, stays in force)."""
    if dtype in (torch.bfloat16, torch.float16) and torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


@dataclass
class MediaState:
    """What the fusion layers read during one call: the media and each new token's media index.

    Attributes:
        media: (b, t, m, e) resampled media, or None outside a Flamingo call (the layers then pass through).
        time_mask: (b, t) bool, False for padded items, or None.
        index: (b, n) long, the media index of each token of the current forward (set per call).
        counts: (b,) long, media tokens seen before the current forward (for cached decoding).
        projected: per gated block, its keys and values of the media (b, h, t, m, k), made once (or
            given already projected, with ``media`` None: a conversation's items, see ``Flamingo.reading_projected``).
        layout: the current forward's ``immediate_layout``, made by the first block that reads it.
    """

    media: Tensor | None = None
    time_mask: Tensor | None = None
    index: Tensor | None = None
    counts: Tensor | None = None
    projected: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    layout: ImmediateLayout | None = None

    def clear(self) -> None:
        self.media = self.time_mask = self.index = self.counts = self.layout = None
        self.projected = {}

    @property
    def active(self) -> bool:
        """Whether the fusion layers read media now (False: they pass through)."""
        return self.media is not None or bool(self.projected)

    def start_forward(self, index: Tensor) -> None:
        """A new forward of the language model, whose tokens have media index ``index`` (b, n)."""
        self.index, self.layout = index, None

    def keys_values(self, block: GatedCrossAttentionBlock, rows: int) -> tuple[Tensor, Tensor]:
        """The block's media keys and values, projected on first use and repeated to ``rows`` rows
        (generation with beams or several sequences per prompt runs b * r rows)."""
        key = id(block)
        if self.media is None:  # given already projected
            if self.projected[key][0].shape[0] != rows:
                raise ValueError(
                    f"the text has {rows} rows but the projected media have {self.projected[key][0].shape[0]}"
                )
            return self.projected[key]
        if key not in self.projected or self.projected[key][0].shape[0] != rows:
            media, time_mask = self.media, self.time_mask
            if rows != media.shape[0]:
                if rows % media.shape[0]:
                    raise ValueError(f"the text has {rows} rows, not a multiple of the media's {media.shape[0]}")
                repeats = rows // media.shape[0]
                media = media.repeat_interleave(repeats, dim=0)  # (b r, t, m, e)
                self.time_mask = time_mask.repeat_interleave(repeats, dim=0) if time_mask is not None else None
                self.media = media
            self.projected[key] = block.attn.project_media(media)  # (b, h, t, m, k) each
        return self.projected[key]

    def immediate_layout(self, k: Tensor) -> ImmediateLayout | None:
        """The ``immediate_layout`` of this forward's tokens over media keys k (b, h, t, m, k). Every block
        reads the same media items, so the first block works it out and the others reuse it."""
        if self.layout is None and self.index is not None:
            self.layout = immediate_layout(self.index, self.time_mask, k)
        return self.layout


class MediaCounts:
    """Each row's media tokens so far, for language model calls that may continue a key/value cache.

    Two hooks on the language model: before a call, each new token's media index (counting on from
    the tokens already in the cache passed to it) goes to the ``MediaState``; after it, the cache the
    call returns is remembered with its rows' counts (weakly: a dropped cache is forgotten), so that a
    later call continuing that cache, in another forward, counts on from there. The remembered counts
    belong to live caches and are left out when the model is pickled (``torch.save``, ``deepcopy``).

    Args:
        lm: the language model to hook.
        media_token_id: the token that marks a media item.
        state: the media state its fusion layers read.
    """

    def __init__(self, lm: nn.Module, media_token_id: int, state: MediaState):
        self.media_token_id, self.state = media_token_id, state
        self.cache_counts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> (b,) long
        self.after_call: Tensor | None = None
        lm.register_forward_pre_hook(self.index_tokens, with_kwargs=True)
        lm.register_forward_hook(self.remember, with_kwargs=True)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cache_counts": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache_counts = weakref.WeakKeyDictionary()

    def before(self, input_ids: Tensor, lm_kwargs: dict) -> Tensor | None:
        """(b,) long: each row's media tokens before this call's ``input_ids``: none for a fresh call; for a
        call continuing a key/value cache, those counted when the cache was filled (within one
        ``generate`` or conversation turn, or by an earlier call through this model); None where unknown."""
        if tokens_in_cache(lm_kwargs) == 0:
            return input_ids.new_zeros(input_ids.shape[0])
        counts = self.state.counts
        if counts is None:
            try:
                counts = self.cache_counts.get(cache_of(lm_kwargs))
            except TypeError:  # a cache that cannot be weakly referenced (legacy tuples) is never remembered
                counts = None
        if counts is not None and counts.shape[0] != input_ids.shape[0]:  # rows expanded (beams) since
            counts = counts.repeat_interleave(input_ids.shape[0] // counts.shape[0])
        return counts

    def index_tokens(self, lm: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: each new token's media index, counting on from the tokens already in the
        key/value cache when the call continues one."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.after_call = None
        if input_ids is None:
            return
        counts = self.before(input_ids, kwargs)
        if counts is None:
            if self.state.active:
                raise ValueError("the media tokens before this call's key/value cache are unknown (see forward)")
            return
        index = media_index(input_ids, self.media_token_id, kwargs.get("attention_mask"), counts)  # (b, n)
        self.after_call = index[:, -1] if index.shape[1] else counts  # (b,)
        if self.state.active:
            self.state.start_forward(index)
            self.state.counts = self.after_call

    def remember(self, lm: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook: the cache the call returns holds ``after_call`` media tokens per row."""
        cache = cache_of(output) if output is not None else None
        if cache is not None and self.after_call is not None:
            with suppress(TypeError):  # not weakly referenceable: a later call cannot continue it with media
                self.cache_counts[cache] = self.after_call
        self.after_call = None


class FusionLayer(nn.Module):
    """A decoder layer of any language model, preceded by a gated cross-attention block.

    Calls ``block`` on the hidden states (the layer's first argument, or its ``hidden_states``
    keyword) when ``state`` holds media, then the original ``layer`` with everything it was given.
    Attribute lookups the wrapper does not answer go to the layer (models read e.g. a layer's
    ``attention_type``).

    Args:
        layer: the language model's decoder layer, kept as the child ``layer``.
        block: the gated block it reads the media through (owned by the Flamingo wrapper).
        state: the media state shared by all fusion layers of one model.
    """

    def __init__(self, layer: nn.Module, block: GatedCrossAttentionBlock, state: MediaState):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "block", block)  # not a child: the LM's state_dict stays its own
        object.__setattr__(self, "state", state)
        self.register_state_dict_post_hook(drop_layer_prefix)
        self.register_load_state_dict_pre_hook(add_layer_prefix)

    def forward(self, *args, **kwargs):
        state = self.state
        if state.active:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self.read_media(kwargs["hidden_states"])
            else:
                args = (self.read_media(args[0]), *args[1:])
        return self.layer(*args, **kwargs)

    def read_media(self, x: Tensor) -> Tensor:
        """x (b, n, d) -> x with the gated block's cross-attention and feed-forward added, computed in
        x's dtype (see ``compute_in``) and returned in it."""
        state, block = self.state, self.block
        with compute_in(x.dtype, x.device):
            k, v = state.keys_values(block, x.shape[0])
            layout = state.immediate_layout(k) if block.attn.only_attend_immediate_media else None
            return block.forward_projected(x, k, v, state.index, state.time_mask, layout).to(x.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def drop_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: ``{prefix}layer.x`` -> ``{prefix}x``, the wrapped layer's own keys."""
    for key in [key for key in state_dict if key.startswith(prefix + "layer.")]:
        state_dict[prefix + key[len(prefix + "layer.") :]] = state_dict.pop(key)


def add_layer_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre hook: the language model's keys ``{prefix}x`` -> ``{prefix}layer.x``."""
    for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + "layer.")]:
        state_dict[prefix + "layer." + key[len(prefix) :]] = state_dict.pop(key)


def media_index(input_ids: Tensor, media_token_id: int, attention_mask: Tensor | None, counts: Tensor) -> Tensor:
    """Each new token's media index (b, n): the media tokens before the call (``counts`` (b,)) plus
    those among the new tokens up to and including it (padding never counts)."""
    is_media = input_ids == media_token_id
    if attention_mask is not None:
        is_media = is_media & attention_mask[:, -input_ids.shape[1] :].bool()
    return counts[:, None] + cross_attention.media_index(is_media)
