import pytest
import torch
from conftest import IMAGE_SIZE, TINY, open_gates, tiny_image_encoder
from torch import nn
from torch.testing import assert_close

from flamingo_pytorch import FlamingoPaLM
from flamingo_pytorch.cross_attention import media_index

MEDIA = TINY["media_token_id"]


def prompt(batch: int = 2, length: int = 12, media_positions=(2, 7)) -> torch.Tensor:
    text = torch.randint(4, TINY["num_tokens"], (batch, length))
    text[:, list(media_positions)] = MEDIA
    return text


def images(batch: int = 2, items: int = 2) -> torch.Tensor:
    return torch.randn(batch, items, 3, IMAGE_SIZE, IMAGE_SIZE)


def trainable(model: nn.Module) -> set:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_logits_shape(tiny_model):
    assert tiny_model(prompt()).shape == (2, 12, TINY["num_tokens"])
    assert tiny_model(prompt(), images()).shape == (2, 12, TINY["num_tokens"])


def test_closed_gates_give_the_language_model(tiny_model):
    text = prompt()
    expected = tiny_model(text)
    assert torch.equal(tiny_model(text, images()), expected)
    padded = text.clone()
    padded[0, 7] = 9  # row 0: one image, its second item padding
    time_mask = torch.tensor([[True, False], [True, True]])
    assert torch.equal(tiny_model(padded, images(), time_mask=time_mask), tiny_model(padded))
    assert torch.equal(tiny_model(text, image_embeds=torch.randn(2, 2, 4, TINY["dim"])), expected)
    assert torch.equal(tiny_model(text, videos=torch.randn(2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)), expected)
    assert torch.equal(tiny_model.palm(text), expected)


def test_a_gated_block_reads_media_before_every_nth_layer():
    model = FlamingoPaLM(**{**TINY, "depth": 5, "cross_attn_every": 2})
    assert len(model.gated_cross_attn) == 3  # before layers 0, 2, 4
    order = []
    for i, layer in enumerate(model.palm.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: order.append(f"layer{i}"))
    for i, block in enumerate(model.gated_cross_attn):
        block.register_forward_pre_hook(lambda *_, i=i: order.append(f"xattn{i}"))
    model(prompt(), image_embeds=torch.randn(2, 2, 4, TINY["dim"]))
    assert order == ["xattn0", "layer0", "layer1", "xattn1", "layer2", "layer3", "xattn2", "layer4"]


def test_each_token_is_affected_only_by_the_image_it_follows(tiny_model):
    open_gates(tiny_model)
    text, pixels = prompt(), images()
    changed = pixels.clone()
    changed[:, 1] += 1.0  # the second image, at text position 7
    differs = (tiny_model(text, pixels) - tiny_model(text, changed)).abs().amax(-1) > 0  # (b, n)
    assert not differs[:, :7].any() and differs[:, 7:].all()
    first_changed = pixels.clone()
    first_changed[:, 0] += 1.0  # the first image, at position 2: read by tokens 2..6 (and 7+ through them)
    differs = (tiny_model(text, pixels) - tiny_model(text, first_changed)).abs().amax(-1) > 0
    assert not differs[:, :2].any() and differs[:, 2:].all()


def test_padded_images_change_nothing(tiny_model):
    open_gates(tiny_model)
    text, pixels = prompt(), images()
    text[0, 7] = 9  # row 0 has one image; its second item is padding, with no <image> token
    time_mask = torch.tensor([[True, False], [True, True]])
    changed = pixels.clone()
    changed[0, 1] = 5.0
    assert torch.equal(tiny_model(text, pixels, time_mask=time_mask), tiny_model(text, changed, time_mask=time_mask))


def test_media_locations_come_from_the_media_token(tiny_model):
    text = prompt(media_positions=(0, 5))
    assert media_index(text == MEDIA)[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]


def test_media_freeze_the_language_model_and_text_alone_unfreezes_it(tiny_model):
    flamingo = {name for name, _ in tiny_model.named_parameters() if name.startswith(("perceiver", "gated"))}
    encoder = {name for name, _ in tiny_model.named_parameters() if name.startswith("img_encoder")}
    assert encoder and flamingo
    assert {id(p) for p in tiny_model.flamingo_parameters()} == {
        id(p) for name, p in tiny_model.named_parameters() if name in flamingo
    }
    open_gates(tiny_model, 0.5)
    tiny_model(prompt(), images()).sum().backward()
    assert trainable(tiny_model) == flamingo
    for name, param in tiny_model.named_parameters():
        used = name in flamingo and "frame_embeds" not in name  # images don't use the video frame embeddings
        assert (param.grad is not None) == used, name
    tiny_model.zero_grad(set_to_none=True)
    tiny_model(prompt()).sum().backward()
    everything = {name for name, _ in tiny_model.named_parameters()}
    assert trainable(tiny_model) == everything - encoder
    assert all(param.grad is None for name, param in tiny_model.named_parameters() if name in encoder)


