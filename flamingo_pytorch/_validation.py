"""Input checks shared by the public modules: each raises with a message naming the argument."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_ndim(name: str, value: Tensor, ndims: tuple[int, ...], layout: str) -> None:
    check_tensor(name, value)
    if value.ndim not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got a {value.ndim}-d tensor of shape {tuple(value.shape)}")


def check_last_dim(name: str, value: Tensor, expected: int) -> None:
    if value.shape[-1] != expected:
        raise ValueError(f"{name} must have feature size {expected} in its last dimension, got {value.shape[-1]}")


def check_bool(name: str, value: Tensor) -> None:
    check_tensor(name, value)
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = present), got dtype {value.dtype}")


def check_mask(name: str, value: Tensor) -> Tensor:
    """A boolean mask given as bool or as 0/1 integers (as transformers accepts its attention_mask) -> bool."""
    check_tensor(name, value)
    if value.dtype == torch.bool:
        return value
    if value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be a bool tensor (True = present) or 0/1 integers, got dtype {value.dtype}")
    if ((value != 0) & (value != 1)).any():
        raise ValueError(f"{name} holds integers other than 0 and 1: {value.unique().tolist()[:8]}")
    return value.bool()


def check_shape(name: str, value: Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(name: str, value: Tensor, reference_name: str, reference: Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def check_positive(**values: object) -> None:
    """Each value must be an integer >= 1 (constructor sizes)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_count(name: str, value: object) -> None:
    """An integer >= 0 (a number of tokens, an offset)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_time_mask(time_mask: Tensor, shape: tuple[int, int], reference_name: str, reference: Tensor) -> Tensor:
    """time_mask: a (batch, media items) bool or 0/1 integer tensor on the device of ``reference`` -> as bool."""
    time_mask = check_mask("time_mask", time_mask)
    check_shape("time_mask", time_mask, shape, "(batch, media items)")
    check_same_device("time_mask", time_mask, reference_name, reference)
    return time_mask


def check_media_tokens(
    input_ids: Tensor,
    media_token_id: int,
    attention_mask: Tensor | None,
    time_mask: Tensor | None,
    num_items: int,
    *,
    media_name: str = "images",
    earlier_tokens: Tensor | None = None,
    earlier_items: Tensor | None = None,
    unread_items: str = "raise",
) -> None:
    """Each row's media tokens and real media items must match one to one.

    The k-th media token of a row reads its k-th media item, so a row must hold exactly as many
    media tokens as real items (``time_mask`` True; all ``num_items`` without a ``time_mask``), and
    its padded items must follow its real ones. Tokens under ``attention_mask`` 0/False (padding)
    never count. A surplus token would read nothing and a surplus item would be read by no token:
    both are errors, never a silent miss.

    Args:
        input_ids: (b, n) token ids.
        media_token_id: the token that marks a media item.
        attention_mask: (b, j) 1/True for real tokens, j >= n (its last n columns are ``input_ids``'), or None.
        time_mask: (b, t) bool or 0/1, False for padded items, or None.
        num_items: t, the media items per row passed with ``input_ids``.
        media_name: what the items are called in the error ("images", "videos").
        earlier_tokens, earlier_items: (b,) long, counts already held by a conversation's cache.
        unread_items: "raise", or "warn" where a row with fewer media tokens than real items (items that
            no token reads) only warns; more tokens than items always raise.

    Raises:
        ValueError: naming the first row that does not match, with both counts.
    """
    is_media = input_ids == media_token_id  # (b, n)
    if attention_mask is not None:
        is_media = is_media & attention_mask[:, attention_mask.shape[1] - input_ids.shape[1] :].bool()
    tokens = is_media.sum(dim=-1)  # (b,)
    if time_mask is None:
        items, unordered = torch.full_like(tokens, num_items), torch.zeros_like(tokens, dtype=torch.bool)
    else:
        time_mask = time_mask.bool()
        items = time_mask.sum(dim=-1)  # (b,)
        unordered = (time_mask & ~time_mask.cummin(dim=-1).values).any(dim=-1)  # (b,) a real item after a padded one
    if earlier_tokens is not None:
        tokens, items = tokens + earlier_tokens, items + earlier_items
    if unread_items == "warn" and bool((tokens < items).any()):
        row = int((tokens < items).nonzero()[0, 0])
        warnings.warn(
            f"row {row} has {int(tokens[row])} <image> tokens (media_token_id={media_token_id}) but "
            f"{int(items[row])} real {media_name}: the items after its last token are read by no token",
            UserWarning,
            stacklevel=2,
        )
        items = torch.minimum(items, tokens)
    wrong = (tokens != items) | unordered  # (b,)
    if not bool(wrong.any()):
        return
    row = int(wrong.nonzero()[0, 0])
    if bool(unordered[row]):
        raise ValueError(
            f"row {row} of time_mask is {time_mask[row].tolist()}: a padded item (False) comes before a real one, "
            "but the k-th media token reads the k-th item; put each row's real items first and its padding after"
        )
    held = " in the conversation so far" if earlier_tokens is not None else ""
    count, noun = int(items[row]), media_name if int(items[row]) != 1 else media_name.removesuffix("s")
    raise ValueError(
        f"row {row} has {int(tokens[row])} <image> tokens (media_token_id={media_token_id}) but {count} {noun}{held}: "
        "the k-th <image> token reads the k-th item, so give each token one item (mark padded items False in "
        "time_mask), or pass no media at all for text alone"
    )


def check_text(text: object, name: str = "text") -> None:
    """Token ids must be a (b, n) integer tensor."""
    if not isinstance(text, Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(text).__name__}")
    check_ndim(name, text, (2,), "(batch, text length)")
    if text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {text.dtype}")


def check_attention_mask(attention_mask: Tensor | None, text: Tensor) -> None:
    """A (b, n) bool mask over ``text``, left-padded: the last position of every row is real."""
    if attention_mask is None:
        return
    check_bool("attention_mask", attention_mask)
    check_shape("attention_mask", attention_mask, tuple(text.shape), "(batch, text length)")
    check_same_device("attention_mask", attention_mask, "text", text)
    if text.shape[1] and not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask must be left-padded: the last position of every row must be True")
