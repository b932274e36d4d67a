import pytest
import torch
from torch.testing import assert_close

from flamingo_pytorch import PerceiverResampler
from flamingo_pytorch.perceiver import PerceiverAttention


def small_resampler(**overrides) -> PerceiverResampler:
    config = dict(dim=16, depth=2, dim_head=8, heads=2, num_latents=3, num_time_embeds=4, ff_mult=2)
    return PerceiverResampler(**{**config, **overrides})


def test_output_shape_for_items_and_single_item():
    resampler = small_resampler()
    assert resampler(torch.randn(2, 3, 5, 16)).shape == (2, 3, 3, 16)
    assert resampler(torch.randn(2, 5, 16)).shape == (2, 1, 3, 16)


def test_attention_matches_reference():
    attn = PerceiverAttention(dim=16, dim_head=8, heads=2)
    media, latents = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    normed_media, normed_latents = attn.norm_media(media), attn.norm_latents(latents)
    q = attn.to_q(normed_latents).view(3, 4, 2, 8).transpose(1, 2)
    kv = attn.to_kv(torch.cat((normed_media, normed_latents), dim=1))
    k, v = (z.reshape(3, 9, 2, 8).transpose(1, 2) for z in kv.chunk(2, dim=-1))
    weights = (q @ k.transpose(-1, -2) / 8**0.5).softmax(dim=-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(3, 4, 16))
    assert_close(attn(media, latents), expected)


def test_media_items_are_resampled_independently():
    resampler = small_resampler()
    media = torch.randn(2, 3, 5, 16)
    changed = media.clone()
    changed[:, 1] += torch.randn(2, 5, 16)
    before, after = resampler(media), resampler(changed)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_time_embedding_distinguishes_item_positions():
    resampler = small_resampler()
    item = torch.randn(1, 1, 5, 16)
    out = resampler(item.repeat(1, 2, 1, 1))
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_without_time_embeddings_items_differ_only_by_content():
    """num_time_embeds=None (OpenFlamingo's released resamplers): any number of items, each resampled alone."""
    resampler = PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, num_time_embeds=None)
    item = torch.randn(1, 1, 5, 16)
    out = resampler(item.expand(1, 40, 5, 16))
    assert resampler.time_embeds is None and out.shape == (1, 40, 3, 16)
    assert_close(out, resampler(item).expand(1, 40, 3, 16))


def test_too_many_items_raise():
    with pytest.raises(ValueError, match="num_time_embeds=4"):
        small_resampler()(torch.randn(1, 5, 5, 16))


def test_wrong_width_and_rank_raise():
    with pytest.raises(ValueError, match="feature size 16"):
        small_resampler()(torch.randn(1, 2, 5, 12))
    with pytest.raises(ValueError, match="num_frame_embeds"):
        small_resampler()(torch.randn(1, 2, 3, 5, 16))
    with pytest.raises(ValueError, match="shape"):
        small_resampler()(torch.randn(5, 16))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        small_resampler()([[0.0]])


def test_video_frames_get_trained_frame_embeddings():
    resampler = small_resampler(num_frame_embeds=3)
    video = torch.randn(2, 2, 3, 5, 16)  # (b, t, f, p, d)
    out = resampler(video)
    assert out.shape == (2, 2, 3, 16)
    out.sum().backward()
    assert resampler.frame_embeds.grad is not None and resampler.frame_embeds.grad.abs().sum() > 0
    # frame order matters: swapping two frames changes the result
    assert not torch.allclose(out, resampler(video[:, :, [1, 0, 2]]))
    with pytest.raises(ValueError, match="num_frame_embeds=3"):
        resampler(torch.randn(1, 1, 4, 5, 16))


def test_images_still_accepted_by_a_video_resampler():
    resampler = small_resampler(num_frame_embeds=2)
    assert resampler(torch.randn(1, 2, 5, 16)).shape == (1, 2, 3, 16)


def test_invalid_constructor_arguments_raise():
    with pytest.raises(ValueError, match="depth"):
        small_resampler(depth=0)
    with pytest.raises(ValueError, match="num_latents"):
        small_resampler(num_latents=0)
