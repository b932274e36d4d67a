"""What a Flamingo model trains, as one safetensors file: one writer (``save_trained``), one reader (``load_trained``).

The file holds "what trains", keyed by the model's parameter names (``named_parameters``):

- ``model.flamingo_parameters()``: the Perceiver Resampler, the gated cross-attention blocks and, for
  ``Flamingo``, the trained token rows and the parameters of its language model that require grad
  (LoRA adapters added with peft, layers you unfroze); ``FlamingoPaLM``'s PaLM is left out even
  while it is not frozen;
- the persistent buffers of the modules that own those parameters (``token_rows.token_ids``).

Each tensor keeps the dtype it has in the model. The safetensors metadata records the layout the
weights fit (``layout``): the model class, ``cross_attn_layers``, the sizes of the blocks and the
resampler, ``media_token_id`` and the trained token ids. ``load_trained`` refuses, with a
``ValueError`` naming every difference, a file whose layout, keys or shapes differ from the model's
(the same key names at other layers would otherwise load silently), and copies the tensors into the
model's own, which keep their dtype and device.

Under FSDP2 every rank calls ``save_trained``: sharded tensors are all-gathered one at a time, and
rank 0 writes. Load into an unsharded model (before sharding it).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

FORMAT = "flamingo-pytorch trained weights 1"  # the metadata's "format"; files without it predate the layout


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What trains, by name: the parameters described in the module docstring and their modules' buffers."""
    chosen = {id(param) for param in model.flamingo_parameters()}  # Flamingo's include its LM's trained ones
    names = [name for name, param in model.named_parameters() if id(param) in chosen]
    buffers = {}
    for prefix in dict.fromkeys(name.rpartition(".")[0] for name in names):  # the modules that own them
        module = model.get_submodule(prefix)
        if any(True for _ in module.buffers(recurse=False)):
            persistent = {key for key in module.state_dict(keep_vars=True) if "." not in key}  # its own entries
            own = module.named_buffers(prefix=prefix, recurse=False)
            buffers.update({name: buffer for name, buffer in own if name.rpartition(".")[2] in persistent})
    params = dict(model.named_parameters())  # again: a state_dict call may have resharded an FSDP2 unit
    return {**{name: params[name] for name in names}, **buffers}


def layout(model: nn.Module) -> dict[str, Any]:
    """Where and how the trained weights plug into the model: compared on load, key by key."""
    attn, resampler = model.gated_cross_attn[0].attn, model.perceiver_resampler
    chosen = getattr(model, "cross_attn_layers", None)
    if chosen is None:  # FlamingoPaLM: a block before layers 0, N, 2N, ...
        chosen = range(0, len(model.palm.layers), model.cross_attn_every)
    rows = getattr(model, "token_rows", None)
    return {
        "model": next((c for c in type(model).__mro__ if not c.__module__.startswith("torch.")), type(model)).__name__,
        "cross_attn_layers": list(chosen),
        "dim": attn.dim,
        "media_dim": attn.media_dim,
        "heads": attn.heads,
        "dim_head": attn.to_q.out_features // attn.heads,
        "only_attend_immediate_media": attn.only_attend_immediate_media,
        "perceiver_depth": len(resampler.layers),
        "perceiver_num_latents": resampler.latents.shape[0],
        "perceiver_num_time_embeds": None if resampler.time_embeds is None else resampler.time_embeds.shape[0],
        "max_video_frames": None if resampler.frame_embeds is None else resampler.frame_embeds.shape[0],
        "media_token_id": int(model.media_token_id),
        "train_token_ids": [] if rows is None else rows.token_ids.tolist(),
    }


def gather_trained(model: nn.Module, *, rank0_only: bool = False) -> dict[str, Tensor]:
    """``trained_tensors``, whole (sharded ones all-gathered, one at a time: every rank calls this),
    detached, on CPU, in their own dtype. With ``rank0_only`` the other ranks get an empty dict."""
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    gathered = {}
    for name, value in trained_tensors(model).items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # a DTensor's whole value
        if keep:
            gathered[name] = value.detach().cpu().clone().contiguous()
    return gathered


