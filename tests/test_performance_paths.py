"""The fast paths compute exactly what the plain ones do: segmented immediate cross-attention
against the dense masked reference, activation checkpointing against storing activations,
and the frozen language model in flamingo mode against a model that never computes its gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, dense_and_segmented, open_gates, tiny_image_encoder
from torch.utils._python_dispatch import TorchDispatchMode

from flamingo_pytorch import FlamingoPaLM, PaLM, immediate_media
from flamingo_pytorch.cross_attention import MaskedCrossAttention, media_index
from flamingo_pytorch.immediate_media import immediate_chunk_size, immediate_chunks, immediate_num_overflow


def random_layout(b: int, n: int, t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """media_locations (b, n) and time_mask (b, t): each row its own density, padding and lead-in text."""
    density = torch.rand(b, 1, generator=generator)
    locations = torch.rand(b, n, generator=generator) < density * 0.5
    locations[:, : int(torch.randint(0, 4, (), generator=generator))] = False  # text before the first media
    time_mask = torch.rand(b, t, generator=generator) < 0.75
    return locations, time_mask


@pytest.mark.parametrize("seed", range(6))
def test_segmented_immediate_attention_equals_dense_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    n, t = (int(torch.randint(1, high, (), generator=generator)) for high in (40, 7))
    b, m = 3, 3
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2)
    x = torch.randn(b, n, 16, generator=generator, requires_grad=True)
    media = torch.randn(b, t, m, 16, generator=generator, requires_grad=True)
    locations, time_mask = random_layout(b, n, t, generator)
    for mask in (time_mask, None):
        segmented, dense, _ = dense_and_segmented(attn, x, media, locations, mask)
        torch.testing.assert_close(segmented, dense)
        cotangent = torch.randn(segmented.shape, generator=generator)
        grads = torch.autograd.grad(segmented, (x, media), cotangent, retain_graph=True)
        expected = torch.autograd.grad(dense, (x, media), cotangent)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("n", "t"), [(1, 5), (7, 3), (13, 4), (64, 32), (100, 7)])
def test_worst_case_layouts_fit_the_chunk_slots(n, t):
    """Segments one token longer than a multiple of the chunk need the most chunks; all still fit."""
    chunk = immediate_chunk_size(n, t, 2)
    assert (t + immediate_num_overflow(n, chunk)) * chunk <= 5 * n + 4 * t  # score work ~ n, not n * t
    locations = torch.zeros(1, n, dtype=torch.bool)
    position = 0
    for _ in range(t):  # each item's segment: chunk + 1 tokens, then whatever is left
        if position < n:
            locations[0, position] = True
        position += chunk + 1
    attn = MaskedCrossAttention(dim=8, dim_head=4, heads=2)
    x, media = torch.randn(1, n, 8), torch.randn(1, t, 2, 8)
    segmented, dense, _ = dense_and_segmented(attn, x, media, locations, None)
    torch.testing.assert_close(segmented, dense)


@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_every_media_layout_of_short_texts_matches_dense(t):
    """All 2^n placements of media tokens in n <= 7 tokens at once (one per batch row), padding included."""
    attn = MaskedCrossAttention(dim=8, dim_head=4, heads=2)
    for n in range(1, 8):
        rows = torch.arange(2**n)
        locations = (rows[:, None] >> torch.arange(n)) & 1 == 1  # (2^n, n): row r places media at r's bits
        time_mask = torch.rand(2**n, t, generator=torch.Generator().manual_seed(n)) < 0.8
        x, media = torch.randn(2**n, n, 8), torch.randn(2**n, t, 2, 8)
        for mask in (time_mask, None):
            segmented, dense, _ = dense_and_segmented(attn, x, media, locations, mask)
            torch.testing.assert_close(segmented, dense)


@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_chunk_layout_places_every_token_in_a_chunk_of_its_own_item(t):
    """Every placement of media in n <= 8 tokens, every chunk size: each reading token sits in its own
    item's first chunk or in an overflow chunk reading that item, and the slots always suffice."""
    for n in range(1, 9):
        rows = torch.arange(2**n)
        index = media_index((rows[:, None] >> torch.arange(n)) & 1 == 1)  # (2^n, n): media at row r's bits
        for chunk in range(1, n + 1):
            chunk_token, overflow_item, token_row, reads = immediate_chunks(index, None, t, chunk)
            bound = immediate_num_overflow(n, chunk)
            lengths = torch.stack([(index == j).sum(dim=1) for j in range(1, t + 1)], dim=1)  # (2^n, t)
            needed = int(((lengths - chunk).clamp(min=0) + chunk - 1).div(chunk, rounding_mode="floor").sum(1).max())
            assert needed <= bound
            assert overflow_item.shape[1] == bound  # static: no shape depends on the data
            assert int(token_row.max()) < chunk_token.shape[1]
            assert torch.equal(reads, (index >= 1) & (index <= t))
            positions = torch.arange(n).expand(2**n, n)
            assert torch.equal(chunk_token.gather(1, token_row)[reads], positions[reads])
            slot = token_row // chunk
            overflow = (slot - t).clamp(min=0).clamp(max=max(overflow_item.shape[1] - 1, 0))
            item = torch.where(slot < t, slot, overflow_item.gather(1, overflow) if overflow_item.numel() else slot)
            assert torch.equal(item[reads], (index - 1)[reads])


