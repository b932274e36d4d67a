"""A word-list tokenizer: one id per word, split on whitespace. Ships with the demo, no downloads."""

from __future__ import annotations

from collections.abc import Sequence


class WordTokenizer:
    """Maps whitespace-separated words to ids and back.

    Args:
        words: the vocabulary, in id order; ids are positions in this list. ``"<pad>"`` and
            ``"<image>"`` must be among them (``"<image>"`` marks where an image sits in the text).
    """

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words):
            raise ValueError("words must not repeat")
        for special in ("<pad>", "<image>"):
            if special not in words:
                raise ValueError(f"words must contain {special!r}")
        self.words = list(words)
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.pad_id = self.ids["<pad>"]
        self.image_id = self.ids["<image>"]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """``"<image> what color ?"`` -> ``[1, 5, 7, 9]``; an unknown word raises ValueError."""
        unknown = [word for word in text.split() if word not in self.ids]
        if unknown:
            raise ValueError(f"text has words outside the vocabulary: {unknown}")
        return [self.ids[word] for word in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> words joined by spaces."""
        return " ".join(self.words[int(i)] for i in ids)
