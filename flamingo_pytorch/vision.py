"""Vision encoders as Flamingo reads them: images (B, c, H, W) -> patch features (B, p, e).

One small adapter, ``VisionEncoder``, for the encoders people have, told apart by what they can do
(no table of model names):

    open_clip     a CLIP model or its ``visual`` tower; ``output_tokens`` is switched on and the
                  patch tokens are returned (what OpenFlamingo feeds its resampler)
    transformers  ``CLIPVisionModel``, ``SiglipVisionModel`` (or a ``CLIPModel``'s ``vision_model``):
                  ``last_hidden_state``; a SigLIP2 NaFlex tower (its forward takes ``spatial_shapes``)
                  reads the images cut into patches, as its image processor cuts them
    timm          ``forward_features``
    vit-pytorch   ``Extractor(vit, return_embeddings_only=True)``, or any module that returns
                  (B, p, e) features

The encoder is frozen and kept in eval mode by ``Flamingo``; nothing here imports the libraries.
"""

from __future__ import annotations

import inspect

import torch
from einops import rearrange
from torch import Tensor, nn


class VisionEncoder(nn.Module):
    """Wraps an image encoder so that it returns patch features (B, p, e).

    Args:
        encoder: an open_clip CLIP model or visual tower, a transformers vision model, a timm
            model with ``forward_features``, or any module returning (B, p, e), (B, e) or a tuple
            holding the (B, p, e) tokens.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        for tower in ("vision_model", "visual"):  # a full CLIP / SigLIP model: its image tower
            if isinstance(getattr(encoder, tower, None), nn.Module):
                encoder = getattr(encoder, tower)
        if hasattr(encoder, "output_tokens"):  # open_clip's VisionTransformer: return (pooled, tokens)
            encoder.output_tokens = True
        self.encoder = encoder
        forward = getattr(encoder, "forward", None)
        self.takes_patches = callable(forward) and "spatial_shapes" in inspect.signature(forward).parameters

    @property
    def feature_width(self) -> int | None:
        """e, the width of the features ``forward`` returns, where the encoder says it: an open_clip
        ViT's transformer width (its patch tokens come before the projection), a transformers model's
        ``config.hidden_size``, a timm model's ``num_features``; None for any other module."""
        encoder = self.encoder
        if hasattr(encoder, "output_tokens"):
            width = getattr(getattr(encoder, "transformer", None), "width", None)
        elif hasattr(encoder, "forward_features"):
            width = getattr(encoder, "num_features", None)
        elif hasattr(encoder, "main_input_name"):
            width = getattr(getattr(encoder, "config", None), "hidden_size", None)
        else:
            width = None
        return width if isinstance(width, int) and not isinstance(width, bool) else None

    def forward(self, images: Tensor) -> Tensor:
        """images (B, c, H, W) -> features (B, p, e). Float images are cast to the encoder's dtype
        (pixels from a processor are float32; the encoder may be in bfloat16 or float16)."""
        encoder = self.encoder
        weight = next((p for p in encoder.parameters() if p.is_floating_point()), None)
        if weight is not None and images.is_floating_point():
            images = images.to(weight.dtype)
        if hasattr(encoder, "forward_features"):  # timm
            out = encoder.forward_features(images)
        elif self.takes_patches:  # transformers, SigLIP2 NaFlex
            out = encoder(**naflex_inputs(images, encoder.config.patch_size))
        elif hasattr(encoder, "main_input_name"):  # transformers
            out = encoder(**{encoder.main_input_name: images})
        else:
            out = encoder(images)
        return patch_features(out)


def naflex_inputs(images: Tensor, patch_size: int) -> dict[str, Tensor]:
    """images (B, c, H, W) -> a SigLIP2 NaFlex tower's inputs: every patch real, one (H/s, W/s) grid per image."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height} x {width} pixels do not cut into {patch_size}-pixel patches")
    patches = rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)
    mask = torch.ones(patches.shape[:2], dtype=torch.long, device=images.device)  # (B, h w)
    grid = torch.tensor([[height // patch_size, width // patch_size]], device=images.device)  # (1, 2)
    return dict(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=grid.expand(len(images), 2))


def patch_features(out) -> Tensor:
    """An encoder's output -> (B, p, e): ``last_hidden_state``, the 3-d tensor of a tuple, or (B, e) as one patch."""
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    if isinstance(out, (tuple, list)):
        tokens = [part for part in out if isinstance(part, Tensor) and part.ndim == 3]
        if len(tokens) != 1:
            shapes = [tuple(part.shape) for part in out if isinstance(part, Tensor)]
            raise ValueError(f"expected one (B, p, e) tensor in the encoder's output, got shapes {shapes}")
        out = tokens[0]
    if not isinstance(out, Tensor) or out.ndim not in (2, 3):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the vision encoder must return (B, p, e) or (B, e) features, got {got}")
    return out[:, None] if out.ndim == 2 else out  # (B, e) -> (B, 1, e)


def load_vision_encoder(name: str, pretrained: str | None = None):
    """A vision encoder by name -> (encoder in eval mode, PIL image -> (c, H, W) tensor: its own preprocessing).

    ``open_clip:ARCH`` is an open_clip model (``pretrained``: its tag or a local file), returning its
    ``visual`` tower; any other name is a transformers vision model and its image processor. Downloads
    what those libraries download (extras ``clip`` and ``hf``).
    """
    if name.startswith("open_clip:"):
        import open_clip

        clip, _, transform = open_clip.create_model_and_transforms(name[len("open_clip:") :], pretrained=pretrained)
        return clip.visual.eval(), transform
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(name)

    def transform(image) -> Tensor:
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]  # (c, H, W)

    return AutoModel.from_pretrained(name).eval(), transform
