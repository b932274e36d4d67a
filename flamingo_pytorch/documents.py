"""Documents -> training rows: token ids with ``<image>`` markers, capped images, truncation, loss masking, batches.

A document is a list of parts in order: strings (text) and images (see ``shards.py`` for how shards hold them).
It becomes OpenFlamingo's layout, ``[BOS] text <image>text<|endofchunk|><image>text<|endofchunk|>``: each
image opens a chunk, ``<|endofchunk|>`` closes it (when the tokenizer has that token). Then:

1. images beyond ``max_images`` are dropped with everything from the first dropped image's ``<image>`` on;
2. the ids are cut to ``max_tokens``, and the images whose ``<image>`` fell off go too, as does an
   ``<image>`` left as the very last token (its text is gone);
3. a document left with fewer than ``min_images`` images is skipped.

So every document holds exactly as many ``<image>`` tokens as images, in the same order. A row is one
document, or with packing as many consecutive documents as fit in ``max_tokens`` and ``max_images``.
Labels follow OpenFlamingo (``processor.loss_labels``), document by document: -100 on padding, on
``<image>`` tokens and before each document's first image.

Shapes: b rows, n = max_tokens, t = max_images, c channels, H x W pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from flamingo_pytorch.processor import loss_labels, pad_token_ids, stack_images
from flamingo_pytorch.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN


class DocumentTokenizer:
    """Turns a document's parts into token ids and its images, capped and truncated.

    The tokenizer is either a Hugging Face tokenizer holding ``<image>`` and a pad token (see
    ``add_flamingo_tokens``; ``<|endofchunk|>`` and ``bos_token_id`` are used when present), or any
    object with this minimal interface (``examples/word_tokenizer.py``'s ``WordTokenizer`` has it):

    - ``encode(text: str) -> list[int]``: the ids of a piece of text, without special tokens;
    - ``pad_id: int`` and ``image_id: int``;
    - optionally ``end_of_chunk_id: int`` and ``bos_id: int`` (absent or None: not inserted).

    Text parts are encoded one by one and concatenated as written (no separator is added).

    Args:
        tokenizer: as above.
        max_tokens: n, the most tokens in a row.
        max_images: t, the most images in a row.
        min_images: documents left with fewer images are skipped (at least 1).
    """

    def __init__(self, tokenizer, *, max_tokens: int, max_images: int, min_images: int = 1):
        for name, value, least in (("max_tokens", max_tokens, 2), ("max_images", max_images, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(min_images, int) or not 1 <= min_images <= max_images:
            raise ValueError(f"min_images must be an int in [1, max_images={max_images}], got {min_images!r}")
        self.tokenizer = tokenizer
        self.max_tokens, self.max_images, self.min_images = max_tokens, max_images, min_images
        self.hugging_face = hasattr(tokenizer, "convert_tokens_to_ids")
        if self.hugging_face:
            vocab = tokenizer.get_vocab()
            if IMAGE_TOKEN not in vocab or tokenizer.pad_token_id is None:
                raise ValueError(f"the tokenizer needs {IMAGE_TOKEN} and a pad token: call add_flamingo_tokens first")
            self.pad_id, self.image_id = tokenizer.pad_token_id, vocab[IMAGE_TOKEN]
            self.end_of_chunk_id, self.bos_id = vocab.get(END_OF_CHUNK_TOKEN), tokenizer.bos_token_id
            return
        missing = [name for name in ("encode", "pad_id", "image_id") if not hasattr(tokenizer, name)]
        if missing:
            raise TypeError(
                f"tokenizer must be a Hugging Face tokenizer or have encode, pad_id, image_id; lacks {missing}"
            )
        self.pad_id, self.image_id = tokenizer.pad_id, tokenizer.image_id
        self.end_of_chunk_id = getattr(tokenizer, "end_of_chunk_id", None)
        self.bos_id = getattr(tokenizer, "bos_id", None)

    def encode(self, text: str) -> list[int]:
        ids = (
            self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.hugging_face
            else self.tokenizer.encode(text)
        )
        if self.image_id in ids:
            raise ValueError(f"text parts must not hold {IMAGE_TOKEN}: put an image part there, got {text!r}")
        return list(ids)

    def __call__(self, parts: Sequence) -> tuple[list[int], list] | None:
        """Parts (strings and images) -> (token ids, the images their ``<image>`` tokens stand for), or None
        when fewer than ``min_images`` images are left."""
        ids, images = self.layout(parts)
        if len(images) > self.max_images:
            ids = ids[: self.marker_positions(ids)[self.max_images]]  # cut before the first dropped image
        ids = ids[: self.max_tokens]
        while ids and ids[-1] == self.image_id:
            ids = ids[:-1]  # an image whose text was cut away entirely
        images = images[: len(self.marker_positions(ids))]
        return None if len(images) < self.min_images else (ids, images)

    def layout(self, parts: Sequence) -> tuple[list[int], list]:
        """All parts -> ``[BOS] text <image>text<|endofchunk|>...`` ids and the images, uncapped."""
        ids, images = ([] if self.bos_id is None else [self.bos_id]), []
        for part in parts:
            if isinstance(part, str):
                ids.extend(self.encode(part))
                continue
            if images and self.end_of_chunk_id is not None:
                ids.append(self.end_of_chunk_id)
            ids.append(self.image_id)
            images.append(part)
        if images and self.end_of_chunk_id is not None:
            ids.append(self.end_of_chunk_id)
        return ids, images

    def marker_positions(self, ids: list[int]) -> list[int]:
        return [position for position, token in enumerate(ids) if token == self.image_id]

    def pack(self, documents: Iterable[tuple[list[int], list]]) -> Iterator[list[tuple[list[int], list]]]:
        """Documents (ids, images) -> rows of consecutive documents: each row takes documents in order
        while their tokens fit in ``max_tokens`` and their images in ``max_images``."""
        row, tokens, images = [], 0, 0
        for ids, document_images in documents:
            if row and (tokens + len(ids) > self.max_tokens or images + len(document_images) > self.max_images):
                yield row
                row, tokens, images = [], 0, 0
            row.append((ids, document_images))
            tokens, images = tokens + len(ids), images + len(document_images)
        if row:
            yield row

    def collate(self, rows: Sequence[Sequence[tuple[list[int], list[Tensor]]]]) -> dict[str, Tensor]:
        """Rows, each a list of documents (ids, (c, H, W) images), -> the batch, padded to fixed sizes:

        ``input_ids`` (b, n) long, ``attention_mask`` (b, n) long (1 on tokens), ``labels`` (b, n) long
        (-100 where no loss; not shifted: label i is token i), ``images`` (b, t, c, H, W) float (zeros
        where padded) and ``time_mask`` (b, t) bool (True on images).
        """
        ids = [[token for document, _ in row for token in document] for row in rows]
        labels = [[label for document, _ in row for label in self.labels(document)] for row in rows]
        batch = pad_token_ids(ids, self.pad_id, length=self.max_tokens)
        batch["labels"] = pad_token_ids(labels, -100, length=self.max_tokens)["input_ids"]
        pictures = [[image for _, document_images in row for image in document_images] for row in rows]
        images, batch["time_mask"] = stack_images(pictures, self.max_images)
        batch["images"] = images.float()
        return batch

    def labels(self, ids: list[int]) -> list[int]:
        """One document's labels: ``processor.loss_labels`` of it alone."""
        row = torch.tensor([ids], dtype=torch.long)  # (1, length)
        return loss_labels(row, torch.ones_like(row), self.image_id)[0].tolist()


def to_tensor(image) -> Tensor:
    """The default image transform: an RGB PIL image -> (3, H, W) floats in [0, 1]; a tensor passes as it is."""
    if isinstance(image, Tensor):
        return image
    import numpy as np

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 255  # (3, H, W)


def decode_images(images: Sequence, image_transform: Callable) -> list[Tensor]:
    """Undecoded images (``shards.ImageFile``) -> the transform's (c, H, W) tensors."""
    tensors = [image_transform(image.decode()) for image in images]
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or tensor.ndim != 3:
            raise TypeError(f"image_transform must return (c, H, W) tensors, got {type(tensor).__name__}")
    return tensors
