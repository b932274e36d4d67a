"""The PaLM decoder that Flamingo freezes: parallel attention + feed-forward blocks.

Shapes:
    b batch, n text length, d width, h query heads, k head width, f feed-forward width,
    j keys attended to, c cache capacity (slots).

PaLM's choices, all kept here: pre-norm parallel blocks (attention and feed-forward read the
same normalised input and are summed), multi-query attention (h query heads share one key head
and one value head, which makes the decoding cache h times smaller), rotary position embeddings,
a SwiGLU feed-forward, LayerNorm without bias, no biases anywhere, and the input embedding tied
to the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from flamingo_pytorch._validation import check_positive
from flamingo_pytorch.checkpointing import recompute_activation, run_maybe_checkpointed
from flamingo_pytorch.loss import chunked_cross_entropy


class RotaryEmbedding(nn.Module):
    """Rotary position embedding. Angles are computed in at least float32 (in bfloat16, positions
    above 256 would round onto each other), and in float64 for a float64 model."""

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary embeddings, got {dim_head}")
        self.dim_head = dim_head
        self.base = base

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions (n,) or (b, n) integers -> cos, sin, each (n, k) or (b, 1, n, k), in ``dtype``
        promoted to at least float32."""
        dtype = torch.promote_types(dtype, torch.float32)
        exponents = torch.arange(0, self.dim_head, 2, device=positions.device, dtype=dtype)
        inv_freq = self.base ** (-exponents / self.dim_head)  # (k/2,)
        angles = positions.to(dtype)[..., None] * inv_freq  # (..., n, k/2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., n, k)
        if angles.ndim == 3:
            angles = rearrange(angles, "b n k -> b 1 n k")
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., n, k) by the angles behind cos, sin; computed in the angles' precision, returned in x's dtype."""
    x_wide = x.to(cos.dtype)
    first, second = x_wide.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)  # (..., n, k)
    return (x_wide * cos + rotated_half * sin).to(x.dtype)


def swiglu(fused: Tensor) -> Tensor:
    """``value * silu(gate)`` of ``[value | gate]`` (..., 2f) -> (..., f)."""
    value, gate = fused.chunk(2, dim=-1)  # (..., f) each
    return value * F.silu(gate)


class KVCache(nn.Module):
    """Preallocated self-attention keys and values of one layer, for decoding.

    Multi-query attention makes this one key head and one value head per layer, (b, 1, c, k)
    each: h times smaller than a multi-head cache, which is why PaLM decodes cheaply. The
    buffers are not persistent, so they never reach a ``state_dict``. Slots are written in
    order by ``update``; ``grow`` enlarges the capacity (callers double it, so appending
    costs amortised O(1) copies per token).
    """

    def __init__(self, *, batch: int, capacity: int, dim_head: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, 1, capacity, dim_head)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (b, 1, n, k) at slots start..start+n-1 -> all keys and values so far, (b, 1, start + n, k)."""
        end = start + k.shape[2]
        assert end <= self.capacity, f"cache of {self.capacity} slots cannot hold {end}"
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        # In the new keys' dtype: a cache filled under autocast may be read outside it, and vice versa.
        return self.keys[:, :, :end].to(k.dtype), self.values[:, :, :end].to(v.dtype)

    def grow(self, capacity: int) -> None:
        """Reallocate to ``capacity`` slots, keeping what is stored."""
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])  # (b, 1, c, k)
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (b',) long, e.g. to drop finished sequences."""
        self.keys, self.values = self.keys[rows], self.values[rows]


class ParallelTransformerBlock(nn.Module):
    """``x + attn(norm(x)) + ffw(norm(x))`` with multi-query causal attention and SwiGLU.

    Two bias-free input projections read the normalised x: ``attn_in`` to the h query heads, the
    single key head and the single value head, ``ff_in`` to SwiGLU's value and gate. (One fused
    projection would save a kernel launch, but then the keys and values that attention keeps for
    backward would keep the whole fused output alive.)
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        attn_inner, ff_inner = dim_head * heads, dim * ff_mult
        self.attn_sizes = (attn_inner, dim_head, dim_head)
        self.norm = nn.LayerNorm(dim, bias=False)
        self.attn_in = nn.Linear(dim, sum(self.attn_sizes), bias=False)
        self.ff_in = nn.Linear(dim, 2 * ff_inner, bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (b, n, d), rotary cos/sin (n, k) for its positions -> (b, n, d). Causal."""
        q, k, v, ff = self.project(x, cos, sin)
        k, v = k.expand(-1, self.heads, -1, -1), v.expand(-1, self.heads, -1, -1)  # (b, h, n, k) views
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, n, k)
        return x + self.attn_out(rearrange(out, "b h n k -> b n (h k)")) + ff

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q (b, h, n, k), k and v (b, 1, n, k) with rotary applied, and the feed-forward output (b, n, d)."""
        x = self.norm(x)
        q, k, v = self.attn_in(x).split(self.attn_sizes, dim=-1)  # (b, n, h k), (b, n, k), (b, n, k)
        q = rearrange(q, "b n (h k) -> b h n k", h=self.heads)
        k, v = rearrange(k, "b n k -> b 1 n k"), rearrange(v.contiguous(), "b n k -> b 1 n k")  # v: its own copy
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, recompute_activation(self.feed_forward, self.ff_in(x))

    def feed_forward(self, ff: Tensor) -> Tensor:
        """SwiGLU's [value | gate] (b, n, 2f) -> (b, n, d)."""
        return self.ff_out(swiglu(ff))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start: int, mask: Tensor) -> Tensor:
        """Run on new tokens x (b, n, d) placed at cache slots start..start+n-1 -> (b, n, d).

        ``cos``, ``sin`` are the rotary angles of each token's own position (b, 1, n, k); ``mask``
        (b, 1, n, start + n) bool says which cached slots each new token may read (True = may attend).
        """
        q, k, v, ff = self.project(x, cos, sin)
        k, v = cache.update(start, k, v)  # (b, 1, j, k) each
        n = q.shape[2]
        # One key head: fold the query heads into the query length and attend once.
        q = rearrange(q, "b h n k -> b 1 (h n) k")
        mask = repeat(mask, "b 1 n j -> b 1 (h n) j", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, 1, h n, k)
        out = rearrange(out, "b 1 (h n) k -> b n (h k)", n=n)
        return x + self.attn_out(out) + ff


