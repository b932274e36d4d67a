"""Masked cross-attention from text to media, and the tanh-gated block that wraps it.

Shapes:
    b batch, n text length, t media items, m latents per media item,
    d text width, e media width, h heads, k head width.

Masking (True = may attend). A token's media index is the running count of media tokens in the
text up to and including it: 0 before the first media token, j after the j-th. With
``only_attend_immediate_media`` a token reads only the latents of item j; otherwise items 1..j.
Items marked False in ``time_mask`` are padding and are never read. A token that may read
nothing gets a cross-attention output of exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from flamingo_pytorch._validation import (
    check_last_dim,
    check_mask,
    check_ndim,
    check_positive,
    check_same_device,
    check_shape,
    check_time_mask,
)
from flamingo_pytorch.feed_forward import FeedForward
from flamingo_pytorch.immediate_media import ImmediateLayout, attend_immediate, immediate_layout


def media_index(media_locations: Tensor) -> Tensor:
    """(b, n) bool -> (b, n) long: how many media tokens occur up to and including each token."""
    return media_locations.cumsum(dim=-1)


def text_to_media_mask(
    index: Tensor | None,
    time_mask: Tensor | None,
    *,
    num_text: int,
    num_media: int,
    only_immediate: bool,
) -> Tensor | None:
    """Which media items each token may read: (b, n, t) bool, or None when it may read all of them.

    Args:
        index: (b, n) media index of each token (see ``media_index``), or None: all items visible.
        time_mask: (b, t) bool, False marks padded items, or None: all items are real.
        num_text: n, used when ``index`` is None.
        num_media: t.
        only_immediate: read only the item equal to the index, rather than every item up to it.
    """
    if index is None and time_mask is None:
        return None
    if index is None:
        return repeat(time_mask, "b t -> b n t", n=num_text)
    item = torch.arange(1, num_media + 1, device=index.device)  # (t,) 1-based item numbers
    index = rearrange(index, "b n -> b n 1")
    allowed = index == item if only_immediate else index >= item  # (b, n, t)
    if time_mask is not None:
        allowed = allowed & rearrange(time_mask, "b t -> b 1 t")
    return allowed


class MaskedCrossAttention(nn.Module):
    """Text queries attend to media latents under the Flamingo text-to-media mask.

    Args:
        dim: text width d.
        dim_head: width of each attention head.
        heads: number of attention heads.
        only_attend_immediate_media: each token reads only the most recent media item
            (the paper's setting); False reads every media item seen so far.
        media_dim: media width e, when it differs from ``dim``.
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
        media_dim: int | None = None,
    ):
        super().__init__()
        check_positive(dim=dim, dim_head=dim_head, heads=heads)
        if media_dim is not None:
            check_positive(media_dim=media_dim)
        self.dim = dim
        self.media_dim = dim if media_dim is None else media_dim
        self.heads = heads
        self.only_attend_immediate_media = only_attend_immediate_media
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(self.media_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: Tensor,
        media: Tensor,
        media_locations: Tensor | None = None,
        time_mask: Tensor | None = None,
    ) -> Tensor:
        """Cross-attend text to media.

        Args:
            x: (b, n, d) text features.
            media: (b, t, m, e) media latents, e.g. the Perceiver Resampler's output.
            media_locations: (b, n) bool (or 0/1 integers), True where a media item appears in the text.
                None: every token reads every (unpadded) item.
            time_mask: (b, t) bool (or 0/1 integers), True for real media items, False for padding.

        Returns:
            (b, n, d); exactly zero for tokens that may read no media item.
        """
        media_locations, time_mask = self.check_inputs(x, media, media_locations, time_mask)
        index = None if media_locations is None else media_index(media_locations)
        k, v = self.project_media(media)
        return self.attend(x, k, v, index, time_mask)

    def check_inputs(
        self, x: Tensor, media: Tensor, media_locations: Tensor | None, time_mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Raise on bad inputs; -> media_locations and time_mask as bool (0/1 integers are accepted)."""
        check_ndim("x", x, (3,), "(batch, text length, dim)")
        check_last_dim("x", x, self.dim)
        check_ndim("media", media, (4,), "(batch, media items, latents, media_dim)")
        check_last_dim("media", media, self.media_dim)
        check_same_device("media", media, "x", x)
        b, n = x.shape[:2]
        if media.shape[0] != b:
            raise ValueError(f"media has batch {media.shape[0]} but x has batch {b}")
        if media_locations is not None:
            media_locations = check_mask("media_locations", media_locations)
            check_shape("media_locations", media_locations, (b, n), "(batch, text length)")
            check_same_device("media_locations", media_locations, "x", x)
        if time_mask is not None:
            time_mask = check_time_mask(time_mask, (b, media.shape[1]), "x", x)
        return media_locations, time_mask

    def project_media(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """(b, t, m, e) media -> keys and values, each (b, h, t, m, k). Cacheable across text."""
        k, v = self.to_kv(media).chunk(2, dim=-1)  # (b, t, m, h k) each
        split_heads = "b t m (h k) -> b h t m k"
        return rearrange(k, split_heads, h=self.heads), rearrange(v, split_heads, h=self.heads)

    def attend(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        index: Tensor | None,
        time_mask: Tensor | None,
        layout: ImmediateLayout | None = None,
    ) -> Tensor:
        """x (b, n, d) reads projected media k, v (b, h, t, m, k); index (b, n) as in ``media_index``.

        ``index`` must not decrease along n (a running count does not). In immediate mode each token
        is scored against its own item only (``immediate_media.attend_immediate``), so the cost does
        not grow with t. ``layout``: ``immediate_layout`` of this index and time mask over these t
        items, when the caller has it already (the gated blocks of one forward share it).
        """
        q = self.to_q(self.norm(x))  # (b, n, h k)
        k, v = k.to(q.dtype), v.to(q.dtype)  # keys cached under autocast may be read outside it, and vice versa
        if self.only_attend_immediate_media and index is not None and layout is None:
            layout = immediate_layout(index, time_mask, k)
        if self.only_attend_immediate_media and layout is not None:
            out = attend_immediate(q, k, v, layout)  # (b, n, h k)
        else:
            out = self.attend_dense(q, k, v, index, time_mask)
        return self.to_out(out)

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, index: Tensor | None, time_mask: Tensor | None) -> Tensor:
        """q (b, n, h k) reads all t * m latents under the text-to-media mask -> (b, n, h k)."""
        n = q.shape[1]
        t, m = k.shape[2:4]
        q = rearrange(q, "b n (h k) -> b h n k", h=self.heads)
        k, v = rearrange(k, "b h t m k -> b h (t m) k"), rearrange(v, "b h t m k -> b h (t m) k")
        allowed = text_to_media_mask(
            index, time_mask, num_text=n, num_media=t, only_immediate=self.only_attend_immediate_media
        )
        if allowed is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, k)
        else:
            sees_media = allowed.any(dim=-1)  # (b, n)
            # A row with nothing to read would softmax over nothing (NaN): let it read everything, then zero it.
            allowed = allowed | ~rearrange(sees_media, "b n -> b n 1")
            mask = repeat(allowed, "b n t -> b 1 n (t m)", m=m)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, h, n, k)
            out = out.masked_fill(~rearrange(sees_media, "b n -> b 1 n 1"), 0.0)
        return rearrange(out, "b h n k -> b n (h k)")


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: ``x + tanh(a) * xattn(x, media)``, then ``x + tanh(b) * ffw(x)``.

    Both gates start at zero, so a fresh block is the identity and a frozen language model
    with these blocks inserted computes exactly what it computed before.

    Args:
        dim: text width d.
        dim_head: width of each attention head.
        heads: number of attention heads.
        ff_mult: feed-forward widening factor.
        only_attend_immediate_media: see ``MaskedCrossAttention``.
        media_dim: media width e, when it differs from ``dim``.
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
        media_dim: int | None = None,
    ):
        super().__init__()
        check_positive(ff_mult=ff_mult)
        self.attn = MaskedCrossAttention(
            dim=dim,
            dim_head=dim_head,
            heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
            media_dim=media_dim,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: Tensor,
        media: Tensor,
        media_locations: Tensor | None = None,
        time_mask: Tensor | None = None,
    ) -> Tensor:
        """Same arguments as ``MaskedCrossAttention.forward``; returns (b, n, d)."""
        return self.gated_ff(x + self.attn_gate.tanh() * self.attn(x, media, media_locations, time_mask))

    def forward_projected(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        index: Tensor,
        time_mask: Tensor | None,
        layout: ImmediateLayout | None = None,
    ) -> Tensor:
        """The block on media keys and values already projected by ``attn.project_media``, (b, h, t, m, k).

        ``index`` (b, n) is each token's media index (see ``media_index``); decoding passes it
        explicitly so that new tokens continue the count of the tokens before them. ``layout``: see
        ``MaskedCrossAttention.attend``.
        """
        return self.gated_ff(x + self.attn_gate.tanh() * self.attn.attend(x, k, v, index, time_mask, layout))

    def gated_ff(self, x: Tensor) -> Tensor:
        """x (b, n, d) plus the tanh-gated feed-forward of x. (The cross-attention output is added by
        the caller, so that it is freed before the feed-forward runs when nothing keeps it for backward.)"""
        return x + self.ff_gate.tanh() * self.ff(x)
