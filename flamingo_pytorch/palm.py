"""The PaLM decoder that Flamingo freezes: parallel attention + feed-forward blocks.

Shapes:
    b batch, n text length, d width, h query heads, k head width, f feed-forward width,
    j keys attended to, c cache capacity (slots); in the CPU's folded attention g head groups,
    hg = h / g heads per group, p positions per call.

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
from torch.utils.checkpoint import checkpoint

from flamingo_pytorch._linear import apply_linear, is_plain_linear, linear
from flamingo_pytorch._tracing import is_traced, is_transformed
from flamingo_pytorch._validation import check_tensor
from flamingo_pytorch.loss import linear_cross_entropy


class RotaryEmbedding(nn.Module):
    """Rotary position embedding. Angles are computed in float32 whatever the model's dtype
    (in bfloat16, positions above 256 would round onto each other)."""

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        self.dim_head = dim_head
        self.base = base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (n,) or (b, n) integers -> cos, sin, each (n, k) or (b, 1, n, k) float32."""
        exponents = torch.arange(0, self.dim_head, 2, device=positions.device, dtype=torch.float32)
        inv_freq = self.base ** (-exponents / self.dim_head)  # (k/2,)
        angles = positions.float()[..., None] * inv_freq  # (..., n, k/2)
        angles = torch.cat((angles, angles), dim=-1)  # (..., n, k)
        if angles.ndim == 3:
            angles = rearrange(angles, "b n k -> b 1 n k")
        return angles.cos(), angles.sin()


