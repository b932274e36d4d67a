"""What Flamingo needs to know about someone else's language model: its decoder layers, their width,
its vocabulary, and the key/value cache of a call.

Shapes:
    b batch, n text length, d text width.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

# Where decoder-only models keep their layer list (Llama, Qwen, Mistral: model.layers; OPT:
# model.decoder.layers; GPT-2: transformer.h; MPT: transformer.blocks; GPT-NeoX: gpt_neox.layers).
LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "transformer.blocks", "gpt_neox.layers")


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal language model, from the usual attribute paths."""
    for path in LAYER_PATHS:
        module = lm
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise ValueError(
        f"cannot find the decoder layers of {type(lm).__name__} (looked for {', '.join(LAYER_PATHS)}): "
        "pass them as layers=<the nn.ModuleList of decoder layers>"
    )


def cache_of(values: dict) -> object | None:
    """The key/value cache in a language model call's keyword arguments or output, or None."""
    for name in ("cache", "past_key_values"):  # the keyword transformers uses since 5.25, and before
        cache = values.get(name) if isinstance(values, dict) else getattr(values, name, None)
        if cache is not None:
            return cache
    return None


def cache_keyword(lm: nn.Module) -> str:
    """The keyword ``lm``'s forward takes its key/value cache by: ``cache`` since transformers 5.25,
    ``past_key_values`` before it (and in remote code)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def tokens_in_cache(lm_kwargs: dict) -> int:
    """How many tokens the key/value cache passed to a language model call already holds (0: none)."""
    cache = cache_of(lm_kwargs)
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    position = lm_kwargs.get("cache_position")
    return int(position[0]) if position is not None and position.numel() else 0


def decoder_width(lm: nn.Module) -> int:
    """d, the width of the hidden states the decoder layers read and return (the gated blocks' width).

    The config's ``hidden_size`` (of its text part, for a multimodal config) where there is one:
    every transformers decoder names its layers' width so (GPT-2's ``n_embd`` and MPT's ``d_model``
    are aliases), and it differs from the input embedding's width where the model projects its
    embeddings first (OPT-350m: 512-wide embeddings, ``project_in`` to 1024-wide layers). Without a
    config (a model of your own), the input embedding's width.
    """
    config = getattr(lm, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        return width
    return lm.get_input_embeddings().embedding_dim


def check_media_token_id(media_token_id: object, embedding: nn.Module) -> None:
    """The media token must be a row of the input embedding (forgetting to add it and resize is common)."""
    vocab = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if isinstance(media_token_id, bool) or not isinstance(media_token_id, int) or not 0 <= media_token_id < vocab:
        raise ValueError(
            f"media_token_id must be a token id in [0, {vocab}) (the vocabulary size of lm.get_input_embeddings()), "
            f"got {media_token_id!r}: add the token and resize the embeddings (add_flamingo_tokens(tokenizer, lm))"
        )


def check_input_ids(input_ids: object) -> None:
    """Token ids must be an integer tensor (float ids would crash inside the embedding)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
