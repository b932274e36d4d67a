"""Immediate-media cross-attention: each text token reads the latents of one media item only.

Shapes:
    b batch, n text length, t media items, m latents per media item, h heads, k head width,
    c tokens per chunk, o overflow chunks.

In the paper's setting a token reads only the item of its media index j (see
``cross_attention.media_index``); the tokens of one item are contiguous. A dense masked attention
would score every token against all t * m latents and throw most away; the paths here score each
token against its own item's m latents only, so the work does not grow with t:

    one item (t = 1)     attend to it in place                       ``attend_one_item``
    n <= t (decoding)    gather each token's item                    ``attend_per_token``
    otherwise            lay the text out in chunks of one item each  ``attend_by_chunks``

Which path, and which rows each token uses, follows from the media index alone (not from the keys
and values): ``immediate_layout`` works it out, so that the gated blocks of one forward, which all
read the same media, share one ``ImmediateLayout``. Row indices in it are flat, with the batch folded
in (a row of the (b t) items, of the (b n) tokens).

Tokens that read nothing (index 0, index > t, or a padded item) give exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class ImmediateLayout:
    """Which keys, values and rows each token uses in ``attend_immediate``.

    Attributes:
        skip: (b, n, 1) bool, True for tokens that read nothing (their output is set to zero).
        token_item: (b n,) long, each token's item as a row of the (b t) items: the per-token path
            (1 < t, n <= t); else None.
        chunk: c, tokens per chunk: the chunk path (n > t > 1); else 0.
        chunk_token: (b, (t + o) c) long, the token each chunk row holds, as a row of the (b n) tokens.
        overflow_item: (b o,) long, the item each overflow chunk reads, as a row of the (b t) items.
        token_row: (b n,) long, the chunk row holding each token, as a row of the (b (t + o) c) chunk rows.
    """

    skip: Tensor
    token_item: Tensor | None = None
    chunk: int = 0
    chunk_token: Tensor | None = None
    overflow_item: Tensor | None = None
    token_row: Tensor | None = None


def immediate_layout(index: Tensor, time_mask: Tensor | None, k: Tensor) -> ImmediateLayout | None:
    """The layout for tokens of media index (b, n) (non-decreasing) reading the t items of m latents
    of the projected keys k (b, h, t, m, k); ``time_mask`` (b, t) bool or None. None when there is
    nothing to read or no token (t = 0 or b n = 0)."""
    (b, n), (t, num_latents) = index.shape, k.shape[2:4]
    if t == 0 or b * n == 0:
        return None
    if t == 1 or n <= t:
        item, reads = token_items(index, time_mask, t)  # (b, n) each
        token_item = flat_rows(item, t) if t > 1 else None
        return ImmediateLayout(skip=rearrange(~reads, "b n -> b n 1"), token_item=token_item)
    chunk = immediate_chunk_size(n, t, num_latents)
    chunk_token, overflow_item, token_row, reads = immediate_chunks(index, time_mask, t, chunk)
    return ImmediateLayout(
        skip=rearrange(~reads, "b n -> b n 1"),
        chunk=chunk,
        chunk_token=chunk_token + batch_offsets(b, n, index.device),  # (b, (t + o) c)
        overflow_item=flat_rows(overflow_item, t),
        token_row=flat_rows(token_row, chunk_token.shape[1]),
    )


def batch_offsets(b: int, length: int, device: torch.device) -> Tensor:
    """(b, 1): where each batch row's ``length`` rows start among the (b length) rows."""
    return torch.arange(b, device=device)[:, None] * length


def flat_rows(rows: Tensor, length: int) -> Tensor:
    """Row indices (b, r) into each batch row's ``length`` rows -> (b r,) rows of the (b length) rows."""
    return rearrange(rows + batch_offsets(rows.shape[0], length, rows.device), "b r -> (b r)")


def attend_immediate(q: Tensor, k: Tensor, v: Tensor, layout: ImmediateLayout) -> Tensor:
    """q (b, n, h k) reads only its own item of k, v (b, h, t, m, k) -> (b, n, h k), laid out by
    ``layout`` (``immediate_layout`` of the tokens' media index over these t items of m latents)."""
    if layout.chunk:
        return attend_by_chunks(q, k, v, layout)
    if layout.token_item is not None:
        return attend_per_token(q, k, v, layout)
    return attend_one_item(q, k, v, layout)


def token_items(index: Tensor, time_mask: Tensor | None, num_media: int) -> tuple[Tensor, Tensor]:
    """Media index (b, n) -> each token's 0-based item (b, n) long, clamped into 0..t-1, and reads
    (b, n) bool: False for tokens that read nothing (index 0, index > t, or a padded item)."""
    index = index.long()
    item = (index - 1).clamp(0, num_media - 1)
    reads = (index >= 1) & (index <= num_media)
    if time_mask is not None:
        reads = reads & time_mask.gather(1, item)
    return item, reads


def attend_one_item(q: Tensor, k: Tensor, v: Tensor, layout: ImmediateLayout) -> Tensor:
    """t = 1: every token that reads anything reads the single item, in place: q (b, n, h k),
    k, v (b, h, 1, m, k) -> (b, n, h k). Tokens that read nothing give exactly zero."""
    heads = k.shape[1]
    q = rearrange(q, "b n (h k) -> b h n k", h=heads)
    out = F.scaled_dot_product_attention(q, k[:, :, 0], v[:, :, 0])  # (b, h, n, k)
    out = rearrange(out, "b h n k -> b n (h k)")
    return out.masked_fill(layout.skip, 0.0)


