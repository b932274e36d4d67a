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
    check_bool,
    check_last_dim,
    check_ndim,
    check_same_device,
    check_shape,
)
from flamingo_pytorch.feed_forward import FeedForward


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
            media_locations: (b, n) bool, True where a media item appears in the text.
                None: every token reads every (unpadded) item.
            time_mask: (b, t) bool, True for real media items, False for padding.

        Returns:
            (b, n, d); exactly zero for tokens that may read no media item.
        """
        self.check_inputs(x, media, media_locations, time_mask)
        index = None if media_locations is None else media_index(media_locations)
        k, v = self.project_media(media)
        return self.attend(x, k, v, index, time_mask)

    def check_inputs(self, x: Tensor, media: Tensor, media_locations: Tensor | None, time_mask: Tensor | None) -> None:
        check_ndim("x", x, (3,), "(batch, text length, dim)")
        check_last_dim("x", x, self.dim)
        check_ndim("media", media, (4,), "(batch, media items, latents, media_dim)")
        check_last_dim("media", media, self.media_dim)
        check_same_device("media", media, "x", x)
        b, n = x.shape[:2]
        if media.shape[0] != b:
            raise ValueError(f"media has batch {media.shape[0]} but x has batch {b}")
        if media_locations is not None:
            check_bool("media_locations", media_locations)
            check_shape("media_locations", media_locations, (b, n), "(batch, text length)")
            check_same_device("media_locations", media_locations, "x", x)
        if time_mask is not None:
            check_bool("time_mask", time_mask)
            check_shape("time_mask", time_mask, (b, media.shape[1]), "(batch, media items)")
            check_same_device("time_mask", time_mask, "x", x)

    def project_media(self, media: Tensor) -> tuple[Tensor, Tensor]:
        """(b, t, m, e) media -> keys and values, each (b, h, t, m, k). Cacheable across text."""
        k, v = self.to_kv(media).chunk(2, dim=-1)  # (b, t, m, h k) each
        return tuple(rearrange(z, "b t m (h k) -> b h t m k", h=self.heads) for z in (k, v))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, index: Tensor | None, time_mask: Tensor | None) -> Tensor:
        """x (b, n, d) reads projected media k, v (b, h, t, m, k); index (b, n) as in ``media_index``.

        ``index`` must not decrease along n (a running count does not). In immediate mode the scores
        are computed per item segment (``attend_immediate``), so their cost does not grow with t.
        """
        q = self.to_q(self.norm(x))  # (b, n, h k)
        if self.only_attend_immediate_media and index is not None and k.shape[2] > 0:
            out = attend_immediate(q, k, v, index, time_mask)  # (b, n, h k)
        else:
            out = self.attend_dense(q, k, v, index, time_mask)
        return self.to_out(out)

    def attend_dense(self, q: Tensor, k: Tensor, v: Tensor, index: Tensor | None, time_mask: Tensor | None) -> Tensor:
        """q (b, n, h k) reads all t * m latents under the text-to-media mask -> (b, n, h k)."""
        n = q.shape[1]
        t, m = k.shape[2:4]
        q = rearrange(q, "b n (h k) -> b h n k", h=self.heads)
        k, v = (rearrange(z, "b h t m k -> b h (t m) k") for z in (k, v))
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


def immediate_chunk_size(num_text: int, num_media: int) -> int:
    """Tokens per chunk c for ``attend_immediate``: about n / t, so about t + n / c <= 2t chunks."""
    return max(1, -(-num_text // max(num_media, 1)))


def immediate_num_chunks(num_text: int, num_media: int, chunk: int) -> int:
    """The most chunks of ``chunk`` tokens that t contiguous segments of n tokens in all can need.

    j non-empty segments with c_1..c_j chunks hold at least (sum c - j) * chunk + j tokens, so
    sum c <= j + (n - j) // chunk, largest at j = min(t, n).
    """
    j = min(num_media, num_text)
    return j + (num_text - j) // chunk


def immediate_chunks(index: Tensor, time_mask: Tensor | None, num_media: int, chunk: int) -> tuple[Tensor, ...]:
    """Cut each item's (contiguous) segment of tokens into chunks of ``chunk`` tokens, with static shapes.

    Args:
        index: (b, n) non-decreasing media index of each token.
        time_mask: (b, t) bool or None.
        num_media: t.
        chunk: c, tokens per chunk.

    Returns:
        chunk_token: (b, s c) the token each chunk row holds (rows past a segment's end hold a
            clamped, unused token); chunk_item: (b, s) the 0-based item each chunk reads;
        token_row: (b, n) the chunk row (in s c) holding each token; reads: (b, n) bool, False for
            tokens that read nothing (index 0, index > t, or a padded item).
    """
    index = index.long().contiguous()  # searchsorted wants a contiguous boundary tensor, gather int64
    b, n = index.shape
    t, s = num_media, immediate_num_chunks(n, num_media, chunk)
    device = index.device
    items = torch.arange(1, t + 1, device=device, dtype=index.dtype).expand(b, t).contiguous()  # (b, t)
    starts = torch.searchsorted(index, items)  # (b, t) first token of each item's segment
    lengths = torch.searchsorted(index, items, right=True) - starts  # (b, t)
    if time_mask is not None:
        lengths = lengths * time_mask  # padded items get no chunks
    chunks = (lengths + chunk - 1) // chunk  # (b, t) chunks of each item
    chunk_end = chunks.cumsum(dim=-1)  # (b, t)
    chunk_start = chunk_end - chunks  # (b, t)

    slot = torch.arange(s, device=device).expand(b, s).contiguous()  # (b, s)
    chunk_item = torch.searchsorted(chunk_end, slot, right=True).clamp(max=t - 1)  # (b, s); unused -> t - 1
    first = starts.gather(1, chunk_item) + (slot - chunk_start.gather(1, chunk_item)) * chunk  # (b, s)
    chunk_token = (rearrange(first, "b s -> b s 1") + torch.arange(chunk, device=device)).clamp(0, n - 1)
    chunk_token = rearrange(chunk_token, "b s c -> b (s c)")

    item = (index - 1).clamp(0, t - 1)  # (b, n) 0-based item of each token
    reads = (index >= 1) & (index <= t)
    if time_mask is not None:
        reads = reads & time_mask.gather(1, item)
    offset = torch.arange(n, device=device) - starts.gather(1, item)  # (b, n) position in its segment
    token_row = (chunk_start.gather(1, item) + offset // chunk) * chunk + offset % chunk
    token_row = token_row.where(reads, 0)  # (b, n)
    return chunk_token, chunk_item, token_row, reads


def attend_immediate(q: Tensor, k: Tensor, v: Tensor, index: Tensor, time_mask: Tensor | None) -> Tensor:
    """Each token reads only its own item's m latents: q (b, n, h k), k, v (b, h, t, m, k) -> (b, n, h k).

    The tokens of one item are contiguous, so each item's segment is cut into chunks of c tokens
    laid out in a fixed number s of chunk slots; every slot attends, without a mask, to one item's
    latents. The score work is s * c * m ~ 2 n m whatever t, no (n, t m) mask is built, and no
    shape depends on the data (no host sync; ``torch.compile`` friendly). Tokens that read nothing
    give exactly zero.
    """
    (b, n, inner), (heads, t) = q.shape, k.shape[1:3]
    chunk = immediate_chunk_size(n, t)
    chunk_token, chunk_item, token_row, reads = immediate_chunks(index, time_mask, t, chunk)
    q_chunks = q.gather(1, repeat(chunk_token, "b r -> b r i", i=inner))  # (b, s c, h k)
    q_chunks = rearrange(q_chunks, "b (s c) (h k) -> (b s) h c k", c=chunk, h=heads)
    flat_item = rearrange(chunk_item + torch.arange(b, device=q.device)[:, None] * t, "b s -> (b s)")
    k, v = (rearrange(z, "b h t m k -> (b t) h m k").index_select(0, flat_item) for z in (k, v))  # (b s, h, m, k)
    out = F.scaled_dot_product_attention(q_chunks, k, v)  # (b s, h, c, k)
    out = rearrange(out, "(b s) h c k -> b (s c) (h k)", b=b)
    out = out.gather(1, repeat(token_row, "b n -> b n i", i=inner))  # (b, n, h k)
    return out.masked_fill(~rearrange(reads, "b n -> b n 1"), 0.0)


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
        return self.gated(x, self.attn(x, media, media_locations, time_mask))

    def forward_projected(self, x: Tensor, k: Tensor, v: Tensor, index: Tensor, time_mask: Tensor | None) -> Tensor:
        """The block on media keys and values already projected by ``attn.project_media``, (b, h, t, m, k).

        ``index`` (b, n) is each token's media index (see ``media_index``); decoding passes it
        explicitly so that new tokens continue the count of the tokens before them.
        """
        return self.gated(x, self.attn.attend(x, k, v, index, time_mask))

    def gated(self, x: Tensor, attended: Tensor) -> Tensor:
        """x (b, n, d) plus the tanh-gated cross-attention output (b, n, d), then the gated feed-forward."""
        x = x + self.attn_gate.tanh() * attended
        return x + self.ff_gate.tanh() * self.ff(x)
