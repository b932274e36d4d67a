"""OpenFlamingo's released checkpoints on this library's ``Flamingo``: same language model, same encoder.

OpenFlamingo publishes a ``checkpoint.pt``: a state dict of its ``Flamingo`` (keys below), loaded
by its users with ``load_state_dict(strict=False)`` onto a model built from the same Hugging Face
language model and open_clip ViT. ``load_openflamingo`` builds our ``Flamingo`` over the language
model and encoder the user already loaded, with the sizes the checkpoint implies, and copies every
tensor across. Nothing is unpickled: ``torch.load(weights_only=True)`` or safetensors only.

Their keys, and ours (``<layers>`` is the decoder layer list, e.g. ``transformer.blocks`` for MPT,
``gpt_neox.layers`` for RedPajama / GPT-NeoX, ``model.layers`` for Llama):

    perceiver.latents, .layers.*, .norm.*         -> perceiver_resampler.*   (same names)
    perceiver.media_time_embs (T, 1, e)           -> perceiver_resampler.time_embeds
    lang_encoder.<layers>.{i}.gated_cross_attn_layer.*  -> gated_cross_attn.{j}.*, the block before layer i
    lang_encoder.gated_cross_attn_layers.{i}.*    (the same block again, in an unfiltered state dict)
    lang_encoder.<layers>.{i}.decoder_layer.*     -> lm.<layers>.{i}.*  (unfiltered state dicts only)
    lang_encoder.old_decoder_blocks.{i}.*         (the same layer again)
    lang_encoder.*  (input embeddings with the added tokens, ...)  -> lm.*
    vision_encoder.*  (the open_clip visual tower)               -> vision_encoder.encoder.*

OpenFlamingo puts a block before decoder layers N - 1, 2N - 1, ... (``cross_attn_every_n_layers``
= N); the layers are read off the keys. Its blocks and resampler use 8 heads of width 64, and its
released models have no media-time embeddings (``perceiver_num_time_embeds=None`` here).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from flamingo_pytorch.flamingo import Flamingo
from flamingo_pytorch.fusion import resampler_and_blocks
from flamingo_pytorch.language_model import decoder_width
from flamingo_pytorch.vision import VisionEncoder

END_OF_CHUNK_TOKEN, IMAGE_TOKEN = "<|endofchunk|>", "<image>"  # OpenFlamingo adds them in this order
HEAD_WIDTH = 64  # dim_head of OpenFlamingo's gated blocks and resampler

GATED = re.compile(r"lang_encoder\.(?P<layers>.+)\.(?P<i>\d+)\.gated_cross_attn_layer\.(?P<rest>.+)")
GATED_COPY = re.compile(r"lang_encoder\.gated_cross_attn_layers\.(?P<i>\d+)\.(?P<rest>.+)")
DECODER = re.compile(r"lang_encoder\.(?P<layers>.+)\.(?P<i>\d+)\.decoder_layer\.(?P<rest>.+)")
DECODER_COPY = re.compile(r"lang_encoder\.old_decoder_blocks\.(?P<i>\d+)\.(?P<rest>.+)")


def add_openflamingo_tokens(tokenizer, lm: nn.Module) -> tuple[int, int]:
    """Add ``<|endofchunk|>`` and ``<image>`` (and ``<PAD>`` if there is no pad token) the way
    OpenFlamingo does, so that the ids match its checkpoint's embedding rows, and resize the
    language model's embeddings to the tokenizer -> (image id, end-of-chunk id)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK_TOKEN, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    lm.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or from a ``torch.save`` file read with ``weights_only=True``.

    Raises:
        ValueError: naming the file, when it is damaged, truncated or empty, not a checkpoint, holds
            pickled Python objects (never unpickled here), or holds anything but tensors under string keys.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as error:
        # torch's text advises weights_only=False, i.e. running the file's code: none of it is passed on
        raise ValueError(f"cannot read {path}: {unpickling_reason(error)}") from None
    except Exception as error:  # EOFError, OSError, RuntimeError (zip), SafetensorError: a damaged file
        first = re.split(r"(?<=\.)\s", str(error).strip())[0] or "end of file"  # its first sentence
        reason = f"{type(error).__name__}: {first}"
        raise ValueError(
            f"cannot read {path}: it is empty, truncated or not a torch.save / safetensors file ({reason})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def unpickling_reason(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, in words that never suggest unpickling anyway."""
    text = f"{error} {error.__context__ or ''}"
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if found:
        return (
            f"it holds a pickled Python object ({found[1]}), not only tensors; load_openflamingo never unpickles "
            "objects: save the state dict's tensors alone (torch.save(state_dict) or safetensors)"
        )
    return "it is damaged or not a checkpoint: its pickle stream is invalid"


def load_openflamingo(
    checkpoint: str | Path | Mapping[str, Tensor],
    lm: nn.Module,
    *,
    media_token_id: int,
    vision_encoder: nn.Module | None = None,
) -> Flamingo:
    """Build ``Flamingo`` over ``lm`` and ``vision_encoder`` and load an OpenFlamingo checkpoint into it.

    Args:
        checkpoint: the path of OpenFlamingo's ``checkpoint.pt`` (or a ``.safetensors`` file), or
            the state dict itself (a released one, or ``their_model.state_dict()``).
        lm: the Hugging Face causal language model the checkpoint was trained on, with the
            OpenFlamingo tokens added (``add_openflamingo_tokens``).
        media_token_id: the id of ``<image>`` in the tokenizer.
        vision_encoder: the open_clip CLIP model (or its ``visual`` tower) it was trained with.

    Returns:
        The ``Flamingo`` model, in eval mode, with the checkpoint's tensors copied in.

    Raises:
        ValueError: listing the checkpoint's keys that map to nothing, the trained keys it lacks,
            and the tensors whose shapes differ from the model's.
    """
    if isinstance(checkpoint, (str, Path)):
        state, source = read_checkpoint(checkpoint), str(checkpoint)
    else:
        state, source = dict(checkpoint), "the checkpoint"
    gated = sorted({(m["layers"], int(m["i"])) for m in map(GATED.fullmatch, state) if m})
    if not gated or len({layers for layers, _ in gated}) != 1:
        found = sorted({layers for layers, _ in gated})
        raise ValueError(
            f"{source}: want gated blocks under one lang_encoder.<layers>.<i>.gated_cross_attn_layer, found {found}"
        )
    layers_path, chosen = gated[0][0], [i for _, i in gated]
    config = sizes(state, source)
    mapped, unknown = map_keys(state, layers_path, chosen)
    expected = expected_shapes(lm, vision_encoder, len(chosen), config)
    check_against(expected, mapped, unknown, vision_encoder, source)
    model = Flamingo(  # only now is lm wrapped: a checkpoint that does not fit leaves it as it was
        lm,
        media_token_id=media_token_id,
        vision_encoder=vision_encoder,
        layers=lm.get_submodule(layers_path),
        cross_attn_layers=chosen,
        **config,
    ).eval()
    unexpected = model.load_state_dict(mapped, strict=False).unexpected_keys
    if unexpected:  # expected_shapes and Flamingo disagree: a bug here, not in the checkpoint
        raise RuntimeError(f"load_openflamingo built a model without the keys {unexpected}")
    return model


def expected_shapes(lm: nn.Module, vision_encoder: nn.Module | None, blocks: int, config: dict) -> dict[str, tuple]:
    """The shapes of our Flamingo's state dict, found without touching ``lm``: the language model's
    own keys (wrapping keeps them), the encoder's, and the resampler and gated blocks built on the
    meta device (no memory)."""
    shapes = {f"lm.{key}": tuple(value.shape) for key, value in lm.state_dict().items()}
    if vision_encoder is not None:
        encoder = VisionEncoder(vision_encoder).state_dict()
        shapes.update({f"vision_encoder.{key}": tuple(value.shape) for key, value in encoder.items()})
    with torch.device("meta"):
        resampler, gated = resampler_and_blocks(blocks, dim=decoder_width(lm), **config)
    shapes.update({f"perceiver_resampler.{key}": tuple(v.shape) for key, v in resampler.state_dict().items()})
    shapes.update({f"gated_cross_attn.{key}": tuple(v.shape) for key, v in gated.state_dict().items()})
    return shapes


def sizes(state: dict[str, Tensor], source: str = "the checkpoint") -> dict:
    """Flamingo's constructor sizes implied by the checkpoint's resampler and gated blocks.

    Raises:
        ValueError: naming ``source`` and the tensor, when one that gives a size is missing or has too few dims.
    """
    if "perceiver.latents" not in state:
        raise ValueError(f"{source} has no perceiver.latents: not an OpenFlamingo checkpoint")
    if "perceiver.frame_embs" in state:
        raise ValueError(
            f"{source}: perceiver.frame_embs: video checkpoints are not supported by Flamingo (images only)"
        )
    num_latents, media_dim = shape_of(state, "perceiver.latents", 2, source)
    depth = len({key.split(".")[2] for key in state if key.startswith("perceiver.layers.")})
    if not depth:
        raise ValueError(f"{source} has no perceiver.layers.*: not an OpenFlamingo checkpoint")
    inner, dim = shape_of(state, first_block_key(state, "attn.to_q.weight", source), 2, source)
    hidden = shape_of(state, first_block_key(state, "ff.1.weight", source), 2, source)[0]
    time = state.get("perceiver.media_time_embs")
    return dict(
        media_dim=media_dim,
        dim_head=HEAD_WIDTH,
        heads=inner // HEAD_WIDTH,
        ff_mult=hidden // dim,
        perceiver_depth=depth,
        perceiver_num_latents=num_latents,
        perceiver_num_time_embeds=None if time is None else shape_of(state, "perceiver.media_time_embs", 3, source)[0],
    )


def first_block_key(state: dict[str, Tensor], rest: str, source: str) -> str:
    """The first gated block's key ending in ``rest`` (e.g. ``attn.to_q.weight``)."""
    key = next((key for key in state if GATED.fullmatch(key) and key.endswith(f".gated_cross_attn_layer.{rest}")), None)
    if key is None:
        raise ValueError(
            f"{source}: no gated block has its {rest} (lang_encoder.<layers>.<i>.gated_cross_attn_layer.{rest})"
        )
    return key


def shape_of(state: dict[str, Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    """The shape of ``state[key]``, which must have ``ndim`` dims."""
    if state[key].ndim != ndim:
        raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, want {ndim} dims")
    return tuple(state[key].shape)


def map_keys(state: dict[str, Tensor], layers_path: str, chosen: list[int]) -> tuple[dict[str, Tensor], list[str]]:
    """OpenFlamingo keys -> ours; the duplicate copies they save must equal the originals."""
    block_of = {layer: j for j, layer in enumerate(chosen)}
    mapped, unknown, copies = {}, [], {}
    for key, value in state.items():
        ours = our_key(key, layers_path, block_of)
        if ours is None:
            unknown.append(key)
        elif GATED_COPY.fullmatch(key) or DECODER_COPY.fullmatch(key):
            copies[ours] = (key, value)
        else:
            mapped[ours] = value
    for ours, (key, value) in copies.items():
        if ours not in mapped:
            mapped[ours] = value
        elif not torch.equal(mapped[ours], value):
            raise ValueError(f"{key} differs from the tensor it duplicates ({ours} here)")
    return mapped, unknown


def our_key(key: str, layers_path: str, block_of: dict[int, int]) -> str | None:
    """The key in our ``Flamingo``'s state dict for one OpenFlamingo key, or None."""
    if key == "perceiver.media_time_embs":
        return "perceiver_resampler.time_embeds"
    if key.startswith("perceiver."):
        return "perceiver_resampler." + key[len("perceiver.") :]
    if key.startswith("vision_encoder."):
        return "vision_encoder.encoder." + key[len("vision_encoder.") :]
    for pattern in (GATED, GATED_COPY):
        match = pattern.fullmatch(key)
        if match and match.groupdict().get("layers", layers_path) == layers_path:
            j = block_of.get(int(match["i"]))
            return None if j is None else f"gated_cross_attn.{j}.{match['rest']}"
    for pattern in (DECODER, DECODER_COPY):
        match = pattern.fullmatch(key)
        if match and match.groupdict().get("layers", layers_path) == layers_path:
            return f"lm.{layers_path}.{match['i']}.{match['rest']}"
    if key.startswith("lang_encoder.gated_cross_attn_layers.") or key.startswith("lang_encoder.old_decoder_blocks."):
        return None
    return "lm." + key[len("lang_encoder.") :] if key.startswith("lang_encoder.") else None


def check_against(
    expected: dict[str, tuple],
    mapped: dict[str, Tensor],
    unknown: list[str],
    vision_encoder: nn.Module | None,
    source: str = "the checkpoint",
) -> None:
    """Raise ValueError unless every key has a place of the same shape and every trained tensor is given."""
    unknown = unknown + sorted(key for key in mapped if key not in expected)
    trained = [k for k in expected if k.startswith(("perceiver_resampler.", "gated_cross_attn."))]
    missing = sorted(k for k in trained if k not in mapped)
    misshaped = sorted(
        f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}"
        for k, v in mapped.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    if unknown or missing or misshaped:
        hint = ""
        if any("embed" in entry or "wte" in entry for entry in misshaped):
            hint = " (embedding rows differ: add the tokens first with add_openflamingo_tokens(tokenizer, lm))"
        if any(key.startswith("vision_encoder.") for key in unknown) and vision_encoder is None:
            hint += " (the checkpoint holds vision encoder weights: pass vision_encoder=)"
        raise ValueError(
            f"cannot load {source} as an OpenFlamingo checkpoint: unknown keys {unknown}, missing keys {missing}, "
            f"mis-shaped {misshaped}{hint}"
        )
