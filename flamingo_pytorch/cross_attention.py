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

import math

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
        split_heads = "b t m (h k) -> b h t m k"
        return rearrange(k, split_heads, h=self.heads), rearrange(v, split_heads, h=self.heads)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, index: Tensor | None, time_mask: Tensor | None) -> Tensor:
        """x (b, n, d) reads projected media k, v (b, h, t, m, k); index (b, n) as in ``media_index``.

        ``index`` must not decrease along n (a running count does not). In immediate mode the scores
        are computed per item segment (``attend_immediate``), or for texts no longer than t, such as
        a decoding step, per token (``attend_per_token``), so their cost does not grow with t.
        """
        q = self.to_q(self.norm(x))  # (b, n, h k)
        (b, n), t = x.shape[:2], k.shape[2]
        if not (self.only_attend_immediate_media and index is not None and t > 0 and b * n > 0):
            out = self.attend_dense(q, k, v, index, time_mask)
        elif n <= t:  # e.g. decoding, n = 1: gather each token's item
            out = attend_per_token(q, k, v, index, time_mask)  # (b, n, h k)
        else:
            out = attend_immediate(q, k, v, index, time_mask)  # (b, n, h k)
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


def token_items(index: Tensor, time_mask: Tensor | None, num_media: int) -> tuple[Tensor, Tensor]:
    """Media index (b, n) -> each token's 0-based item (b, n) long, clamped into 0..t-1, and reads
    (b, n) bool: False for tokens that read nothing (index 0, index > t, or a padded item)."""
    index = index.long()
    item = (index - 1).clamp(0, num_media - 1)
    reads = (index >= 1) & (index <= num_media)
    if time_mask is not None:
        reads = reads & time_mask.gather(1, item)
    return item, reads


def attend_per_token(q: Tensor, k: Tensor, v: Tensor, index: Tensor, time_mask: Tensor | None) -> Tensor:
    """Each token reads a gathered copy of its own item's m latents: q (b, n, h k), k, v (b, h, t, m, k) -> (b, n, h k).

    Copies n items' keys and values, so ``attend`` uses it only for n <= t (the copies are then no
    larger than k and v): a decoding step reads one item in a handful of kernels, where the chunk
    layout of ``attend_immediate`` would take dozens. Tokens that read nothing give exactly zero.
    """
    b, (heads, t) = q.shape[0], k.shape[1:3]
    item, reads = token_items(index, time_mask, t)  # (b, n) each
    flat_item = rearrange(item + torch.arange(b, device=q.device)[:, None] * t, "b n -> (b n)")
    k_items, v_items = rearrange(k, "b h t m k -> (b t) h m k"), rearrange(v, "b h t m k -> (b t) h m k")  # views
    k_token, v_token = k_items.index_select(0, flat_item), v_items.index_select(0, flat_item)  # (b n, h, m, k)
    q_token = rearrange(q, "b n (h k) -> (b n) h 1 k", h=heads)
    out = F.scaled_dot_product_attention(q_token, k_token, v_token)  # (b n, h, 1, k)
    out = rearrange(out, "(b n) h 1 k -> b n (h k)", b=b)
    return out.masked_fill(~rearrange(reads, "b n -> b n 1"), 0.0)