def test_forward_without_gradients_leaves_freezing_alone(tiny_model):
    tiny_model(prompt(), images())
    frozen_setup = trainable(tiny_model)
    with torch.no_grad():
        tiny_model(prompt())  # e.g. a text-only evaluation during Flamingo training
    with torch.inference_mode():
        tiny_model(prompt())
    assert trainable(tiny_model) == frozen_setup


def test_image_encoder_stays_frozen_and_in_eval_mode():
    encoder = nn.Sequential(nn.Dropout(0.5), tiny_image_encoder())
    model = FlamingoPaLM(**TINY, img_encoder=encoder)
    model.train()
    assert model.training and model.palm.training and not encoder.training
    text, pixels = prompt(), images()
    assert torch.equal(model(text, pixels), model(text, pixels))  # dropout stays off
    model(text)
    assert not any(param.requires_grad for param in encoder.parameters())


def test_state_dict_holds_only_weights_and_round_trips(tiny_model):
    state = tiny_model.state_dict()
    assert set(state) == {name for name, _ in tiny_model.named_parameters(remove_duplicate=False)}
    open_gates(tiny_model, 0.7)
    clone = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()).eval()
    clone.load_state_dict(tiny_model.state_dict())
    text, pixels = prompt(), images()
    assert torch.equal(clone(text, pixels), tiny_model(text, pixels))


def test_media_wider_than_the_text():
    model = FlamingoPaLM(**TINY, media_dim=48).eval()
    open_gates(model)
    assert model(prompt(), image_embeds=torch.randn(2, 2, 4, 48)).shape == (2, 12, TINY["num_tokens"])


