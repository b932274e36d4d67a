"""FlamingoPaLM: a frozen image encoder, a Perceiver Resampler, and gated cross-attention
blocks interleaved with a PaLM decoder.

Shapes:
    b batch, n text length, t media items, f video frames, c channels, H x W pixels,
    p patches per image, m latents per media item, d model width, e media width, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from flamingo_pytorch import conversation, generation
from flamingo_pytorch._validation import (
    check_count,
    check_media_tokens,
    check_ndim,
    check_same_device,
    check_text,
    check_time_mask,
)
from flamingo_pytorch.checkpointing import run_maybe_checkpointed
from flamingo_pytorch.conversation import Conversing
from flamingo_pytorch.fusion import resampler_and_blocks
from flamingo_pytorch.generation import GenerationState
from flamingo_pytorch.palm import PaLM
from flamingo_pytorch.sampling import SamplingSettings
from flamingo_pytorch.vision import patch_features


class FlamingoPaLM(Conversing, nn.Module):
    """PaLM with Flamingo's visual side.

    A ``GatedCrossAttentionBlock`` sits before decoder layers 0, N, 2N, ... (N = ``cross_attn_every``),
    so each chosen frozen layer reads the media first, as in the paper. Passing media to ``forward``
    freezes the language model and trains only the resampler and the gated blocks; text-only calls
    train the language model. The image encoder is never trained and always stays in eval mode.

    Args:
        num_tokens: vocabulary size.
        dim: model width d.
        depth: number of PaLM layers.
        dim_head: width of each attention head.
        heads: number of attention heads.
        ff_mult: feed-forward widening factor.
        media_token_id: the token that marks where a media item appears in the text.
        cross_attn_every: a gated cross-attention block before every this many layers.
        img_encoder: module mapping images (B, c, H, W) to features (B, p, e); optional when
            ``image_embeds`` are passed instead.
        perceiver_num_latents: latents per media item m.
        perceiver_depth: Perceiver Resampler depth.
        perceiver_num_time_embeds: the most media items per sample (None: no time embeddings, no limit).
        max_video_frames: the most frames per video; None disables ``videos``.
        only_attend_immediate_media: each token reads only the most recent media item.
        media_dim: image feature width e, when it differs from ``dim``.
        checkpoint_activations: in training, recompute the activations of each PaLM layer and
            gated block in backward instead of storing them (less memory, more compute).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        media_token_id: int = 3,
        cross_attn_every: int = 3,
        img_encoder: nn.Module | None = None,
        perceiver_num_latents: int = 64,
        perceiver_depth: int = 2,
        perceiver_num_time_embeds: int | None = 4,
        max_video_frames: int | None = None,
        only_attend_immediate_media: bool = True,
        media_dim: int | None = None,
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        if cross_attn_every < 1:
            raise ValueError(f"cross_attn_every must be >= 1, got {cross_attn_every}")
        if not 0 <= media_token_id < num_tokens:
            raise ValueError(f"media_token_id must be in [0, num_tokens={num_tokens}), got {media_token_id}")
        media_dim = dim if media_dim is None else media_dim
        self.media_token_id = media_token_id
        self.cross_attn_every = cross_attn_every
        self.palm = PaLM(
            num_tokens=num_tokens,
            dim=dim,
            depth=depth,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            checkpoint_activations=checkpoint_activations,
        )
        self.perceiver_resampler, self.gated_cross_attn = resampler_and_blocks(
            len(range(0, depth, cross_attn_every)),  # a block before layers 0, N, 2N, ...
            dim=dim,
            media_dim=media_dim,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            perceiver_depth=perceiver_depth,
            perceiver_num_latents=perceiver_num_latents,
            perceiver_num_time_embeds=perceiver_num_time_embeds,
            num_frame_embeds=max_video_frames,
            only_attend_immediate_media=only_attend_immediate_media,
        )
        self.flamingo_mode = False  # whether the language model is frozen (see set_flamingo_mode)
        self.frozen_by_flamingo_mode: list[str] = []  # names of the palm parameters that freezing froze
        self.img_encoder = img_encoder
        if img_encoder is not None:
            img_encoder.requires_grad_(False)
            img_encoder.eval()

    conversation_type = GenerationState  # what prefill returns and extend / generate_from continue

    def train(self, mode: bool = True) -> FlamingoPaLM:
        super().train(mode)
        if self.img_encoder is not None:
            self.img_encoder.eval()  # frozen, so its dropout and norm statistics never switch to training
        return self

    def flamingo_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained in flamingo mode: the resampler's and the gated blocks'.

        Build the optimizer for Flamingo training from these alone: an optimizer that also holds
        the frozen weights would still move them through weight decay and momentum.
        """
        yield from self.perceiver_resampler.parameters()
        yield from self.gated_cross_attn.parameters()

    def set_flamingo_mode(self, flamingo: bool) -> None:
        """Freeze the language model (True) or give it back the trainable state it had (False).

        ``forward`` calls this itself whenever gradients are enabled: with media, the language model
        is frozen and only ``flamingo_parameters()`` train; with text alone, the language model
        trains again. Only a change of mode does anything, and it only touches the language model:
        switching back unfreezes exactly the parameters that freezing froze, so a
        ``requires_grad_(False)`` you set yourself (on the resampler, a gated block, or part of the
        language model) always stays. Under ``torch.no_grad()`` a forward changes nothing.
        """
        if flamingo == self.flamingo_mode:
            return
        params = dict(self.palm.named_parameters())
        if flamingo:
            self.frozen_by_flamingo_mode = [name for name, param in params.items() if param.requires_grad]
            for name in self.frozen_by_flamingo_mode:
                params[name].requires_grad_(False)
        else:
            for name in self.frozen_by_flamingo_mode:
                params[name].requires_grad_(True)
            self.frozen_by_flamingo_mode = []
        self.flamingo_mode = flamingo

    def forward(
        self,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits for text, reading the media wherever ``media_token_id`` appears.

        Args:
            text: (b, n) token ids.
            images: (b, t, c, H, W), encoded by ``img_encoder``.
            image_embeds: (b, t, p, e) precomputed image features (skip the encoder).
            videos: (b, t, f, c, H, W), encoded frame by frame (needs ``max_video_frames``).
            time_mask: (b, t) bool, True for real media items, False for padding (after the real ones).
            labels: (b, n) target token ids (-100 = none), e.g. ``text`` shifted left by one.
                When given, the mean cross-entropy is returned instead of the logits, computed
                without ever holding the full (b, n, num_tokens) logits (less peak memory).

        Returns:
            (b, n, num_tokens) logits, or the scalar loss when ``labels`` are given.

        Raises:
            ValueError: when media are given and a row holds more media tokens than real media items
                (the k-th token reads the k-th item), or its padded items come before real ones. A row
                with fewer tokens than items warns (UserWarning): the later items are read by no token.
                Without media, media tokens are ordinary tokens (text-only training).
        """
        check_text(text)
        given = self.media_given(text, images, image_embeds=image_embeds, videos=videos, time_mask=time_mask)
        if given is not None:  # (text alone, as in stage 1: media tokens are ordinary tokens)
            noun = "videos" if given[0] == "videos" else "images"
            # Images that no token reads only warn here, so that the original README's call (random
            # text beside two images) runs as written; generate, prefill and extend raise.
            check_media_tokens(
                text, self.media_token_id, None, time_mask, given[1].shape[1], media_name=noun, unread_items="warn"
            )
        media = self.resample(given)
        if torch.is_grad_enabled():  # evaluation under no_grad leaves the training setup alone
            self.set_flamingo_mode(media is not None)
        return self.decode(text, media, time_mask, labels)

    def encode_media(
        self,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        time_offset: int = 0,
    ) -> Tensor | None:
        """Check the media against ``text`` and resample them: -> (b, t, m, e) latents, or None.

        ``time_offset`` counts the items that came before these ones (see ``extend``). The media
        tokens of ``text`` are not counted here: ``forward`` and ``extend`` count them.
        """
        given = self.media_given(
            text, images, image_embeds=image_embeds, videos=videos, time_mask=time_mask, time_offset=time_offset
        )
        return self.resample(given, time_offset)

    def resample(self, given: tuple[str, Tensor] | None, time_offset: int = 0) -> Tensor | None:
        """Encode (unless ``image_embeds``) and resample checked media -> (b, t, m, e) latents, or None."""
        if given is None:
            return None
        name, media = given
        features = media if name == "image_embeds" else self.encode_pixels(name, media)
        return self.perceiver_resampler(features, time_offset=time_offset)  # (b, t, m, e)

    def media_given(
        self,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        time_offset: int = 0,
    ) -> tuple[str, Tensor] | None:
        """Check the media's shapes, devices and batch against ``text`` -> (argument name, tensor), or None."""
        candidates = (("images", images), ("image_embeds", image_embeds), ("videos", videos))
        given = {name: value for name, value in candidates if value is not None}
        if len(given) > 1:
            raise ValueError(f"pass at most one of images, image_embeds and videos, got {' and '.join(given)}")
        if not given:
            if time_mask is not None:
                raise ValueError("time_mask was given without images, image_embeds or videos")
            return None
        check_count("time_offset", time_offset)
        ((name, media),) = given.items()
        layout = {"images": "(b, t, c, H, W)", "image_embeds": "(b, t, p, e)", "videos": "(b, t, f, c, H, W)"}[name]
        check_ndim(name, media, ({"images": 5, "image_embeds": 4, "videos": 6}[name],), layout)
        check_same_device(name, media, "text", text)
        b, t = media.shape[:2]
        if b != text.shape[0]:
            raise ValueError(f"{name} has batch {b} but text has batch {text.shape[0]}")
        limit = self.perceiver_resampler.num_time_embeds
        if limit is not None and time_offset + t > limit:
            earlier = f" after {time_offset} earlier ones" if time_offset else ""
            raise ValueError(f"{name} has {t} media items per sample{earlier} but perceiver_num_time_embeds={limit}")
        if time_mask is not None:
            check_time_mask(time_mask, (b, t), "text", text)
        if name == "videos" and self.perceiver_resampler.frame_embeds is None:
            raise ValueError("videos need a model built with max_video_frames")
        return name, media

    def media_keys_values(self, media: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Resampled media (b, t, m, e) -> each gated block's keys and values, (b, h, t, m, k) each."""
        return [block.attn.project_media(media) for block in self.gated_cross_attn]

    def encode_pixels(self, name: str, pixels: Tensor) -> Tensor:
        """Run the frozen img_encoder on (b, t, [f,] c, H, W) -> (b, t, [f,] p, e)."""
        if self.img_encoder is None:
            raise ValueError(f"{name} need an img_encoder: pass img_encoder= to FlamingoPaLM, or pass image_embeds")
        leading = pixels.shape[:-3]  # (b, t) or (b, t, f)
        with torch.no_grad():
            features = patch_features(self.img_encoder(pixels.reshape(-1, *pixels.shape[-3:])))  # (b t [f], p, e)
        return features.reshape(*leading, *features.shape[1:])

    def decode(
        self, text: Tensor, media: Tensor | None, time_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """Run the decoder with gated cross-attention to resampled media (b, t, m, e) -> logits or loss."""
        x = self.palm.token_emb(text)  # (b, n, d)
        cos, sin = self.palm.rotary(torch.arange(text.shape[1], device=text.device), x.dtype)
        media_locations = text == self.media_token_id  # (b, n)
        recompute = self.palm.checkpoint_activations and self.training
        for i, layer in enumerate(self.palm.layers):
            if media is not None and i % self.cross_attn_every == 0:
                block = self.gated_cross_attn[i // self.cross_attn_every]
                x = run_maybe_checkpointed(block, x, media, media_locations, time_mask, enabled=recompute)
            x = run_maybe_checkpointed(layer, x, cos, sin, enabled=recompute)
        return self.palm.head(x, labels)

    # -- generation: thin wrappers over flamingo_pytorch.generation ---------------------------------

    def generate(
        self,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue each prompt by ``max_new_tokens`` tokens, with key/value caches.

        The media are encoded, resampled and projected to keys/values once; each new token then
        costs one cached step. The media token is never sampled. Runs under
        ``torch.inference_mode()``, restores train/eval mode, and leaves ``requires_grad`` alone.

        Args:
            text: (b, n) prompt token ids, left-padded when rows differ in length.
            images, image_embeds, videos, time_mask: the prompt's media, as in ``forward`` (each row's
                real items matching its media tokens outside the padding, one to one).
            attention_mask: (b, n) bool, False on the left padding of shorter prompts. Padding
                is invisible: each row generates what it would generate alone.
            max_new_tokens: how many tokens to add.
            temperature: softmax temperature; 0 is greedy decoding.
            top_k: sample among the k most likely tokens only.
            top_p: sample among the most likely tokens whose probability reaches top_p.
            eos_token_id: a row that emits it is finished; its later tokens are ``pad_token_id``.
            pad_token_id: filler after ``eos_token_id``.
            use_cache: False re-runs the whole model on the whole sequence for every token.
            generator: a torch.Generator, for reproducible sampling.

        Returns:
            (b, n + max_new_tokens) long: the prompt, then the new tokens.
        """
        media = dict(images=images, image_embeds=image_embeds, videos=videos, time_mask=time_mask)
        settings = SamplingSettings(max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id, generator)
        return generation.generate(self, text, media, attention_mask, settings, use_cache)

    def prefill(
        self,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 0,
    ) -> GenerationState:
        """Start a conversation: run the prompt once and keep its caches -> a ``GenerationState``.

        Arguments as in ``generate``; ``max_new_tokens`` only sizes the cache (it grows if needed).
        ``state.logits`` (b, num_tokens) holds the next-token logits.
        """
        media = dict(images=images, image_embeds=image_embeds, videos=videos, time_mask=time_mask)
        with conversation.generation_mode(self):
            return generation.prefill(self, text, media, attention_mask, max_new_tokens)

    def extend(
        self,
        state: GenerationState,
        text: Tensor,
        images: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        videos: Tensor | None = None,
        time_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> GenerationState:
        """Append a turn, text (b, n) and optionally new media items, to ``state`` (in place; returned).

        Only the new tokens and the new media run: ``state.logits`` then equals, row by row, a full
        ``forward`` over the whole conversation with that row's real media items in order (a row's
        padded items of an earlier turn do not shift its later ones). Pass each media item in the
        turn whose text holds its media token. A conversation that began with text only is
        recomputed once when its first media item arrives (with media, the gated blocks' feed-forward
        runs over every token). The cache grows by doubling when a turn outgrows it.

        Once a conversation has media, each row's media tokens, counted over the whole conversation
        (the cached turns and this one), must equal its real media items, or a ValueError is raised
        and the state is left as it was; media tokens of a conversation that so far had no media
        are ordinary tokens and cannot be given media later.

        Args:
            state: from ``prefill``.
            text: (b, n) token ids of the new turn.
            images, image_embeds, videos, time_mask: the turn's new media items, as in ``forward``.
            attention_mask: (b, n) bool, False on left padding.
        """
        media = dict(images=images, image_embeds=image_embeds, videos=videos, time_mask=time_mask)
        with conversation.generation_mode(self):
            return conversation.extend(self, state, text, media, attention_mask)
