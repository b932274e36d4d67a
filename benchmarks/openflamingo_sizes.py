"""The model and prompts both sides of the OpenFlamingo generation benchmark build, in one process.

Imported by ``hf_generation.py`` (ours) and by ``openflamingo_generation.py`` (OpenFlamingo's, with
transformers 4.33): only torch, transformers and open_clip, so that the two builds are the same
configuration by construction and the saved checkpoint fits ours.
"""

from __future__ import annotations

import argparse

import open_clip
import torch
from transformers import LlamaConfig, LlamaForCausalLM

MEDIA, END_OF_CHUNK, COUNTS = 3, 4, (1, 4, 8)


def language_model(args: argparse.Namespace) -> LlamaForCausalLM:
    """A random Llama: ``--layers`` layers of width ``--dim``, 8 heads, vocabulary 1000 (seed 0)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=args.dim,
        intermediate_size=4 * args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    return LlamaForCausalLM(config)


def vision_encoder(args: argparse.Namespace) -> open_clip.CLIP:
    """A one-layer open_clip ViT: 256 patch tokens of width ``--dim`` per 224 x 224 image."""
    vision = open_clip.CLIPVisionCfg(layers=1, width=args.dim, head_width=64, image_size=224, patch_size=14)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=64, heads=1, layers=1)
    return open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)


def prompts(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random ``--prompt``-token prompts with 1, 4 or 8 images in their first half, and the images (b, t, c, H, W)."""
    inputs = {}
    for count in COUNTS:
        text = torch.randint(5, 1000, (1, args.prompt))
        text[0, torch.linspace(0, args.prompt // 2, count + 1)[:-1].long()] = MEDIA
        inputs[f"text_{count}"], inputs[f"images_{count}"] = text, torch.randn(1, count, 3, 224, 224)
    return inputs
