"""Flamingo in PyTorch: Perceiver Resampler, masked gated cross-attention, and FlamingoPaLM."""

from flamingo_pytorch.cross_attention import GatedCrossAttentionBlock, MaskedCrossAttention
from flamingo_pytorch.flamingo import Flamingo
from flamingo_pytorch.flamingo_palm import FlamingoPaLM
from flamingo_pytorch.generation import GenerationState
from flamingo_pytorch.palm import PaLM
from flamingo_pytorch.perceiver import PerceiverResampler

__version__ = "0.2.0"

__all__ = [
    "Flamingo",
    "FlamingoPaLM",
    "GatedCrossAttentionBlock",
    "GenerationState",
    "MaskedCrossAttention",
    "PaLM",
    "PerceiverResampler",
]
