"""Flamingo's added tokens: ``<image>`` and ``<|endofchunk|>`` in a tokenizer, and training their embedding rows only.

Shapes: b batch, n text length, k trained tokens, d width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGE_TOKEN, END_OF_CHUNK_TOKEN = "<image>", "<|endofchunk|>"


def add_flamingo_tokens(tokenizer, lm: nn.Module) -> tuple[int, int]:
    """Add ``<image>`` and ``<|endofchunk|>`` (and a pad token if there is none) to a Hugging Face
    tokenizer and resize the language model's embeddings to match -> (image id, end-of-chunk id)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, END_OF_CHUNK_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)


class TrainedTokenRows(nn.Module):
    """Trainable embedding rows for a few token ids, in place of the frozen embedding's rows.

    Registered as a forward hook on the language model's input embedding: wherever the input holds
    one of ``token_ids``, the output row is this module's row. Initialised from the embedding, so
    the model computes exactly what it did until the rows train.

    Args:
        embedding: the language model's input embedding (``lm.get_input_embeddings()``).
        token_ids: the ids whose rows train (e.g. ``<image>`` and ``<|endofchunk|>``).
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        token_ids, vocab = [int(token) for token in token_ids], embedding.weight.shape[0]
        if not all(0 <= token < vocab for token in token_ids):  # checked before any tensor: the LM may be on meta
            raise ValueError(f"train_token_ids must lie in [0, {vocab}), got {token_ids}")
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=embedding.weight.device)
        self.register_buffer("token_ids", ids)
        self.weight = nn.Parameter(embedding.weight.detach()[ids].clone())  # (k, d)

    def replace_rows(self, embedding: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook: output (b, n, d) with the rows of ``token_ids`` taken from ``weight``."""
        match = args[0][..., None] == self.token_ids  # (b, n, k)
        rows = self.weight[match.long().argmax(dim=-1)]  # (b, n, d); any row where nothing matches
        return torch.where(match.any(dim=-1, keepdim=True), rows.to(output.dtype), output)