def attend_per_token(q: Tensor, k: Tensor, v: Tensor, layout: ImmediateLayout) -> Tensor:
    """Each token reads a gathered copy of its own item's m latents: q (b, n, h k), k, v (b, h, t, m, k) -> (b, n, h k).

    Copies n items' keys and values, so ``immediate_layout`` chooses it only for n <= t (the copies are then no
    larger than k and v): a decoding step reads one item in a handful of kernels, where the chunk
    layout of ``attend_by_chunks`` would take dozens. Tokens that read nothing give exactly zero.
    """
    b, heads = q.shape[0], k.shape[1]
    k_token, v_token = gather_items(k, v, layout.token_item)  # (b n, h, m, k) each
    q_token = rearrange(q, "b n (h k) -> (b n) h 1 k", h=heads)
    out = F.scaled_dot_product_attention(q_token, k_token, v_token)  # (b n, h, 1, k)
    out = rearrange(out, "(b n) h 1 k -> b n (h k)", b=b)
    return out.masked_fill(layout.skip, 0.0)


def gather_items(k: Tensor, v: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of the items ``items`` (s,), rows of the (b t) items, of k, v (b, h, t, m, k) -> each (s, h, m, k)."""
    k_items, v_items = rearrange(k, "b h t m k -> (b t) h m k"), rearrange(v, "b h t m k -> (b t) h m k")  # views
    return k_items.index_select(0, items), v_items.index_select(0, items)


def immediate_chunk_size(num_text: int, num_media: int, num_latents: int) -> int:
    """Tokens per chunk c for ``attend_by_chunks``: sqrt(n m / t), kept between ceil(n / t) and 4 ceil(n / t).

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


def immediate_chunks(index: Tensor, time_mask: Tensor | None, num_media: int, chunk: int) -> tuple[Tensor, ...]:
    """Lay each item's (contiguous) segment of tokens out in chunks of ``chunk`` tokens.

    Item j's first c tokens fill first chunk j, which reads item j; the rest of its segment goes
    into overflow chunks, o slots after the t first chunks. Every shape depends only on b, n, t
    and c (o = ``immediate_num_overflow``), never on the data: no host sync, and one graph under
    ``torch.compile``.

    Args:
        index: (b, n) non-decreasing media index of each token.
        time_mask: (b, t) bool or None.
        num_media: t.
        chunk: c, tokens per chunk.

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
    o = immediate_num_overflow(n, chunk)

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


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (b, n, i) at rows (b r,) of the (b n) rows -> (b, r, i). (Through ``index_select``, whose backward keeps
    only the indices, where ``gather``'s would also keep x.)"""
    picked = x.flatten(0, 1).index_select(0, rows)  # (b r, i)
    return rearrange(picked, "(b r) i -> b r i", b=x.shape[0])


def attend_by_chunks(q: Tensor, k: Tensor, v: Tensor, layout: ImmediateLayout) -> Tensor:
    """Each token reads only its own item's m latents: q (b, n, h k), k, v (b, h, t, m, k) -> (b, n, h k).

    The tokens of one item are contiguous. Each item's first c >= n / t tokens form its first chunk,
    which attends to the item's keys and values where they are (no copy); the rest of long
    segments fill o <= (n - 1) / c overflow chunks, each reading a copy of its item's keys and
    values. Every chunk attends without a mask, so the score work is (t c + o c) m <= (5 n + 4 t) m
    whatever the layout, and no (n, t m) mask is built. No shape depends on the data (o is the
    most any layout can need), so there is no host sync. Tokens that read nothing give exactly zero.
    """
    b, (heads, t) = q.shape[0], k.shape[1:3]
    chunk = layout.chunk
    k_items, v_items = rearrange(k, "b h t m k -> (b t) h m k"), rearrange(v, "b h t m k -> (b t) h m k")  # views
    first_rows = rearrange(layout.chunk_token[:, : t * chunk], "b r -> (b r)")  # (b t c,)
    q_first = rearrange(take_rows(q, first_rows), "b (t c) (h k) -> (b t) h c k", c=chunk, h=heads)
    out = F.scaled_dot_product_attention(q_first, k_items, v_items)  # (b t, h, c, k)
    out = rearrange(out, "(b t) h c k -> b (t c) (h k)", b=b)
    if layout.overflow_item.shape[0] > 0:
        over_rows = rearrange(layout.chunk_token[:, t * chunk :], "b r -> (b r)")  # (b o c,)
        q_over = rearrange(take_rows(q, over_rows), "b (o c) (h k) -> (b o) h c k", c=chunk, h=heads)
        k_over, v_over = gather_items(k, v, layout.overflow_item)  # (b o, h, m, k) each
        out_over = F.scaled_dot_product_attention(q_over, k_over, v_over)  # (b o, h, c, k)
        out = torch.cat((out, rearrange(out_over, "(b o) h c k -> b (o c) (h k)", b=b)), dim=1)
    out = take_rows(out, layout.token_row)  # (b, n, h k)
    return out.masked_fill(layout.skip, 0.0)