def test_tokens_that_read_nothing_get_exact_zeros():
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2)
    # row 0: text before the first media, then more media tokens (4) than items (2);
    # row 1: the second item is padding.
    locations = torch.tensor([[0, 0, 1, 0, 1, 0, 1, 0, 1, 0], [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    time_mask = torch.tensor([[True, True], [True, False]])
    x = torch.randn(2, 10, 16, requires_grad=True)
    media = torch.randn(2, 2, 3, 16)
    segmented, dense, index = dense_and_segmented(attn, x, media, locations, time_mask)
    reads_nothing = (index == 0) | (index > 2)
    reads_nothing[1] |= index[1] == 2
    assert torch.equal(segmented[reads_nothing], torch.zeros_like(segmented[reads_nothing]))
    assert segmented[~reads_nothing].abs().amin() > 0
    torch.testing.assert_close(segmented, dense)
    (grad,) = torch.autograd.grad(segmented.sum(), x)
    assert torch.isfinite(grad).all()
    no_items, _, _ = dense_and_segmented(attn, x, media[:, :0], locations, time_mask[:, :0])
    assert torch.equal(no_items, torch.zeros_like(no_items))
    no_text, _, _ = dense_and_segmented(attn, x[:, :0], media, locations[:, :0], time_mask)
    assert no_text.shape == (2, 0, 16)
    no_rows, _, _ = dense_and_segmented(attn, x[:0], media[:0], locations[:0], time_mask[:0])
    assert no_rows.shape == (0, 10, 16)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # jit.trace is deprecated
def test_a_traced_block_keeps_the_static_layout_and_serves_other_layouts():
    from flamingo_pytorch import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(dim=16, dim_head=4, heads=2)
    open_gates(block)
    x, media = torch.randn(2, 12, 16), torch.randn(2, 3, 2, 16)
    even = torch.zeros(2, 12, dtype=torch.bool)
    even[:, [0, 4, 8]] = True  # segments of 4 tokens: no overflow chunk needed
    one_long = torch.zeros(2, 12, dtype=torch.bool)
    one_long[:, [0, 1, 2]] = True  # the last segment holds 10 tokens: overflow chunks needed
    traced = torch.jit.trace(block, (x, media, even), check_trace=False)
    torch.testing.assert_close(traced(x, media, one_long), block(x, media, one_long))


def test_one_token_steps_with_offset_indices_match_the_full_text():
    """Decoding calls attend with n = 1 and the running media index: same rows as the full call."""
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2)
    generator = torch.Generator().manual_seed(3)
    locations, time_mask = random_layout(2, 12, 3, generator)
    x, media = torch.randn(2, 12, 16), torch.randn(2, 3, 4, 16)
    k, v = attn.project_media(media)
    index = media_index(locations)
    full = attn.attend(x, k, v, index, time_mask)
    steps = torch.cat([attn.attend(x[:, i : i + 1], k, v, index[:, i : i + 1], time_mask) for i in range(12)], dim=1)
    torch.testing.assert_close(steps, full)
    torch.testing.assert_close(attn.attend(x, k, v, index.int(), time_mask), full)  # any integer dtype


def forbid(monkeypatch, *paths: str) -> None:
    """Make the named functions of ``immediate_media`` fail if called."""
    for path in paths:

        def fail(*args, path=path, **kwargs):
            raise AssertionError(f"{path} ran")

        monkeypatch.setattr(immediate_media, path, fail)


def check_against_dense(n: int, t: int, seed: int) -> None:
    """attend() on a random layout equals the dense reference, gradients and exact zeros included,
    for running indices that start anywhere (0, inside, past t) as in decoding."""
    generator = torch.Generator().manual_seed(seed)
    attn = MaskedCrossAttention(dim=16, dim_head=4, heads=2)
    b = 8
    x = torch.randn(b, n, 16, generator=generator, requires_grad=True)
    media = torch.randn(b, t, 3, 16, generator=generator, requires_grad=True)
    locations, time_mask = random_layout(b, n, t, generator)
    offset = torch.randint(0, t + 2, (b, 1), generator=generator)  # media tokens before this text
    index = media_index(locations) + offset
    k, v = attn.project_media(media)
    for mask in (time_mask, None):
        got = attn.attend(x, k, v, index, mask)
        want = attn.to_out(attn.attend_dense(attn.to_q(attn.norm(x)), k, v, index, mask))
        torch.testing.assert_close(got, want)
        reads = (index >= 1) & (index <= t)
        if mask is not None:
            reads &= mask.gather(1, (index - 1).clamp(0, t - 1))
        assert torch.equal(got[~reads], torch.zeros_like(got[~reads]))
        cotangent = torch.randn(got.shape, generator=generator)
        grads = torch.autograd.grad(got, (x, media), cotangent, retain_graph=True)
        expected = torch.autograd.grad(want, (x, media), cotangent, retain_graph=True)
        for grad, expected_grad in zip(grads, expected):
            torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize(("n", "t"), [(1, 4), (3, 3), (5, 8)])
def test_texts_no_longer_than_the_media_gather_each_tokens_item(monkeypatch, n, t):
    """n <= t (a decoding step has n = 1): each token reads a gathered copy of its own item."""
    forbid(monkeypatch, "immediate_chunks", "attend_one_item")
    check_against_dense(n, t, seed=n * 10 + t)


@pytest.mark.parametrize("n", [1, 12])
def test_a_single_item_is_read_in_place(monkeypatch, n):
    forbid(monkeypatch, "immediate_chunks", "attend_per_token")
    check_against_dense(n, 1, seed=n)


@pytest.mark.parametrize(("n", "t"), [(5, 4), (40, 3)])
def test_longer_texts_use_the_chunk_layout(monkeypatch, n, t):
    forbid(monkeypatch, "attend_per_token", "attend_one_item")
    check_against_dense(n, t, seed=n + t)


def flamingo_batch(n: int = 12, t: int = 2):
    text = torch.randint(4, TINY["num_tokens"], (2, n))
    text[:, [1, 6, 9][:t]] = TINY["media_token_id"]
    images = torch.randn(2, t, 3, 8, 8)
    return text, images


def grads_after_backward(model: torch.nn.Module, text, images=None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(text) if images is None else model(text, images)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), text.flatten()).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_images", [False, True])
def test_activation_checkpointing_gives_identical_gradients(with_images):
    torch.manual_seed(0)
    plain = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()).train()
    open_gates(plain, 0.5)
    recomputing = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder(), checkpoint_activations=True).train()
    recomputing.load_state_dict(plain.state_dict())
    text, images = flamingo_batch()
    images = images if with_images else None
    expected, got = grads_after_backward(plain, text, images), grads_after_backward(recomputing, text, images)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_palm_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    config = dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, ff_mult=2)
    plain, recomputing = PaLM(**config).train(), PaLM(**config, checkpoint_activations=True).train()
    recomputing.load_state_dict(plain.state_dict())
    text = torch.randint(0, 64, (2, 10))
    expected, got = grads_after_backward(plain, text), grads_after_backward(recomputing, text)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("checkpoint_activations", [False, True])
