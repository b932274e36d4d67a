"""The shapes demo with a transformers Llama as its language model (``train_shapes.py --lm llama``).

The Llama is pretrained on the question/answer text (stage 1) as a plain ``LlamaForCausalLM``,
then wrapped by ``flamingo_pytorch.Flamingo``, which freezes it and the image encoder; stage 2
trains the resampler and the gated blocks, as with PaLM. ``ShapesFlamingo`` gives the wrapper the
two calls the demo makes of a FlamingoPaLM: logits from ``model(text, images)``, and greedy
``generate(prompt, images, max_new_tokens=..., temperature=0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flamingo_pytorch import Flamingo


def build_llama(config: dict) -> nn.Module:
    """A small random Llama the size of the demo's PaLM (``config`` as in ``train_shapes.model_config``)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("--lm llama needs transformers: pip install -e '.[hf]'") from error
    llama = LlamaConfig(
        vocab_size=config["num_tokens"],
        hidden_size=config["dim"],
        intermediate_size=config["dim"] * config["ff_mult"],
        num_hidden_layers=config["depth"],
        num_attention_heads=config["heads"],
        head_dim=config["dim_head"],
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,  # the demo's answers end with ".", not an end-of-sequence token
        pad_token_id=0,
    )
    return LlamaForCausalLM(llama)


class ShapesFlamingo(Flamingo):
    """Flamingo over the demo's Llama, answering the demo's FlamingoPaLM-style calls."""

    def __init__(self, lm: nn.Module, encoder: nn.Module, config: dict):
        super().__init__(
            lm,
            media_token_id=config["media_token_id"],
            vision_encoder=encoder,
            cross_attn_every=config["cross_attn_every"],
            dim_head=config["dim_head"],
            heads=config["heads"],
            ff_mult=config["ff_mult"],
            perceiver_depth=config["perceiver_depth"],
            perceiver_num_latents=config["perceiver_num_latents"],
            perceiver_num_time_embeds=config["perceiver_num_time_embeds"],
        )

    def forward(self, text: Tensor, images: Tensor | None = None) -> Tensor:
        """text (b, n), images (b, t, c, H, W) -> logits (b, n, v)."""
        return super().forward(text, images).logits

    @torch.no_grad()
    def generate(self, prompt: Tensor, images: Tensor | None = None, *, max_new_tokens: int, temperature: float = 0):
        if temperature != 0:
            raise ValueError("the demo decodes greedily (temperature=0)")
        return super().generate(prompt, images, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)

    def set_flamingo_mode(self, flamingo: bool) -> None:
        """The wrapped language model is always frozen (stage 1 trains it before wrapping)."""
        if not flamingo:
            raise ValueError("the Llama trains before it is wrapped")
