import pytest
import torch
from torch import nn
from torch.testing import assert_close

from flamingo_pytorch import GatedCrossAttentionBlock, MaskedCrossAttention
from flamingo_pytorch.cross_attention import media_index

B, N, T, M, D = 2, 12, 3, 4, 16


def make_attention(immediate: bool = True, media_dim: int | None = None) -> MaskedCrossAttention:
    return MaskedCrossAttention(dim=D, dim_head=8, heads=2, only_attend_immediate_media=immediate, media_dim=media_dim)


def reference(attn, x, media, media_locations, time_mask):
    """Token by token: softmax over the latents of exactly the items the token may read, else zero."""
    b, n, _ = x.shape
    t, m = media.shape[1:3]
    q = attn.to_q(attn.norm(x)).view(b, n, attn.heads, -1)  # (b, n, h, k)
    k, v = (z.view(b, t, m, attn.heads, -1) for z in attn.to_kv(media).chunk(2, dim=-1))
    index = media_locations.long().cumsum(-1) if media_locations is not None else torch.full((b, n), t)
    real = time_mask if time_mask is not None else torch.ones(b, t, dtype=torch.bool)
    out = torch.zeros(b, n, attn.heads, q.shape[-1])
    for row in range(b):
        for i in range(n):
            j = int(index[row, i])
            if attn.only_attend_immediate_media and media_locations is not None:
                items = [j - 1] if 1 <= j <= t else []
            else:
                items = list(range(min(j, t)))
            items = [item for item in items if real[row, item]]
            if not items:
                continue
            keys = k[row, items].flatten(0, 1)  # (len(items) m, h, k)
            values = v[row, items].flatten(0, 1)
            weights = torch.einsum("hk,jhk->hj", q[row, i], keys) / q.shape[-1] ** 0.5
            out[row, i] = torch.einsum("hj,jhk->hk", weights.softmax(-1), values)
    return attn.to_out(out.flatten(2))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    media = torch.randn(B, T, M, D, generator=g)
    media_locations = torch.zeros(B, N, dtype=torch.bool)
    media_locations[0, [2, 6, 9]] = True  # three items; tokens 0-1 see none
    media_locations[1, [0, 4, 5, 8]] = True  # four media tokens for three items: tokens 8+ point past the end
    time_mask = torch.tensor([[True, True, True], [True, False, True]])  # row 1, item 2 is padding
    return x, media, media_locations, time_mask


@pytest.mark.parametrize("immediate", [True, False])
@pytest.mark.parametrize("use_locations", [True, False])
@pytest.mark.parametrize("use_time_mask", [True, False])
def test_matches_token_by_token_reference(immediate, use_locations, use_time_mask):
    attn = make_attention(immediate)
    x, media, locations, time_mask = inputs()
    locations = locations if use_locations else None
    time_mask = time_mask if use_time_mask else None
    assert_close(attn(x, media, locations, time_mask), reference(attn, x, media, locations, time_mask))


@pytest.mark.parametrize("immediate", [True, False])
def test_tokens_that_may_read_nothing_are_exactly_zero(immediate):
    attn = make_attention(immediate)
    x, media, locations, time_mask = inputs()
    out = attn(x, media, locations, time_mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], torch.zeros(2, D))  # before the first media token
    if immediate:
        assert torch.equal(out[1, 4], torch.zeros(D))  # index 2 is a padded item
        assert torch.equal(out[1, 8:], torch.zeros(N - 8, D))  # index 4: past the last of the three items
        assert (out[1, 5:8] != 0).any(dim=-1).all()  # index 3: a real item


@pytest.mark.parametrize("immediate", [True, False])
def test_changing_an_item_changes_exactly_the_tokens_that_read_it(immediate):
    attn = make_attention(immediate)
    x, media, locations, _ = inputs()
    index = media_index(locations)
    for item in range(T):
        changed = media.clone()
        changed[:, item] += 1.0
        differs = (attn(x, media, locations) - attn(x, changed, locations)).abs().amax(-1) > 0  # (b, n)
        reads = index == item + 1 if immediate else index >= item + 1
        assert torch.equal(differs, reads)