def test_frozen_language_model_never_gets_gradients(checkpoint_activations):
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder(), checkpoint_activations=checkpoint_activations)
    model.train()
    open_gates(model, 0.5)
    grads = grads_after_backward(model, *flamingo_batch())
    assert all(p.grad is None for p in model.palm.parameters())
    assert all(p.grad is None for p in model.img_encoder.parameters())
    trained = {name for name, _ in model.named_parameters() if name.startswith(("perceiver", "gated"))}
    trained.discard("perceiver_resampler.frame_embeds")  # images, not videos
    assert set(grads) == trained


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every floating-point tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.shapes.append(tuple(value.shape))
        return out


@pytest.mark.parametrize("checkpoint_activations", [False, True])
def test_no_text_by_text_float_matrix_in_training(checkpoint_activations):
    """Causal self-attention and immediate cross-attention build no (n, n) or (n, t m) float scores
    or masks in forward or backward."""
    n = 37  # a length no other dimension of the tiny model shares
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder(), checkpoint_activations=checkpoint_activations)
    model.train()
    text, images = flamingo_batch(n, t=3)  # t m = 12, another width no other dimension shares
    recorder = ShapeRecorder()
    with recorder:
        logits = model(text, images)
        logits.sum().backward()
    assert recorder.shapes, "the recorder saw no ops"
    t_times_m = images.shape[1] * TINY["perceiver_num_latents"]
    wide = [s for s in recorder.shapes if len(s) >= 2 and s[-2] == n and s[-1] in (n, t_times_m)]
    assert wide == []


@pytest.mark.parametrize(("n", "t"), [(9, 3), (2, 3), (9, 1)])  # chunk layout, per token, one item
def test_immediate_cross_attention_traces_as_one_graph(n, t):
    """Static shapes, no host sync: torch.compile takes the whole gated block as one graph (fullgraph
    raises at a graph break) and computes what eager mode does."""
    from flamingo_pytorch import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(dim=16, dim_head=4, heads=2)
    locations = torch.zeros(2, n, dtype=torch.bool)
    locations[:, [position for position in (0, 4, 6)[:t] if position < n]] = True
    open_gates(block)
    inputs = (torch.randn(2, n, 16), torch.randn(2, t, 2, 16), locations)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(*inputs), block(*inputs), rtol=1e-5, atol=1e-5)
