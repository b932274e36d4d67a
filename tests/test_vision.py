"""VisionEncoder: each library's encoder gives (B, p, e) patch features, frozen and in eval mode inside Flamingo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flamingo_pytorch import Flamingo
from flamingo_pytorch.vision import VisionEncoder


def hf_clip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    return transformers.CLIPVisionModel(config), (16, 5, 16)  # a class token and 4 patches


def hf_siglip():
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    return transformers.SiglipVisionModel(config), (16, 4, 16)


def open_clip_model():
    open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
    vision = open_clip.CLIPVisionCfg(layers=1, width=16, head_width=8, image_size=16, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text), (16, 4, 16)  # patch tokens only


def timm_vit():
    timm = pytest.importorskip("timm", reason="pip install -e '.[timm]'")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2
    )
    return model, (16, 5, 16)


def vit_pytorch():
    vit = pytest.importorskip("vit_pytorch", reason="pip install -e '.[vit]'")
    from vit_pytorch.extractor import Extractor

    model = vit.ViT(image_size=16, patch_size=8, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
    return Extractor(model, return_embeddings_only=True), (16, 5, 16)


ENCODERS = {
    "transformers CLIP": hf_clip,
    "transformers SigLIP": hf_siglip,
    "open_clip": open_clip_model,
    "timm": timm_vit,
    "vit-pytorch": vit_pytorch,
}


@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_give_patch_features_and_stay_frozen(name):
    torch.manual_seed(0)
    encoder, (width, patches, media_dim) = ENCODERS[name]()
    adapted = VisionEncoder(encoder)
    features = adapted(torch.randn(3, 3, width, width))
    assert features.shape == (3, patches, media_dim)
    lm = pytest.importorskip("transformers").LlamaForCausalLM(
        pytest.importorskip("transformers").LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    )
    model = Flamingo(lm, vision_encoder=encoder, media_dim=media_dim, media_token_id=3, perceiver_depth=1, heads=2)
    model.train()
    assert not any(module.training for module in model.vision_encoder.modules())
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    text = torch.randint(4, 40, (2, 6))
    text[:, 1] = 3
    model(text, torch.randn(2, 1, 3, width, width), labels=text).loss.backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())


def test_pooled_and_tuple_outputs():
    assert VisionEncoder(nn.Linear(4, 6))(torch.randn(2, 4)).shape == (2, 1, 6)  # (B, e) is one patch

    class Pair(nn.Module):
        def forward(self, x):
            return x.mean(1), x  # (pooled, tokens), like open_clip with output_tokens

    assert VisionEncoder(Pair())(torch.randn(2, 5, 3)).shape == (2, 5, 3)
    with pytest.raises(ValueError, match="one \\(B, p, e\\) tensor"):
        VisionEncoder(nn.Identity())((torch.randn(2, 5, 3), torch.randn(2, 5, 3)))
