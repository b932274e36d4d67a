"""The Perceiver Resampler: a fixed number of learned latents read each media item.

Shapes:
    b batch, t media items, f video frames per item, p patches (features) per frame,
    m latents per media item, d width, h heads, k head width.

Each media item (an image, or a video clip of f frames) is resampled on its own: its features
plus a learned embedding of its index t (and of each frame's index f, for videos) become the
keys and values, together with the latents themselves, as in the Flamingo paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from flamingo_pytorch._validation import check_count, check_last_dim, check_ndim, check_tensor
from flamingo_pytorch.feed_forward import FeedForward


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the media features and the latents."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: Tensor, latents: Tensor) -> Tensor:
        """media (B, p, d), latents (B, m, d) -> (B, m, d), where B folds batch and media items."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)  # (B, p + m, h k) each
        q = rearrange(q, "B m (h k) -> B h m k", h=self.heads)
        k, v = rearrange(k, "B j (h k) -> B h j k", h=self.heads), rearrange(v, "B j (h k) -> B h j k", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, m, k)
        return self.to_out(rearrange(out, "B h m k -> B m (h k)"))


class PerceiverResampler(nn.Module):
    """Resamples each media item's features to ``num_latents`` learned latents.

    Args:
        dim: width of the media features and of the latents.
        depth: number of attention + feed-forward layers.
        dim_head: width of each attention head.
        heads: number of attention heads.
        num_latents: latents per media item (64 in the paper).
        num_time_embeds: the most media items per sample; each index gets a learned embedding.
            ``None``: no time embeddings and no limit (OpenFlamingo's released models).
        ff_mult: feed-forward widening factor.
        num_frame_embeds: the most video frames per media item, each with a learned embedding.
            ``None`` (default) accepts images only.
    """

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        num_latents: int = 64,
        num_time_embeds: int | None = 4,
        ff_mult: int = 4,
        num_frame_embeds: int | None = None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("dim_head", dim_head), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        if num_time_embeds is not None and num_time_embeds < 1:
            raise ValueError(f"num_time_embeds must be None or >= 1, got {num_time_embeds}")
        if num_frame_embeds is not None and num_frame_embeds < 1:
            raise ValueError(f"num_frame_embeds must be None or >= 1, got {num_frame_embeds}")
        self.dim = dim
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.time_embeds = None
        if num_time_embeds is not None:
            self.time_embeds = nn.Parameter(torch.randn(num_time_embeds, 1, dim))
        self.frame_embeds = None
        if num_frame_embeds is not None:
            self.frame_embeds = nn.Parameter(torch.randn(num_frame_embeds, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def num_time_embeds(self) -> int | None:
        return None if self.time_embeds is None else self.time_embeds.shape[0]

    def forward(self, media: Tensor, *, time_offset: int = 0) -> Tensor:
        """Resample media features.

        Args:
            media: ``(b, p, d)`` one item per sample, ``(b, t, p, d)`` images, or, when
                ``num_frame_embeds`` is set, ``(b, t, f, p, d)`` videos.
            time_offset: index of the first item among all items of the sample, for items
                appended to earlier ones (a conversation): item i gets time embedding offset + i.

        Returns:
            ``(b, t, num_latents, d)``.
        """
        check_count("time_offset", time_offset)
        media = self._add_frame_embeds(media)  # (b, t, p', d)
        b, t = media.shape[:2]
        if self.time_embeds is not None:
            if time_offset + t > self.num_time_embeds:
                raise ValueError(
                    f"media has {time_offset + t} items per sample but the resampler has "
                    f"num_time_embeds={self.num_time_embeds}; raise num_time_embeds to pass more"
                )
            media = media + self.time_embeds[time_offset : time_offset + t]
        media = rearrange(media, "b t p d -> (b t) p d")
        latents = repeat(self.latents, "m d -> B m d", B=b * t)
        for attn, ff in self.layers:
            latents = latents + attn(media, latents)
            latents = latents + ff(latents)
        return self.norm(latents.unflatten(0, (b, t)))  # (b t, m, d) -> (b, t, m, d); unlike einops, fine with b = 0

    def _add_frame_embeds(self, media: Tensor) -> Tensor:
        """Bring media to (b, t, p', d): add a time axis to 3-d input, fold video frames into p'."""
        check_tensor("media", media)
        ndims, layout = (3, 4), "(b, p, d) or (b, t, p, d)"
        if self.frame_embeds is not None:
            ndims, layout = (3, 4, 5), "(b, p, d), (b, t, p, d) or (b, t, f, p, d)"
        elif media.ndim == 5:
            raise ValueError("media is 5-d (b, t, f, p, d) video, but the resampler was built without num_frame_embeds")
        check_ndim("media", media, ndims, layout)
        check_last_dim("media", media, self.dim)
        if media.ndim == 3:
            return rearrange(media, "b p d -> b 1 p d")
        if media.ndim == 4:
            return media
        frames = media.shape[2]
        if frames > self.frame_embeds.shape[0]:
            raise ValueError(f"media has {frames} frames per item but num_frame_embeds={self.frame_embeds.shape[0]}")
        media = media + self.frame_embeds[:frames]
        return rearrange(media, "b t f p d -> b t (f p) d")
