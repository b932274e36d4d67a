import pytest
import torch
import torch.nn.functional as F
from conftest import saved_storages
from torch import nn
from torch.testing import assert_close

from flamingo_pytorch import PaLM
from flamingo_pytorch.palm import ParallelTransformerBlock, RotaryEmbedding, apply_rotary


def small_palm() -> PaLM:
    return PaLM(num_tokens=50, dim=32, depth=2, dim_head=8, heads=4, ff_mult=2)


def reference_block(block: ParallelTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """PaLM's parallel block written out: explicit multi-query causal softmax, SwiGLU, rotary."""
    b, n, _ = x.shape
    q, k, v, ff_value, ff_gate = block.fused_proj(block.norm(x)).split(block.split_sizes, dim=-1)
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


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("rows", [512, 12, 8, 4])  # one call; then smaller blocks, some with a shorter tail
def test_folded_causal_attention_equals_is_causal_with_gradients(monkeypatch, rows, groups):
    """The CPU path (heads folded into the query length, blocks of positions) against one
    ``is_causal`` call on expanded key heads: same outputs and gradients, in float64."""
    from flamingo_pytorch import palm

    monkeypatch.setattr(palm, "FOLDED_QUERY_ROWS", rows)
    monkeypatch.setattr(palm, "folded_groups", lambda batch, heads: groups)
    b, h, n, k = 2, 4, 10, 8
    # (b, h, n, k), laid out in memory as (b, n, h, k) like the model's queries
    q = torch.randn(b, n, h, k, dtype=torch.float64).transpose(1, 2).requires_grad_()
    kv = [torch.randn(b, 1, n, k, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    expected = F.scaled_dot_product_attention(q, *(t.expand(-1, h, -1, -1) for t in kv), is_causal=True)
    expected = expected.transpose(1, 2).reshape(b, n, h * k)
    got = palm.causal_attention_folded(q, *kv)
    assert_close(got, expected)
    grad, inputs = torch.randn_like(got), (q, *kv)
    assert_close(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad))


@pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"),
    reason="before torch 2.2 the CPU has no fused attention kernel; the math path keeps no mask",
)
def test_folded_causal_attention_keeps_one_mask_linear_in_length(monkeypatch):
    """Every block reads a view of one (p hg, n) additive mask: backward keeps O(n) mask entries, not
    one mask per block (which would add up to h n^2 / 2)."""
    from flamingo_pytorch import palm

    monkeypatch.setattr(palm, "FOLDED_QUERY_ROWS", 8)  # h = 4 in one group: p = 2 positions a call, 20 calls
    monkeypatch.setattr(palm, "folded_groups", lambda batch, heads: 1)
    b, h, n, k = 1, 4, 40, 8
    q = torch.randn(b, h, n, k, requires_grad=True)
    kv = [torch.randn(b, 1, n, k, requires_grad=True) for _ in range(2)]
    masks = {}

    def pack(tensor):
        if tensor.ndim == 2:  # q, k, v, outputs and log-sum-exps have more dimensions
            masks[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        palm.causal_attention_folded(q, *kv)
    assert list(masks.values()) == [2 * h * n]  # one storage of (p hg, n) entries


def test_folded_groups_give_every_thread_work(monkeypatch):
    from flamingo_pytorch import palm

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert [palm.folded_groups(1, 8), palm.folded_groups(2, 8), palm.folded_groups(1, 3)] == [2, 1, 3]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert [palm.folded_groups(1, 8), palm.folded_groups(4, 8), palm.folded_groups(16, 8)] == [8, 4, 1]


@pytest.mark.parametrize(
    ("rows", "folded_calls"),
    [(8, [1]), (36, [])],  # h = 4 in one group: 2 positions a call (5 calls at n = 9); 9, the whole text: is_causal
)
def test_cpu_block_folds_only_a_text_of_several_blocks(monkeypatch, rows, folded_calls):
    from flamingo_pytorch import palm

    calls = []
    folded = palm.causal_attention_folded
    monkeypatch.setattr(palm, "causal_attention_folded", lambda *args: calls.append(1) or folded(*args))
    monkeypatch.setattr(palm, "FOLDED_QUERY_ROWS", rows)
    monkeypatch.setattr(palm, "folded_groups", lambda batch, heads: 1)
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 9, 32)
    cos, sin = RotaryEmbedding(8)(torch.arange(9))
    assert_close(block(x, cos, sin), reference_block(block, x))
    assert calls == folded_calls


def test_compiled_block_stays_shape_generic(monkeypatch):
    """Under torch.compile the folded path, whose number of attention calls depends on n, is not
    traced (the graph would be tied to one length): the block is one graph, without a break."""
    import torch._dynamo

    from flamingo_pytorch import palm

    def fail(*args):
        raise AssertionError("the folded attention was traced")

    monkeypatch.setattr(palm, "causal_attention_folded", fail)
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 9, 32)
    cos, sin = RotaryEmbedding(8)(torch.arange(9))
    explanation = torch._dynamo.explain(block)(x, cos, sin)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_fused_projection_in_two_parts_equals_the_whole_and_keeps_less():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    q, k, v, ff_value, ff_gate = block.fused_proj(x).split(block.split_sizes, dim=-1)
    whole = (q, k, v, torch.cat((ff_value, ff_gate), dim=-1))
    for got, want in zip(block.fused_projection(x), whole):
        assert_close(got, want)
    calls = []
    block.fused_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    for got, want in zip(block.fused_projection(x), whole):  # a hooked layer is called as a module
        assert_close(got, want, rtol=0, atol=0)
    assert calls == [(2, 9, block.fused_proj.out_features)]


def test_swiglu_keeps_only_the_feed_forward_part_of_the_projection():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2).requires_grad_(False)  # frozen LM
    x = torch.randn(2, 9, 32, requires_grad=True)
    cos, sin = RotaryEmbedding(8)(torch.arange(9))
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    activations = [
        size for pointer, size in saved_storages(lambda: block(x, cos, sin)).items() if pointer not in weights
    ]
    assert max(activations) == 2 * 9 * 2 * 64  # value and gate, (b, n, 2f)


def test_multi_query_projection_sizes_and_no_biases():
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    assert block.fused_proj.out_features == 4 * 8 + 8 + 8 + 2 * 64  # h query heads, one key head, one value head
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
    """Compiled code takes other routes (one is_causal call, F.linear, SwiGLU's concatenated
    gradient): its loss and gradients match eager mode's."""
    block = ParallelTransformerBlock(dim=32, dim_head=8, heads=4, ff_mult=2)
    x = torch.randn(2, 80, 32, requires_grad=True)  # long enough for the folded attention in eager mode
    cos, sin = RotaryEmbedding(8)(torch.arange(80))

    def grads(run):
        out = run(x, cos, sin).square().sum()
        return torch.autograd.grad(out, [x, *block.parameters()])

    for got, want in zip(grads(torch.compile(block)), grads(block)):
        assert_close(got, want, rtol=1e-4, atol=1e-4)