def cpu_runs_half_convolutions() -> bool:
    """torch 2.1 has no float16 conv2d on the CPU (the test encoder is convolutional)."""
    try:
        nn.functional.conv2d(torch.ones(1, 1, 2, 2, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite(tiny_model, dtype):
    if dtype == torch.float16 and not cpu_runs_half_convolutions():
        pytest.skip("this torch has no float16 conv2d on the CPU")
    model = tiny_model.to(dtype)
    open_gates(model)
    logits = model(prompt(length=300, media_positions=(2, 280)), images().to(dtype))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_videos_train_their_frame_embeddings(tiny_model):
    open_gates(tiny_model, 0.5)
    videos = torch.randn(2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)  # (b, t, f, c, H, W)
    tiny_model(prompt(), videos=videos).sum().backward()
    assert tiny_model.perceiver_resampler.frame_embeds.grad.abs().sum() > 0


def test_an_empty_batch_gives_empty_logits(tiny_model):
    text, pixels = prompt()[:0], images()[:0]
    assert tiny_model(text, pixels).shape == (0, text.shape[1], TINY["num_tokens"])
    assert tiny_model(text, pixels, labels=text).item() == 0.0


def test_encoder_of_pooled_features_is_accepted():
    encoder = nn.Sequential(tiny_image_encoder(), nn.Flatten(), nn.LazyLinear(TINY["dim"]))
    encoder(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))  # materialise the lazy layer
    model = FlamingoPaLM(**TINY, img_encoder=encoder)
    assert model(prompt(), images()).shape == (2, 12, TINY["num_tokens"])


class PooledAndTokens(nn.Module):
    """An encoder returning (pooled, tokens), as open_clip's ViT does with output_tokens."""

    def __init__(self):
        super().__init__()
        self.patches = tiny_image_encoder()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.patches(images)
        return tokens.mean(dim=1), tokens


def test_encoder_outputs_are_read_as_flamingo_reads_them():
    """The same patch features, whether the encoder returns them alone or beside a pooled vector."""
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=PooledAndTokens())
    open_gates(model)
    text, pixels = prompt(), images()
    with torch.no_grad():
        features = model.img_encoder.patches(pixels.flatten(0, 1)).unflatten(0, (2, 2))  # (b, t, p, e)
        assert torch.equal(model(text, pixels), model(text, image_embeds=features))
    model.img_encoder = nn.Sequential(tiny_image_encoder(), nn.Unflatten(1, (2, 2)))  # (B, 2, 2, e): 4-d
    with pytest.raises(ValueError, match=r"must return \(B, p, e\) or \(B, e\) features, got shape \(4, 2, 2, 32\)"):
        model(text, pixels)


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)], ids=["traced", "inductor"]
)
def test_compiled_forward_matches_eager(tiny_model, backend):
    """Traced by dynamo and AOTAutograd (the default suite), or also compiled by inductor (slow: about 15 s of
    compilation on a CPU)."""
    open_gates(tiny_model)
    text, pixels = prompt(), images()
    compiled = torch.compile(tiny_model, backend=backend)
    assert_close(compiled(text, pixels), tiny_model(text, pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m(prompt(), images(batch=3)), ValueError, "images has batch 3 but text has batch 2"),
        (lambda m: m(prompt(), images()[:, 0]), ValueError, r"images must have shape \(b, t, c, H, W\)"),
        (lambda m: m(prompt(), images(), time_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "time_mask"),
        (lambda m: m(prompt(), images(), time_mask=torch.ones(2, 2)), TypeError, "time_mask must be a bool"),
        (lambda m: m(prompt(), time_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "without images"),
        (
            lambda m: m(prompt(), images(), image_embeds=torch.randn(2, 2, 4, 32)),
            ValueError,
            "at most one of images, image_embeds and videos",
        ),
        (lambda m: m(prompt(), images(items=5)), ValueError, "5 media items .* perceiver_num_time_embeds=4"),
        (lambda m: m(prompt().float()), TypeError, "integer token ids"),
        (lambda m: m(prompt()[0]), ValueError, "text must have shape"),
        (lambda m: m(prompt(), image_embeds=torch.randn(2, 2, 4, 16)), ValueError, "feature size 32"),
    ],
)
def test_bad_input_raises(tiny_model, call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_model)


def test_images_without_an_encoder_name_the_encoder():
    with pytest.raises(ValueError, match="img_encoder"):
        FlamingoPaLM(**TINY)(prompt(), images())


def test_videos_without_max_video_frames_raise():
    with pytest.raises(ValueError, match="max_video_frames"):
        model = FlamingoPaLM(**{**TINY, "max_video_frames": None}, img_encoder=tiny_image_encoder())
        model(prompt(), videos=torch.randn(2, 2, 3, 3, IMAGE_SIZE, IMAGE_SIZE))


def test_invalid_constructor_arguments_raise():
    with pytest.raises(ValueError, match="cross_attn_every"):
        FlamingoPaLM(**{**TINY, "cross_attn_every": 0})
    with pytest.raises(ValueError, match="media_token_id"):
        FlamingoPaLM(**{**TINY, "media_token_id": 64})


def test_odd_dim_head_raises_at_construction():
    with pytest.raises(ValueError, match="dim_head must be even for rotary embeddings, got 7"):
        FlamingoPaLM(**{**TINY, "dim_head": 7})
    with pytest.raises(ValueError, match="heads must be a positive integer, got 0"):
        FlamingoPaLM(**{**TINY, "heads": 0})


def test_freezing_never_undoes_a_freeze_the_user_set(tiny_model):
    """Only a change between text and media training touches requires_grad, and only on the
    language model's parameters that freezing froze itself."""
    tiny_model.perceiver_resampler.requires_grad_(False)  # e.g. train only the gated blocks
    tiny_model.palm.token_emb.requires_grad_(False)  # e.g. keep the (tied) embedding fixed
    user_frozen = {name for name, p in tiny_model.named_parameters() if not p.requires_grad}
    language_model = {f"palm.{name}" for name, _ in tiny_model.palm.named_parameters()}
    tiny_model(prompt(), images())  # media: the language model freezes
    assert trainable(tiny_model).isdisjoint(language_model | user_frozen)
    assert trainable(tiny_model) == {name for name, _ in tiny_model.named_parameters() if name.startswith("gated")}
    tiny_model(prompt())  # text alone: the language model trains again, less what the user froze
    assert trainable(tiny_model) == language_model - user_frozen | trainable_gated(tiny_model)
    assert user_frozen.isdisjoint(trainable(tiny_model))
    tiny_model(prompt(), images())
    tiny_model(prompt(), images())  # a second media step changes nothing
    tiny_model.palm.layers[0].requires_grad_(True)  # the user unfreezes a layer during media training ...
    tiny_model(prompt(), images())
    assert all(p.requires_grad for p in tiny_model.palm.layers[0].parameters())  # ... and it stays unfrozen


def trainable_gated(model: FlamingoPaLM) -> set[str]:
    return {name for name, p in model.named_parameters() if name.startswith("gated") and p.requires_grad}