def run_maybe_checkpointed(module: nn.Module, *args: Tensor | None, enabled: bool) -> Tensor:
    """``module(*args)``; with ``enabled`` and grad on, its activations are recomputed in backward instead of kept."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class SwiGLU(torch.autograd.Function):
    """``value * silu(gate)`` of ``[value | gate]`` (..., 2f) -> (..., f), keeping only its input.

    Plain autograd would also keep ``silu(gate)``, an extra (b, n, f) tensor per layer, and in
    backward concatenate the two halves' gradients; here the input is the fused projection's
    output, which backward keeps anyway, and both halves of its gradient are written into one tensor.
    """

    @staticmethod
    def forward(ctx, fused: Tensor) -> Tensor:
        ctx.save_for_backward(fused)
        value, gate = fused.chunk(2, dim=-1)  # (..., f) views
        return value * F.silu(gate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (fused,) = ctx.saved_tensors
        value, gate = fused.chunk(2, dim=-1)
        if is_traced():  # compilers take no strided out= (and fuse the concatenation themselves)
            return torch.cat((grad * F.silu(gate), torch.ops.aten.silu_backward(grad * value, gate)), dim=-1)
        grad_fused = torch.empty_like(fused)  # (..., 2f)
        grad_value, grad_gate = grad_fused.chunk(2, dim=-1)  # views written in place
        torch.mul(grad, F.silu(gate), out=grad_value)
        torch.ops.aten.silu_backward.grad_input(grad * value, gate, grad_input=grad_gate)  # grad value silu'(gate)
        return grad_fused


def swiglu(fused: Tensor) -> Tensor:
    """``value * silu(gate)`` of ``[value | gate]`` (..., 2f), through ``SwiGLU`` except under
    ``torch.func`` or forward-mode AD."""
    if is_transformed(fused):
        value, gate = fused.chunk(2, dim=-1)
        return value * F.silu(gate)
    return SwiGLU.apply(fused)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., n, k) by the angles behind cos, sin; computed in float32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)  # (..., n, k)
    return (x32 * cos + rotated_half * sin).to(x.dtype)


FOLDED_QUERY_ROWS = 256  # query rows (positions x heads) per attention call in ``causal_attention_folded``


def folded_groups(batch: int, heads: int) -> int:
    """g, the fewest head groups (a divisor of h) that give every CPU thread a (batch, group) pair:
    the CPU attention backward splits its work by batch row and head only."""
    threads = torch.get_num_threads()
    return next(g for g in range(1, heads + 1) if heads % g == 0 and (batch * g >= threads or g == heads))


def folded_positions(batch: int, heads: int) -> int:
    """p, the positions per call of ``causal_attention_folded`` (``FOLDED_QUERY_ROWS`` query rows)."""
    return max(1, FOLDED_QUERY_ROWS // (heads // folded_groups(batch, heads)))


def causal_attention_folded(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal multi-query attention for the CPU: q (b, h, n, k) over k, v (b, 1, n, k) -> (b, n, h k).

    All h heads read the same keys, so the hg = h / g heads of each of g groups (``folded_groups``;
    g = 1 when the batch alone occupies every thread) are folded into the query length
    (position-major: row r holds position r // hg) and attended together, p positions at a time,
    each block only to the keys up to its last position. Against ``is_causal`` over h expanded key
    heads this makes fewer, larger matmuls and skips most blocks above the diagonal: forward and
    backward take about a third less time at n = 512, h = 8 on a 2-core CPU (less at n = 2048). On
    accelerators one ``is_causal`` flash kernel is faster, and needs no mask; under
    ``torch.compile`` or tracing the blocks would tie the graph to one n, so ``attend`` runs
    ``is_causal`` there too.

    Every block's mask is a column-shifted view of one additive mask of (p hg, s0 + p) entries, s0
    the last block's start (block [s, e) reads its columns s0 - s .. s0 - s + e), so what
    attention keeps for backward grows with n, not n^2.
    """
    b, h, n = q.shape[:3]
    groups = folded_groups(b, h)
    folded = h // groups  # hg, heads folded into each group's query length
    block = min(n, folded_positions(b, h))  # p positions per call
    last_start = (n - 1) // block * block  # s0
    q = rearrange(q, "b (g hg) n k -> b g (n hg) k", g=groups)  # a view for g = 1 when q came from (b, n, h k)
    k, v = k.expand(-1, groups, -1, -1), v.expand(-1, groups, -1, -1)  # (b, g, n, k), views
    # allowed[r, x]: row r of the block starting at s may read key x - s0 + s
    rows = torch.arange(block * folded, device=q.device) // folded + last_start  # (p hg,)
    allowed = torch.arange(last_start + block, device=q.device) <= rows[:, None]  # (p hg, s0 + p)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    outs = []
    for start, q_block in zip(range(0, n, block), q.split(block * folded, dim=2)):  # split: backward is one cat
        end = min(n, start + block)
        block_mask = mask[: q_block.shape[2], last_start - start : last_start - start + end]  # (rows, end), a view
        out = F.scaled_dot_product_attention(q_block, k[:, :, :end], v[:, :, :end], attn_mask=block_mask)
        outs.append(rearrange(out, "b g (p hg) k -> b p (g hg k)", hg=folded))  # (b, p, h k); a view for g = 1
    return torch.cat(outs, dim=1)  # (b, n, h k)


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
        return self.keys[:, :, :end], self.values[:, :, :end]

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

    One fused bias-free projection produces the h query heads, the single key head, the single
    value head and the two SwiGLU inputs.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        attn_inner, ff_inner = dim_head * heads, dim * ff_mult
        self.split_sizes = (attn_inner, dim_head, dim_head, ff_inner, ff_inner)
        self.norm = nn.LayerNorm(dim, bias=False)
        self.fused_proj = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.attn_out = nn.Linear(attn_inner, dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (b, n, d), rotary cos/sin for its positions -> (b, n, d)."""
        q, k, v, ff = self.project(x, cos, sin)
        return x + apply_linear(self.attn_out, self.attend(q, k, v)) + ff

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q (b, h, n, k), k and v (b, 1, n, k) with rotary applied, and the feed-forward output (b, n, d)."""
        q, k, v, ff = self.fused_projection(self.norm(x))
        q = rearrange(q, "b n (h k) -> b h n k", h=self.heads)
        k, v = rearrange(k, "b n k -> b 1 n k"), rearrange(v, "b n k -> b 1 n k")
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        ff = apply_linear(self.ff_out, swiglu(ff))
        return q, k, v, ff

    def fused_projection(self, x: Tensor) -> tuple[Tensor, ...]:
        """Normalised x (b, n, d) -> q (b, n, h k), k and v (b, n, k), SwiGLU's [value | gate] (b, n, 2f).

        The fused weight is applied in two parts: SwiGLU's backward keeps its input, and as a view
        of a single output it would keep the attention part (and its gradient) alive too.
        """
        attn_sizes = self.split_sizes[:3]
        if not is_plain_linear(self.fused_proj):  # not a plain weight: call the layer
            return self.fused_proj(x).split((*attn_sizes, sum(self.split_sizes[3:])), dim=-1)
        attn_width = sum(attn_sizes)
        q, k, v = linear(x, self.fused_proj.weight[:attn_width]).split(attn_sizes, dim=-1)
        ff = linear(x, self.fused_proj.weight[attn_width:])  # (b, n, 2f)
        return q, k, v.contiguous(), ff  # v copied: attention keeps it, not q and k beside it

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Multi-query attention: q (b, h, n, k) over k, v (b, 1, j, k) -> (b, n, h k).

        Causal when ``mask`` is None; otherwise ``mask`` (b, 1, n, j) bool, True = may attend.
        """
        (b, h, n), cpu = q.shape[:3], q.device.type == "cpu"
        # Folded on the CPU when there are several blocks (one would skip nothing above the diagonal);
        # its number of calls depends on n, so never in a compiled or traced graph.
        if mask is None and cpu and not is_traced() and n > folded_positions(b, h):
            return causal_attention_folded(q, k, v)
        k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)  # (b, h, j, k), views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return rearrange(out, "b h n k -> b n (h k)")

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
        return x + apply_linear(self.attn_out, out) + ff


class PaLM(nn.Module):
    """A PaLM-style decoder-only language model.

    Args:
        num_tokens: vocabulary size.
        dim: model width.
        depth: number of parallel transformer blocks.
        dim_head: width of each attention head.
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
        cos, sin = self.rotary(torch.arange(text.shape[1], device=text.device))
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
            return apply_linear(self.to_logits, x)
        check_tensor("labels", labels)
        if tuple(labels.shape) != tuple(x.shape[:2]) or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be integer token ids of shape (batch, text length) = {tuple(x.shape[:2])}, "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        return linear_cross_entropy(x, self.to_logits.weight, labels)