class PaLM(nn.Module):
    """A PaLM-style decoder-only language model.

    Args:
        num_tokens: vocabulary size.
        dim: model width.
        depth: number of parallel transformer blocks.
        dim_head: width of each attention head (even: rotary embeddings rotate pairs).
        heads: number of query heads (keys and values have one head).
        ff_mult: SwiGLU widening factor.
        checkpoint_activations: in training, recompute each layer's activations in backward
            instead of storing them (less memory, about one more forward pass of compute).
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
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        check_positive(num_tokens=num_tokens, dim=dim, depth=depth, dim_head=dim_head, heads=heads, ff_mult=ff_mult)
        self.checkpoint_activations = checkpoint_activations
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.rotary = RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList(
            ParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)
        self.to_logits.weight = self.token_emb.weight  # tied

    def forward(self, text: Tensor, *, labels: Tensor | None = None) -> Tensor:
        """text (b, n) token ids -> logits (b, n, num_tokens), or with ``labels`` the loss (see ``head``)."""
        x = self.token_emb(text)
        cos, sin = self.rotary(torch.arange(text.shape[1], device=text.device), x.dtype)
        for layer in self.layers:
            x = run_maybe_checkpointed(layer, x, cos, sin, enabled=self.checkpoint_activations and self.training)
        return self.head(x, labels)

    def head(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Final norm and tied output projection: x (b, n, d) -> logits (b, n, num_tokens).

        With ``labels`` (b, n) token ids (-100 = no target), returns instead the mean cross-entropy
        of the logits against them, computed a chunk of tokens at a time so that the full logits
        never exist (see ``loss.py``); labels are not shifted: ``labels[:, i]`` is position i's target.
        """
        x = self.norm(x)
        if labels is None:
            return self.to_logits(x)
        return chunked_cross_entropy(x, self.to_logits, labels, num_tokens=self.token_emb.num_embeddings)
