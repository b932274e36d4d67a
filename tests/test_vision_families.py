"""Flamingo fed by today's vision encoders at their released widths and resolutions (one layer each,
random weights, nothing downloaded), over a small bfloat16 Llama: ``full_size.check_flamingo``.
Most are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from full_size import (
    TIME_MASK,
    check_flamingo,
    free_models,  # noqa: F401 (the autouse fixture that frees each test's models)
    prompt,
    random_lm,
    slow,
    transformers,
)
from torch import Tensor, nn


def small_lm() -> nn.Module:
    """A small random bf16 Llama (width 256, vocabulary 1000) for the vision encoders to feed."""
    values = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    return random_lm(dict(values, num_key_value_heads=2, vocab_size=1000))


def siglip_so400m_384() -> nn.Module:
    """google/siglip-so400m-patch14-384's vision tower (1 of its 27 layers): 27 x 27 = 729 patches."""
    config = transformers.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=14,
        image_size=384,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,  # its attention-pooling head's output is not what Flamingo reads (see the docs)
    )
    return transformers.SiglipVisionModel(config)


def clip_vit_l_14_336() -> nn.Module:
    """openai/clip-vit-large-patch14-336's vision tower (1 of its 24 layers): 24 x 24 patches and the class token."""
    config = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=14,
        image_size=336,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return transformers.CLIPVisionModel(config)


def open_clip_vit_l_14() -> nn.Module:
    """open_clip's ViT-L-14 (OpenFlamingo's encoder), both towers cut to 1 layer through create_model's
    config overrides; VisionEncoder returns the visual tower's 16 x 16 patch tokens."""
    open_clip = pytest.importorskip("open_clip")
    config = open_clip.get_model_config("ViT-L-14")
    vision, text = dict(config["vision_cfg"], layers=1), dict(config["text_cfg"], layers=1)
    return open_clip.create_model("ViT-L-14", pretrained=None, vision_cfg=vision, text_cfg=text)


def dinov2_vit_l_14() -> nn.Module:
    """timm's vit_large_patch14_dinov2 (1 of its 24 blocks) at 518 pixels: 37 x 37 patches and the class token."""
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_large_patch14_dinov2", pretrained=False, depth=1)


ENCODERS = {  # name -> (builder, image size, patches, width)
    "CLIP-ViT-L/14-336": pytest.param(clip_vit_l_14_336, 336, 577, 1024, marks=slow),
    "SigLIP-so400m/14-384": pytest.param(siglip_so400m_384, 384, 729, 1152, marks=slow),
    "open_clip-ViT-L-14": pytest.param(open_clip_vit_l_14, 224, 256, 1024, marks=slow),
    "DINOv2-ViT-L/14": pytest.param(dinov2_vit_l_14, 518, 1370, 1024, marks=slow),
}


@pytest.mark.parametrize(("build", "size", "patches", "width"), ENCODERS.values(), ids=ENCODERS.keys())
def test_vision_encoder(build, size, patches, width):
    """A released encoder's width (1 layer, random bf16 weights) feeds Flamingo, which reads that width off
    it: exact with the gates closed; with them open the images matter and cached generation agrees;
    images give exactly what their precomputed features give."""
    torch.manual_seed(0)
    encoder = build().to(torch.bfloat16)
    images = torch.randn(2, 2, 3, size, size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    media = dict(images=images, time_mask=TIME_MASK)
    model = check_flamingo(small_lm(), media, vision_encoder=encoder, above_tolerance=False)
    assert model.perceiver_resampler.dim == width
    with torch.no_grad():
        features = model.vision_encoder(images.flatten(0, 1))  # (b t, p, e)
        assert features.shape == (4, patches, width) and features.dtype == torch.bfloat16
        from_images = model(prompt(), images, time_mask=TIME_MASK).logits
        given = model(prompt(), image_embeds=features.unflatten(0, (2, 2)), time_mask=TIME_MASK).logits
    assert torch.equal(from_images, given)


def siglip2_so400m_naflex() -> nn.Module:
    """google/siglip2-so400m-patch16-naflex's vision tower (1 of its 27 layers): 16-pixel patches at any
    aspect ratio, its 16 x 16 grid of position embeddings resized to each image's grid. (The fixed-size
    SigLIP2 checkpoints, e.g. siglip2-so400m-patch14-384, are SiglipVisionModel towers: tested above.)"""
    config = transformers.Siglip2VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=1,
        patch_size=16,
        num_patches=256,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return transformers.Siglip2VisionModel(config)


class NaFlexPatches(nn.Module):
    """A SigLIP2 NaFlex tower as a (B, c, H, W) -> (B, H/16 W/16, e) encoder: it reads images cut into
    patches the way its image processor cuts them, with the patches' mask and grid shape."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, images: Tensor) -> Tensor:
        size = self.tower.config.patch_size
        patches = rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=size, q=size)
        mask = torch.ones(patches.shape[:2], dtype=torch.long)  # (b, h w): every patch is real
        grid = torch.tensor([[images.shape[-2] // size, images.shape[-1] // size]] * len(images))  # (b, 2)
        return self.tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid).last_hidden_state


@slow
def test_siglip2_naflex_tower_as_given():
    """The SigLIP2 NaFlex tower at its width, passed to Flamingo as it is (VisionEncoder cuts the patches),
    under the same checks as the encoders above (256 x 256 images: its native 16 x 16 grid); its
    features equal those of the tower fed by NaFlexPatches, the image processor's cut written out here."""
    torch.manual_seed(0)
    tower = siglip2_so400m_naflex().to(torch.bfloat16)
    images = torch.randn(2, 2, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    media = dict(images=images, time_mask=TIME_MASK)
    model = check_flamingo(small_lm(), media, vision_encoder=tower, above_tolerance=False)
    with torch.no_grad():
        features = model.vision_encoder(images.flatten(0, 1))
        assert features.shape == (4, 256, 1152)
        assert torch.equal(features, NaFlexPatches(tower)(images.flatten(0, 1)))