def save_trained(model: nn.Module, path: str | Path) -> None:
    """Write what ``model`` trains to the safetensors file ``path``, with its layout in the metadata.

    A ``Flamingo`` or ``FlamingoPaLM``, in one process or sharded with FSDP2 (then every rank calls
    this; rank 0 writes). The file is written beside ``path`` and renamed into place when complete.
    """
    safetensors = safetensors_package()
    tensors = gather_trained(model, rank0_only=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        metadata = {"format": FORMAT, **{key: json.dumps(value) for key, value in layout(model).items()}}
        partial = Path(f"{path}.partial")
        safetensors.torch.save_file(tensors, str(partial), metadata=metadata)
        os.replace(partial, path)
    if dist.is_initialized():
        dist.barrier()


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Copy ``save_trained``'s file into ``model`` (a fresh, unsharded model wrapped the same way).

    The model's tensors keep their dtype and device.

    Raises:
        ValueError: the layout (e.g. ``cross_attn_layers``), the keys or the shapes differ from the
            model's; every difference is named.
    """
    with safetensors_package().safe_open(str(path), framework="pt") as file:
        metadata, loaded = file.metadata() or {}, {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    expected = trained_tensors(model)
    if any(hasattr(value, "full_tensor") for value in expected.values()):
        raise ValueError("load_trained loads into an unsharded model: load before sharding it")
    problems = layout_differences(metadata, layout(model), path)
    if metadata.get("format") != FORMAT:  # an older file: its parameters only, without buffers
        expected = {k: v for k, v in expected.items() if k in loaded or isinstance(v, nn.Parameter)}
    missing, unexpected = sorted(expected.keys() - loaded.keys()), sorted(loaded.keys() - expected.keys())
    misshaped = sorted(k for k in loaded.keys() & expected.keys() if loaded[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        problems.append(f"missing keys {missing}, unexpected keys {unexpected}, mis-shaped {misshaped}")
    if problems:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(problems))
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(loaded[name])


def layout_differences(metadata: dict[str, str], here: dict[str, Any], path: str | Path) -> list[str]:
    """What differs between the file's recorded layout and the model's (empty: none)."""
    if metadata.get("format") != FORMAT:
        warnings.warn(f"{path} records no layout (an older file): the wrapping cannot be checked", stacklevel=3)
        return []
    saved = {key: json.loads(metadata[key]) if key in metadata else "absent" for key in here}
    differ = [key for key, value in here.items() if saved[key] != value]
    return [f"{key} is {saved[key]} in the file but {here[key]} in this model" for key in differ]


def safetensors_package():
    try:
        import safetensors.torch
    except ModuleNotFoundError as error:
        raise ImportError('trained weights are safetensors files: pip install "flamingo-pytorch[examples]"') from error
    return safetensors


def saved_layout(path: str | Path) -> dict[str, Any] | None:
    """The layout ``save_trained`` recorded in ``path`` (with ``ff_mult`` read off its shapes), or None for
    a file it did not write (an OpenFlamingo checkpoint, say). Raises ValueError for a FlamingoPaLM's file."""
    if not str(path).endswith(".safetensors"):
        return None
    with safetensors_package().safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            return None
        saved = {key: json.loads(value) for key, value in metadata.items() if key != "format"}
        hidden = file.get_slice("gated_cross_attn.0.ff.1.weight").get_shape()[0]  # (dim * ff_mult, dim)
    if saved["model"] != "Flamingo":
        raise ValueError(f"{path} holds a {saved['model']}'s weights, not a Flamingo's")
    saved["ff_mult"] = hidden // saved["dim"]
    return saved


def flamingo_from_layout(saved: dict[str, Any], path: str | Path, lm: nn.Module, encoder: nn.Module | None):
    """A ``Flamingo`` over ``lm`` and ``encoder`` built as the file's layout (``saved_layout``) says, its
    weights loaded, in eval mode."""
    from flamingo_pytorch.flamingo import Flamingo

    keys = ("media_dim", "cross_attn_layers", "dim_head", "heads", "ff_mult", "perceiver_depth")
    keys += ("perceiver_num_latents", "perceiver_num_time_embeds", "only_attend_immediate_media", "train_token_ids")
    model = Flamingo(lm, media_token_id=saved["media_token_id"], vision_encoder=encoder, **{k: saved[k] for k in keys})
    model.load_trained(str(path))
    return model.eval()
