"""OpenFlamingo's own model and ``generate``, built in this process for ``hf_generation.py`` to time against ours.

OpenFlamingo 2.0.1 (``pip install --no-deps open-flamingo==2.0.1``) runs on the transformers and
torch installed here: its ``generate`` gives, greedy and with beam search, exactly the tokens of our
``Flamingo`` on the converted weights. One thing needs a shim: transformers 5.x drops an attention
mask that holds no padding before calling the model, and OpenFlamingo's ``FlamingoLMMixin.forward``
requires one, so its ``generate`` raises a ``TypeError`` unless some row is padded. ``MaskOptional``
lets the mask be omitted (``None``, which means no padding to transformers), and changes nothing else.

The model: a random Llama (``--layers``, width ``--dim``), a gated block before every layer
(OpenFlamingo's ``cross_attn_every_n_layers=1``) with its gates opened to tanh(0.5), its Perceiver
(depth 6, 64 latents), and a one-layer open_clip ViT giving 256 patch tokens of width ``--dim`` per
224 x 224 image (``openflamingo_sizes.py``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from openflamingo_sizes import END_OF_CHUNK, MEDIA, language_model, vision_encoder


class MaskOptional(FlamingoLMMixin):
    """OpenFlamingo's language-model mixin, with ``attention_mask`` optional as transformers 5.x calls it."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids, attention_mask, **kwargs)


def build(args: argparse.Namespace) -> tuple[Flamingo, torch.nn.Module, torch.nn.Module]:
    """(OpenFlamingo's model, an untouched copy of its Llama, of its CLIP): the copies are what ours wraps."""
    lm, clip = language_model(args), vision_encoder(args)
    plain_lm, plain_clip = copy.deepcopy(lm), copy.deepcopy(clip)
    extend_instance(lm, MaskOptional)
    lm.set_decoder_layers_attr_name("model.layers")
    clip.visual.output_tokens = True  # patch tokens, as OpenFlamingo's factory sets it
    model = Flamingo(clip, lm, END_OF_CHUNK, MEDIA, vis_dim=args.dim, cross_attn_every_n_layers=1).eval()
    with torch.no_grad():
        for layer in lm.gated_cross_attn_layers:
            layer.attn_gate.fill_(0.5)
            layer.ff_gate.fill_(0.5)
    return model, plain_lm.eval(), plain_clip.eval()


def generate(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> torch.Tensor:
    """OpenFlamingo's greedy ``generate`` of exactly ``new`` tokens: text (b, n), images (b, t, c, H, W)."""
    return model.generate(
        vision_x=images[:, :, None],  # (b, t, frames, c, H, W), one frame
        lang_x=text,
        attention_mask=torch.ones_like(text),
        max_new_tokens=new,
        min_new_tokens=new,
        num_beams=1,
        pad_token_id=0,
        suppress_tokens=[MEDIA],  # as ours never generates <image>
    )
