"""Flamingo over any decoder-only language model: wrap its layers, freeze it, train the media path.

Shapes:
    b batch, n text length, t media items, c channels, H x W pixels, p patches per image,
    m latents per media item, d text width, e media width.

``Flamingo(lm, media_token_id=...)`` wraps every ``cross_attn_every``-th decoder layer of ``lm`` in
a ``FusionLayer`` (no class surgery: the layer list is found from the model's structure, or passed
as ``layers``), freezes the language model and the vision encoder, and trains the Perceiver
Resampler and the gated blocks. A forward or a ``generate`` encodes the media once, hands them to
the fusion layers through a ``MediaState``, calls the language model as it is (a Hugging Face
model keeps its own ``generate``: beam search, stopping criteria, streamers, its KV cache), and
clears the state after, also on error. With the gates closed (as built) the logits are the
language model's, exactly.

Precision (see docs/your_own_lm.md, "Precision"): what trains is created on the language model's
device in float32 (master weights; float64 for a float64 model) and computes in the language
model's dtype: under ``torch.autocast`` to bfloat16 or float16 when the model is in one of them.
Media and the gated blocks' outputs come back in the hidden states' dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from flamingo_pytorch import conversation
from flamingo_pytorch._validation import (
    check_count,
    check_media_tokens,
    check_ndim,
    check_positive,
    check_text,
    check_time_mask,
)
from flamingo_pytorch.conversation import Conversing, LanguageModelConversation
from flamingo_pytorch.fusion import FusionLayer, MediaCounts, MediaState, compute_in, resampler_and_blocks
from flamingo_pytorch.language_model import (
    check_input_ids,
    check_media_token_id,
    decoder_width,
    find_decoder_layers,
)
from flamingo_pytorch.tokens import TrainedTokenRows
from flamingo_pytorch.vision import VisionEncoder


class Flamingo(Conversing, nn.Module):
    """A frozen decoder-only language model that reads images through gated cross-attention.

    Args:
        lm: the language model, called as ``lm(input_ids=..., attention_mask=..., **kwargs)``.
        media_token_id: the token (e.g. ``<image>``) that marks where a media item appears.
        vision_encoder: the image encoder, frozen: an open_clip, transformers or timm vision model,
            or any module mapping images (B, c, H, W) to features (B, p, e) (see ``VisionEncoder``);
            optional when ``image_embeds`` are passed instead.
        media_dim: e, the feature width of the vision encoder (default: the encoder's width when it can
            be read off it (open_clip, transformers, timm), else the text width).
        cross_attn_every: a gated block before every this many decoder layers (0, N, 2N, ...).
        cross_attn_layers: the indices of the decoder layers that get a gated block, instead of
            ``cross_attn_every`` (OpenFlamingo's models: N - 1, 2N - 1, ...).
        layers: the ``nn.ModuleList`` of decoder layers, if not found by ``find_decoder_layers``.
        dim_head, heads, ff_mult: sizes of the gated blocks.
        perceiver_depth, perceiver_num_latents, perceiver_num_time_embeds: the resampler's
            layers, latents per item and the most media items per sample (None: no time embeddings).
        only_attend_immediate_media: each token reads only its latest media item.
        train_token_ids: token ids (e.g. ``<image>`` and ``<|endofchunk|>``, see ``add_flamingo_tokens``)
            whose input-embedding rows train; the rest of the embedding stays frozen.
    """

    def __init__(
        self,
        lm: nn.Module,
        *,
        media_token_id: int,
        vision_encoder: nn.Module | None = None,
        media_dim: int | None = None,
        cross_attn_every: int = 1,
        cross_attn_layers: Sequence[int] | None = None,
        layers: nn.ModuleList | None = None,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        perceiver_depth: int = 6,
        perceiver_num_latents: int = 64,
        perceiver_num_time_embeds: int | None = 32,
        only_attend_immediate_media: bool = True,
        train_token_ids: Sequence[int] = (),
    ):
        super().__init__()
        check_positive(cross_attn_every=cross_attn_every)
        layers = find_decoder_layers(lm) if layers is None else layers
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"layers must be an nn.ModuleList, got {type(layers).__name__}")
        if any(isinstance(layer, FusionLayer) for layer in layers):
            raise ValueError("lm is already wrapped by a Flamingo (its layers are FusionLayers): wrap the plain model")
        embedding = lm.get_input_embeddings()
        check_media_token_id(media_token_id, embedding)
        dim = decoder_width(lm)
        self.media_token_id = media_token_id
        self.lm = lm
        self.vision_encoder = VisionEncoder(vision_encoder) if vision_encoder is not None else None
        media_dim = self.media_width(media_dim, dim)
        chosen = range(0, len(layers), cross_attn_every) if cross_attn_layers is None else list(cross_attn_layers)
        if not chosen or sorted(set(chosen)) != list(chosen) or not 0 <= chosen[0] <= chosen[-1] < len(layers):
            raise ValueError(f"cross_attn_layers must be increasing indices in [0, {len(layers)}), got {chosen}")
        self.cross_attn_layers = list(chosen)  # the decoder layer each gated block precedes
        # What trains lives on the LM's device, in float32 or wider (master weights; see "Precision").
        master_dtype = torch.promote_types(embedding.weight.dtype, torch.float32)
        with torch.device(embedding.weight.device):
            resampler, blocks = resampler_and_blocks(
                len(chosen),
                dim=dim,
                media_dim=media_dim,
                dim_head=dim_head,
                heads=heads,
                ff_mult=ff_mult,
                perceiver_depth=perceiver_depth,
                perceiver_num_latents=perceiver_num_latents,
                perceiver_num_time_embeds=perceiver_num_time_embeds,
                only_attend_immediate_media=only_attend_immediate_media,
            )
        self.perceiver_resampler, self.gated_cross_attn = resampler.to(master_dtype), blocks.to(master_dtype)
        self.state = MediaState()
        for block, i in zip(self.gated_cross_attn, chosen):
            layers[i] = FusionLayer(layers[i], block, self.state)
        self.media_counts = MediaCounts(lm, media_token_id, self.state)  # hooks: each token's media index
        self.token_rows = TrainedTokenRows(embedding, train_token_ids).to(master_dtype)
        if train_token_ids:
            lm.get_input_embeddings().register_forward_hook(self.token_rows.replace_rows)
        lm.requires_grad_(False)
        if self.vision_encoder is not None:
            self.vision_encoder.requires_grad_(False).eval()

    def media_width(self, media_dim: int | None, dim: int) -> int:
        """e: ``media_dim``, checked against the vision encoder's width where it can be read; by
        default that width, or the text width d."""
        width = self.vision_encoder.feature_width if self.vision_encoder is not None else None
        if media_dim is not None and width is not None and media_dim != width:
            raise ValueError(f"media_dim={media_dim} but the vision encoder returns features of width {width}")
        return media_dim if media_dim is not None else width if width is not None else dim

    @property
    def working_dtype(self) -> torch.dtype:
        """The dtype the language model computes in (its input embedding's): media and gated blocks follow it."""
        return self.lm.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> Flamingo:
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()  # frozen: its dropout and norm statistics never train
        return self

    def flamingo_parameters(self) -> Iterator[nn.Parameter]:
        """What Flamingo trains: the resampler's and the gated blocks' parameters, the added tokens' rows, and
        any parameter of the frozen language model that trains again (LoRA adapters, ``add_lora``)."""
        yield from self.perceiver_resampler.parameters()
        yield from self.gated_cross_attn.parameters()
        yield from self.token_rows.parameters()
        yield from (param for param in self.lm.parameters() if param.requires_grad)

    def trained_state_dict(self) -> dict[str, Tensor]:
        """What Flamingo trains, by parameter name (what ``save_trained`` writes; see ``trained_weights``)."""
        from flamingo_pytorch.trained_weights import trained_tensors

        return {key: value.detach() for key, value in trained_tensors(self).items()}

    def save_trained(self, path: str) -> None:
        """Write only what Flamingo trains, and its layout, to a safetensors file (``trained_weights.save_trained``)."""
        from flamingo_pytorch.trained_weights import save_trained

        save_trained(self, path)

    def load_trained(self, path: str) -> None:
        """Load ``save_trained``'s file onto this model (a fresh LM and encoder wrapped the same way).

        Raises ValueError naming what differs: the layout (e.g. ``cross_attn_layers``), keys or shapes.
        """
        from flamingo_pytorch.trained_weights import load_trained

        load_trained(self, path)

    def forward(
        self,
        input_ids: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **lm_kwargs,
    ):
        """The language model's output (logits, or its loss with ``labels=``) for text that reads the media.

        Args:
            input_ids: (b, n) token ids; ``media_token_id`` marks each media item's place. With media,
                each row needs one per real item (padding tokens do not count), else a ValueError
                (docs/arguments.md); without, it is an ordinary token. A call continuing a key/value cache
                filled through this Flamingo (``past_key_values``/``cache``, e.g. the next turn of a
                conversation) counts on from the media tokens in the cache: pass all the media so far.
            images: (b, t, c, H, W), encoded by ``vision_encoder``.
            image_embeds: (b, t, p, e) precomputed features, instead of ``images``.
            time_mask: (b, t) bool (or 0/1 integers), True for real media items, False for padding.
            attention_mask: (b, n), 1/True for real tokens, 0/False for padding.
            **lm_kwargs: passed to the language model (``labels``, ``past_key_values``, ...).
        """
        check_input_ids(input_ids)
        media = self.encode_media(input_ids, images, image_embeds, time_mask)
        if media is not None:  # a call continuing a cache counts on from the media tokens already in it
            earlier = self.media_counts.before(input_ids, lm_kwargs)
            if earlier is None:
                raise ValueError(
                    "this call continues a key/value cache that was not filled through this Flamingo, so the "
                    "media tokens before it are unknown: fill the cache with a Flamingo call, or pass the whole text"
                )
            check_media_tokens(
                input_ids,
                self.media_token_id,
                attention_mask,
                time_mask,
                media.shape[1],
                earlier_tokens=earlier,
                earlier_items=torch.zeros_like(earlier),
            )
        with self.media(media, time_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **generate_kwargs,
    ) -> Tensor:
        """The language model's own ``generate`` with the media read by every step; ``media_token_id``
        is never generated. Media are encoded, resampled and projected once per gated block; beam
        search and ``num_return_sequences`` repeat them for their rows. The prompt's ``<image>`` tokens
        must match its real media items, row by row, as in ``forward``."""
        check_input_ids(input_ids)
        media = self.encode_media(input_ids, images, image_embeds, time_mask)
        if media is not None:  # input_ids: the whole prompt, cached part included
            check_media_tokens(input_ids, self.media_token_id, attention_mask, time_mask, media.shape[1])
        suppressed = [*(generate_kwargs.pop("suppress_tokens", None) or []), self.media_token_id]
        with self.media(media, time_mask):
            return self.lm.generate(
                input_ids=input_ids, attention_mask=attention_mask, suppress_tokens=suppressed, **generate_kwargs
            )

    # -- conversations: the same three calls as FlamingoPaLM's (generate_from: ``Conversing``) ------

    conversation_type = LanguageModelConversation

    def prefill(
        self,
        input_ids: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 0,
    ) -> LanguageModelConversation:
        """Start a conversation: run its first turn once and keep the language model's cache.

        Args:
            input_ids: (b, n) token ids, left-padded where rows differ in length.
            images, image_embeds, time_mask: the turn's media, as in ``forward``.
            attention_mask: (b, n) bool, False on the left padding.
            max_new_tokens: slots to reserve for replies (the conversation grows as needed).

        Returns:
            A ``LanguageModelConversation``; its ``logits`` (b, v) are each row's next-token logits.
        """
        check_text(input_ids, "input_ids")
        check_count("max_new_tokens", max_new_tokens)
        b, n = input_ids.shape
        state = LanguageModelConversation(self, batch=b, capacity=n + max_new_tokens, device=input_ids.device)
        return self.extend(
            state, input_ids, images, image_embeds=image_embeds, time_mask=time_mask, attention_mask=attention_mask
        )

    def extend(
        self,
        state: LanguageModelConversation,
        input_ids: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> LanguageModelConversation:
        """Append a turn, input_ids (b, n) and the turn's new media items only, to ``state`` (in place).

        Only the new images are encoded, resampled and projected by each gated block, and only the new
        tokens run, continuing the language model's key/value cache; ``state.logits`` then equals, row
        by row, a full ``forward`` over the whole conversation with that row's real media items in
        order. Rules as in ``FlamingoPaLM.extend`` (docs/generation.md); a ValueError leaves the state as
        it was.
        """
        media = dict(images=images, image_embeds=image_embeds, time_mask=time_mask)
        with conversation.generation_mode(self):
            return conversation.extend(self, state, input_ids, media, attention_mask)

    @contextmanager
    def media(self, media: Tensor | None, time_mask: Tensor | None):
        """The fusion layers read ``media`` (b, t, m, e) inside; the state is cleared after, also on error."""
        self.state.clear()
        self.state.media = media
        self.state.time_mask = time_mask.bool() if time_mask is not None else None  # 0/1 integers allowed
        try:
            yield
        finally:
            self.state.clear()

    @contextmanager
    def reading_projected(
        self, keys_values: list[tuple[Tensor, Tensor]] | None, time_mask: Tensor | None, counts: Tensor
    ):
        """The fusion layers read media keys and values already projected (``media_keys_values``, a
        conversation's items), for a language model call whose rows held ``counts`` (b,) media tokens
        before it; nothing to read when ``keys_values`` is None. The state is cleared after."""
        self.state.clear()
        if keys_values is not None:
            self.state.projected = {id(block): pair for block, pair in zip(self.gated_cross_attn, keys_values)}
            self.state.time_mask, self.state.counts = time_mask, counts
        try:
            yield
        finally:
            self.state.clear()

    def encode_media(
        self,
        input_ids: Tensor,
        images: Tensor | None,
        image_embeds: Tensor | None,
        time_mask: Tensor | None,
        time_offset: int = 0,
    ) -> Tensor | None:
        """Check the media against the text and resample them -> (b, t, m, e), or None without media.
        ``time_offset``: the items each row had before these (a conversation's earlier turns)."""
        if images is not None and image_embeds is not None:
            raise ValueError("pass images or image_embeds, not both")
        given = images if images is not None else image_embeds
        if given is None:
            if time_mask is not None:
                raise ValueError("time_mask was given without images or image_embeds")
            return None
        name = "images" if images is not None else "image_embeds"
        check_ndim(
            name,
            given,
            (5,) if images is not None else (4,),
            "(b, t, c, H, W)" if images is not None else "(b, t, p, e)",
        )
        if given.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{name} has batch {given.shape[0]} but input_ids has batch {input_ids.shape[0]}")
        if time_mask is not None:
            check_time_mask(time_mask, tuple(given.shape[:2]), "input_ids", input_ids)
        features = given if images is None else self.encode_images(images)
        width = self.perceiver_resampler.dim
        if features.shape[-1] != width:
            source = "image_embeds have" if images is None else "the vision encoder returns"
            raise ValueError(
                f"{source} features of width {features.shape[-1]} but Flamingo was built with media_dim={width} "
                f"(default: the text width): pass media_dim={features.shape[-1]} to Flamingo"
            )
        dtype = self.working_dtype
        if not features.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {features.dtype}")
        with compute_in(dtype, features.device):
            return self.perceiver_resampler(features.to(dtype), time_offset=time_offset)  # (b, t, m, e)

    def media_keys_values(self, media: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Resampled media (b, t, m, e) -> each gated block's keys and values, (b, h, t, m, k) each."""
        with compute_in(self.working_dtype, media.device):
            return [block.attn.project_media(media) for block in self.gated_cross_attn]

    def encode_images(self, images: Tensor) -> Tensor:
        """Run the frozen vision encoder on (b, t, c, H, W) -> (b, t, p, e)."""
        if self.vision_encoder is None:
            raise ValueError("images need a vision_encoder: pass vision_encoder= to Flamingo, or pass image_embeds")
        with torch.no_grad():
            features = self.vision_encoder(images.flatten(0, 1))  # (b t, p, e)
        return features.unflatten(0, images.shape[:2])  # (b, t, p, e)
