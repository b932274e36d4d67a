"""Input checks shared by the public modules: each raises with a message naming the argument."""

from __future__ import annotations

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


def check_time_mask(time_mask: Tensor, shape: tuple[int, int], reference_name: str, reference: Tensor) -> None:
    """time_mask: a (batch, media items) bool tensor on the device of ``reference``."""
    check_bool("time_mask", time_mask)
    check_shape("time_mask", time_mask, shape, "(batch, media items)")
    check_same_device("time_mask", time_mask, reference_name, reference)
