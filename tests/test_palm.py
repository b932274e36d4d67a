import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from flamingo_pytorch import PaLM
from flamingo_pytorch.palm import ParallelTransformerBlock, RotaryEmbedding, apply_rotary


def small_palm() -> PaLM:
    return PaLM(num_tokens=50, dim=32, depth=2, dim_head=8, heads=4, ff_mult=2)


def reference_block(block: ParallelTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """PaLM's parallel block written out: explicit multi-query causal softmax, SwiGLU, rotary."""
    b, n, _ = x.shape
    q, k, v = block.attn_in(block.norm(x)).split(block.attn_sizes, dim=-1)
    ff = block.ff_in(block.norm(x))
    ff_value, ff_gate = ff.chunk(2, dim=-1)
    q = q.view(b, n, block.heads, -1).transpose(1, 2)  # (b, h, n, k)
    cos, sin = RotaryEmbedding(q.shape[-1])(torch.arange(n))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # k, v: one head (b, n, k)
    scores = torch.einsum("bhik,bjk->bhij", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("bhij,bjk->bhik", scores.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)
    return x + block.attn_out(attn) + block.ff_out(ff_value * torch.sigmoid(ff_gate) * ff_gate)


def test_block_matches_reference():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 9, 32)
    cos, sin = RotaryEmbedding(8)(torch.arange(9))
    assert_close(block(x, cos, sin), reference_block(block, x))


def test_float64_layer_passes_gradcheck_and_gradgradcheck():
    """Every op runs in the input's dtype (rotary included), and second derivatives are right. SDPA's
    fused CPU and GPU kernels refuse a double backward loudly; its math backend computes it."""
    block = ParallelTransformerBlock(dim=8, dim_head=4, heads=2, ff_mult=2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = RotaryEmbedding(4)(torch.arange(5), torch.float64)
    assert cos.dtype == torch.float64 and block(x, cos, sin).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: block(x, cos, sin), (x,))
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(lambda x: block(x, cos, sin), (x,))


def test_float64_palm_computes_in_float64():
    palm = small_palm().double()
    text = torch.randint(0, 50, (2, 7))
    logits = palm(text)
    assert logits.dtype == torch.float64
    loss = palm(text, labels=text)
    assert loss.dtype == torch.float64
    assert_close(loss, F.cross_entropy(logits.flatten(0, 1), text.flatten()), rtol=1e-12, atol=1e-12)


def test_multi_query_projection_sizes_and_no_biases():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    assert block.attn_in.out_features == 4 * 8 + 8 + 8  # h query heads, one key head, one value head
    assert block.ff_in.out_features == 2 * 64  # SwiGLU's value and gate
    palm = small_palm()
    for module in palm.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            assert module.bias is None


def test_embedding_is_tied_to_the_output_projection():
    palm = small_palm()
    assert palm.to_logits.weight is palm.token_emb.weight


def test_causal_a_token_never_sees_later_tokens():
    palm = small_palm()
    text = torch.randint(0, 50, (1, 10))
    changed = text.clone()
    changed[0, 6] = (text[0, 6] + 1) % 50
    differs = (palm(text) - palm(changed)).abs().amax(-1)[0] > 0
    assert not differs[:6].any() and differs[6:].all()


def test_rotary_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rotary = RotaryEmbedding(8)

    def score(i: int, j: int) -> torch.Tensor:
        cos_i, sin_i = rotary(torch.tensor([i]))
        cos_j, sin_j = rotary(torch.tensor([j]))
        return (apply_rotary(q, cos_i, sin_i) * apply_rotary(k, cos_j, sin_j)).sum()

    assert_close(score(3, 1), score(503, 501))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotary_angles_stay_float32_in_a_bfloat16_model():
    palm = small_palm().to(torch.bfloat16)
    cos, _ = palm.rotary(torch.arange(300))
    assert cos.dtype == torch.float32
    # in bfloat16, positions 256 and 257 would round to the same number
    assert not torch.equal(cos[256], cos[257])
    logits = palm(torch.randint(0, 50, (1, 300)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_batched_positions_give_per_row_tables():
    rotary = RotaryEmbedding(8)
    cos, _ = rotary(torch.tensor([[0, 1, 2], [5, 6, 7]]))
    assert cos.shape == (2, 1, 3, 8)
    assert_close(cos[1, 0], rotary(torch.arange(5, 8))[0])


def test_compiled_block_trains_like_the_eager_one():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 80, 32, requires_grad=True)
    cos, sin = RotaryEmbedding(8)(torch.arange(80))

    def grads(run):
        out = run(x, cos, sin).square().sum()
        return torch.autograd.grad(out, [x, *block.parameters()])

    for got, want in zip(grads(torch.compile(block)), grads(block)):
        assert_close(got, want, rtol=1e-4, atol=1e-4)
