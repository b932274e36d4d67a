"""Interleaved prompts -> the tensors ``Flamingo`` takes: token ids, attention mask, images, time mask, labels.

Shapes: b prompts, n tokens (padded), t images (padded), c channels, H x W pixels.

A prompt is either a list of parts (strings and PIL images, in order) or a string with ``<image>``
markers plus its list of images. Each image becomes an ``<image>`` token in the text and a
(c, H, W) tensor from the encoder's own transform. Prompts are padded to the longest: on the left
for generation, on the right for training, where ``labels`` are the ids with OpenFlamingo's loss
masking (-100 on padding, on ``<image>`` tokens, and on the text before the first image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flamingo_pytorch.tokens import IMAGE_TOKEN


class FlamingoProcessor:
    """Turns interleaved text and images into model inputs.

    Args:
        tokenizer: a Hugging Face tokenizer holding ``<image>`` (see ``add_flamingo_tokens``) and a pad token.
        image_transform: PIL image -> (c, H, W) tensor, e.g. open_clip's preprocess or a torchvision transform.
    """

    def __init__(self, tokenizer, image_transform: Callable):
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: call add_flamingo_tokens(tokenizer, lm) first")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: add one (add_flamingo_tokens does)")
        self.tokenizer, self.image_transform = tokenizer, image_transform
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __call__(
        self, prompts: Sequence, images: Sequence[Sequence] | None = None, *, training: bool = False
    ) -> dict[str, Tensor]:
        """Prompts -> ``input_ids`` (b, n), ``attention_mask`` (b, n), ``images`` (b, t, c, H, W) and
        ``time_mask`` (b, t) (no image keys if no prompt has an image), and with ``training`` also
        ``labels`` (b, n), right-padded; otherwise left-padded for ``generate``.

        Args:
            prompts: each a list of strings and PIL images, or a string with ``<image>`` markers.
            images: for string prompts, each prompt's images in order.
            training: right padding and labels, rather than left padding.
        """
        texts, pictures = self.split(prompts, images)
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        for row, (tokens, row_images) in enumerate(zip(ids, pictures)):
            markers = tokens.count(self.image_token_id)
            if markers != len(row_images):
                raise ValueError(f"prompt {row} has {markers} {IMAGE_TOKEN} tokens but {len(row_images)} images")
        batch = self.pad_text(ids, left=not training)
        if training:
            batch["labels"] = self.labels(batch["input_ids"], batch["attention_mask"])
        if any(pictures):
            batch["images"], batch["time_mask"] = self.pad_images(pictures)
        return batch

    def split(self, prompts: Sequence, images: Sequence[Sequence] | None) -> tuple[list[str], list[list]]:
        """Each prompt -> its text with ``<image>`` markers and its images, in order."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts (wrap a single prompt in a list)")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"images has {len(images)} entries but there are {len(prompts)} prompts")
        texts, pictures = [], []
        for row, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                texts.append(prompt)
                pictures.append(list(images[row]) if images is not None else [])
                continue
            if images is not None:
                raise ValueError("pass images separately only with string prompts; list prompts hold their images")
            parts = [part if isinstance(part, str) else IMAGE_TOKEN for part in prompt]
            texts.append("".join(parts))
            pictures.append([part for part in prompt if not isinstance(part, str)])
        return texts, pictures

    def pad_text(self, ids: list[list[int]], *, left: bool) -> dict[str, Tensor]:
        return pad_token_ids(ids, self.tokenizer.pad_token_id, left=left)

    def labels(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """OpenFlamingo's loss masking: no loss on padding, on ``<image>``, or on text before the first image."""
        return loss_labels(input_ids, attention_mask, self.image_token_id)

    def pad_images(self, pictures: list[list]) -> tuple[Tensor, Tensor]:
        """Each prompt's images through the transform, padded with zeros -> (b, t, c, H, W) and time_mask (b, t)."""
        return stack_images([[self.image_transform(picture) for picture in row] for row in pictures])


def pad_token_ids(
    ids: list[list[int]], pad_id: int, *, left: bool = False, length: int | None = None
) -> dict[str, Tensor]:
    """Token id lists -> ``input_ids`` (b, n) padded with ``pad_id`` and ``attention_mask`` (b, n), 1 on real tokens.

    Args:
        ids: each row's token ids.
        pad_id: the id that fills the padding.
        left: pad on the left (for generation) rather than on the right (for training).
        length: n; the longest row when None.
    """
    longest = max((len(tokens) for tokens in ids), default=0)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a row has {longest} tokens but length={length}")
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        span = slice(length - len(tokens), length) if left else slice(0, len(tokens))
        input_ids[row, span] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def loss_labels(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """OpenFlamingo's loss masking -> labels (b, n): ``input_ids`` with -100 on padding, on ``<image>`` tokens,
    and on the text before each row's first image (a leading BOS included). Not shifted: label i is token i."""
    is_image = input_ids == image_token_id
    before_first_image = is_image.long().cumsum(dim=1) == 0
    keep = attention_mask.bool() & ~is_image & ~before_first_image
    return input_ids.masked_fill(~keep, -100)


def stack_images(tensors: list[list[Tensor]], count: int | None = None) -> tuple[Tensor, Tensor]:
    """Each row's (c, H, W) images, padded with zeros -> images (b, t, c, H, W) and time_mask (b, t), True on images.

    Args:
        tensors: each row's images, all of one shape.
        count: t; the most images in a row when None.
    """
    shapes = {tuple(tensor.shape) for row in tensors for tensor in row}
    if len(shapes) > 1:
        first = next(tensor.shape for row in tensors for tensor in row)
        row, item, shape = next(
            (r, i, t.shape) for r, ts in enumerate(tensors) for i, t in enumerate(ts) if t.shape != first
        )
        raise ValueError(
            f"images must all have one shape after the transform: image {item} of row {row} is {tuple(shape)}, "
            f"the first image is {tuple(first)}"
        )
    most = max((len(row) for row in tensors), default=0)
    count = most if count is None else count
    if most > count:
        raise ValueError(f"a row has {most} images but count={count}")
    shape = shapes.pop() if shapes else ()
    images = torch.zeros(len(tensors), count, *shape)
    time_mask = torch.zeros(len(tensors), count, dtype=torch.bool)
    for row, row_tensors in enumerate(tensors):
        for item, tensor in enumerate(row_tensors):
            images[row, item], time_mask[row, item] = tensor, True
    return images, time_mask