def test_non_immediate_rows_that_see_only_padding_are_zero():
    attn = make_attention(immediate=False)
    x, media, locations, _ = inputs()
    time_mask = torch.tensor([[False, True, True], [True, True, True]])
    out = attn(x, media, locations, time_mask)
    assert torch.equal(out[0, :6], torch.zeros(6, D))  # row 0 reads only item 1 (padding) before token 6
    assert (out[0, 6:] != 0).any(dim=-1).all()


def test_padded_items_change_nothing():
    attn = make_attention(immediate=False)
    x, media, locations, time_mask = inputs()
    changed = media.clone()
    changed[1, 1] = 100.0  # the padded item of row 1
    assert torch.equal(attn(x, media, locations, time_mask), attn(x, changed, locations, time_mask))


def test_gradients_are_finite_where_rows_are_empty():
    attn = make_attention()
    x, media, locations, time_mask = inputs()
    x.requires_grad_(True)
    attn(x, media, locations, time_mask).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_media_of_another_width():
    attn = make_attention(media_dim=24)
    x, _, locations, time_mask = inputs()
    media = torch.randn(B, T, M, 24)
    out = attn(x, media, locations, time_mask)
    assert out.shape == (B, N, D)
    assert_close(out, reference(attn, x, media, locations, time_mask))


def test_gated_block_is_identity_at_init_and_gates_weigh_each_branch():
    block = GatedCrossAttentionBlock(dim=D, dim_head=8, heads=2, ff_mult=2)
    x, media, locations, time_mask = inputs()
    assert torch.equal(block(x, media, locations, time_mask), x)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(-0.3)
    y = x + torch.tanh(torch.tensor(0.5)) * block.attn(x, media, locations, time_mask)
    expected = y + torch.tanh(torch.tensor(-0.3)) * block.ff(y)
    assert_close(block(x, media, locations, time_mask), expected)


def test_no_linear_layer_has_a_bias():
    block = GatedCrossAttentionBlock(dim=D, dim_head=8, heads=2)
    linears = [module for module in block.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 5 and all(module.bias is None for module in linears)


def test_bfloat16_is_finite():
    attn = make_attention().to(torch.bfloat16)
    x, media, locations, time_mask = inputs()
    out = attn(x.bfloat16(), media.bfloat16(), locations, time_mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out[0, :2], torch.zeros(2, D, dtype=torch.bfloat16))


def test_mismatched_shapes_raise():
    attn = make_attention()
    x, media, locations, time_mask = inputs()
    with pytest.raises(ValueError, match="media_locations must have shape"):
        attn(x, media, locations[:, :-1])
    with pytest.raises(ValueError, match="media has batch 1 but x has batch 2"):
        attn(x, media[:1], locations)
    with pytest.raises(ValueError, match="time_mask must have shape"):
        attn(x, media, locations, time_mask[:, :2])
    with pytest.raises(TypeError, match="media_locations must be a bool tensor"):
        attn(x, media, locations.float())
    with pytest.raises(ValueError, match="media must have shape"):
        attn(x, media[:, 0], locations)
    with pytest.raises(ValueError, match="feature size 16"):
        attn(x, media[..., :8], locations)


def test_masks_given_as_0_1_integers_equal_bool_masks_and_other_integers_raise():
    """As transformers accepts its attention_mask: 0/1 integers of any integer dtype read as bool."""
    block = GatedCrossAttentionBlock(dim=D, dim_head=4, heads=2)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
    x, media, locations, time_mask = inputs()
    want = block(x, media, locations, time_mask)
    assert torch.equal(block(x, media, locations.long(), time_mask.to(torch.uint8)), want)
    assert torch.equal(block(x, media, locations.int(), time_mask.long()), want)
    with pytest.raises(ValueError, match=r"time_mask holds integers other than 0 and 1: \[0, 2\]"):
        block(x, media, locations, time_mask.long() * 2)
    with pytest.raises(ValueError, match="media_locations holds integers other than 0 and 1"):
        block(x, media, locations.long() - 1, time_mask)
    with pytest.raises(TypeError, match="time_mask must be a bool tensor"):
        block(x, media, locations, time_mask.float())