def immediate_chunk_size(num_text: int, num_media: int, num_latents: int) -> int:
    """Tokens per chunk c for ``attend_immediate``: sqrt(n m / t), kept between ceil(n / t) and 4 ceil(n / t).

    The first chunks attend t c rows; the o ~ n / c overflow chunks copy o m latents. Their sum
    t c + (n / c) m is least at c = sqrt(n m / t): at n = 512, t = 32, m = 64, c = 32.
    """
    smallest = max(1, -(-num_text // max(num_media, 1)))
    balanced = math.isqrt(num_text * num_latents // max(num_media, 1))
    return max(smallest, min(balanced, 4 * smallest, num_text))


def immediate_num_overflow(num_text: int, chunk: int) -> int:
    """The most overflow chunks (see ``immediate_chunks``) that segments of n tokens in all can need.

    A segment of l > c tokens needs ceil((l - c) / c) <= (l - 1) // c overflow chunks, and the
    (l - 1) // c of segments with lengths summing to at most n sum to at most (n - 1) // c.
    """
    return max(num_text - 1, 0) // chunk


def immediate_chunks(
    index: Tensor, time_mask: Tensor | None, num_media: int, chunk: int, *, exact: bool = False
) -> tuple[Tensor, ...]:
    """Lay each item's (contiguous) segment of tokens out in chunks of ``chunk`` tokens.

    Item j's first c tokens fill first chunk j, which reads item j; the rest of its segment goes
    into overflow chunks, o slots after the t first chunks. Unless ``exact``, every shape depends
    only on b, n, t and c (o = ``immediate_num_overflow``).

    Args:
        index: (b, n) non-decreasing media index of each token.
        time_mask: (b, t) bool or None.
        num_media: t.
        chunk: c, tokens per chunk.
        exact: o is the number of overflow chunks the data needs (read back from the tensors: a
            host sync), rather than ``immediate_num_overflow``, the most any data can need.

    Returns:
        chunk_token: (b, (t + o) c) the token each chunk row holds (rows past a segment's end
            hold a clamped, unused token); overflow_item: (b, o) the 0-based item each overflow
            chunk reads; token_row: (b, n) the chunk row (in (t + o) c) holding each token;
            reads: (b, n) bool, False for tokens that read nothing (index 0, index > t, or a
            padded item).
    """
    index = index.long().contiguous()  # searchsorted wants a contiguous boundary tensor, gather int64
    b, n = index.shape
    t = num_media
    device = index.device
    items = torch.arange(1, t + 1, device=device).expand(b, t).contiguous()  # (b, t) 1-based item numbers
    starts = torch.searchsorted(index, items)  # (b, t) first token of each item's segment
    lengths = torch.searchsorted(index, items, right=True) - starts  # (b, t)
    if time_mask is not None:
        lengths = lengths * time_mask  # padded items get no overflow chunks
    extra = ((lengths - chunk).clamp(min=0) + chunk - 1) // chunk  # (b, t) overflow chunks of each item
    extra_end = extra.cumsum(dim=-1)  # (b, t)
    extra_start = extra_end - extra  # (b, t)
    o = int(extra_end[:, -1].max()) if exact and b > 0 else immediate_num_overflow(n, chunk)

    slot = torch.arange(o, device=device).expand(b, o).contiguous()  # (b, o)
    overflow_item = torch.searchsorted(extra_end, slot, right=True).clamp(max=t - 1)  # (b, o); unused -> t - 1
    overflow_first = starts.gather(1, overflow_item) + (slot - extra_start.gather(1, overflow_item) + 1) * chunk
    first = torch.cat((starts, overflow_first), dim=1)  # (b, t + o) first token of each chunk
    chunk_token = (rearrange(first, "b s -> b s 1") + torch.arange(chunk, device=device)).clamp(0, n - 1)
    chunk_token = rearrange(chunk_token, "b s c -> b (s c)")

    item, reads = token_items(index, time_mask, t)  # (b, n) each
    offset = torch.arange(n, device=device) - starts.gather(1, item)  # (b, n) position in its segment
    # Rows past an item's first chunk continue in its overflow chunks, which are consecutive.
    overflow_row = (t + extra_start.gather(1, item)) * chunk + offset - chunk
    token_row = torch.where(offset < chunk, item * chunk + offset, overflow_row)
    token_row = token_row.where(reads, 0)  # (b, n)
    return chunk_token, overflow_item, token_row, reads


def sizes_overflow_exactly(device: torch.device) -> bool:
    """Whether ``attend_immediate`` sizes its overflow chunks to the data, which reads a count back
    from the tensors: only on the CPU, where that costs nothing, and never while being compiled or
    traced (a traced graph would keep the count of its example)."""
    if device.type != "cpu" or torch.jit.is_tracing():
        return False
    compiling = getattr(torch.compiler, "is_compiling", None)
    if compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling as compiling
    return not compiling()


def attend_immediate(q: Tensor, k: Tensor, v: Tensor, index: Tensor, time_mask: Tensor | None) -> Tensor:
    """Each token reads only its own item's m latents: q (b, n, h k), k, v (b, h, t, m, k) -> (b, n, h k).

    The tokens of one item are contiguous. Each item's first c >= n / t tokens form its first chunk,
    which attends to the item's keys and values where they are (no copy); the rest of long
    segments fill o <= (n - 1) / c overflow chunks, each reading a copy of its item's keys and
    values. Every chunk attends without a mask, so the score work is (t c + o c) m <= (5 n + 4 t) m
    whatever the layout, and no (n, t m) mask is built. On accelerators and under
    ``torch.compile`` no shape depends on the data (no host sync; o is the most any layout can
    need); on the CPU, where a sync is free, o is what the layout needs. Tokens that read nothing
    give exactly zero.
    """
    (b, n, inner), (heads, t, m) = q.shape, k.shape[1:4]
    chunk = immediate_chunk_size(n, t, m)
    exact = sizes_overflow_exactly(q.device)
    chunk_token, overflow_item, token_row, reads = immediate_chunks(index, time_mask, t, chunk, exact=exact)
    k_items, v_items = rearrange(k, "b h t m k -> (b t) h m k"), rearrange(v, "b h t m k -> (b t) h m k")  # views
    first_rows = chunk_token[:, : t * chunk]  # (b, t c)
    q_first = q.gather(1, repeat(first_rows, "b r -> b r i", i=inner))  # (b, t c, h k)
    q_first = rearrange(q_first, "b (t c) (h k) -> (b t) h c k", c=chunk, h=heads)
    out = F.scaled_dot_product_attention(q_first, k_items, v_items)  # (b t, h, c, k)
    out = rearrange(out, "(b t) h c k -> b (t c) (h k)", b=b)
    if overflow_item.shape[1] > 0:
        over_rows = chunk_token[:, t * chunk :]  # (b, o c)
        q_over = q.gather(1, repeat(over_rows, "b r -> b r i", i=inner))  # (b, o c, h k)
        q_over = rearrange(q_over, "b (o c) (h k) -> (b o) h c k", c=chunk, h=heads)
        flat_item = rearrange(overflow_item + torch.arange(b, device=q.device)[:, None] * t, "b o -> (b o)")
        k_over, v_over = k_items.index_select(0, flat_item), v_items.index_select(0, flat_item)  # (b o, h, m, k)
        out_over = F.scaled_dot_product_attention(q_over, k_over, v_over)  # (b o, h, c, k)
        out = torch.cat((out, rearrange(out_over, "(b o) h c k -> b (o c) (h k)", b=b)), dim=1)
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
