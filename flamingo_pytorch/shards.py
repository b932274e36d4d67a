"""The shard format: webdataset tar files of interleaved documents and of image-text pairs, written and read back.

A shard is a tar file; a sample is the files in it that share a key (the name up to the first dot).

- An interleaved document: ``KEY.json`` holding ``{"parts": [...]}``, where each part is either a string
  (text, in order, concatenated as written) or ``{"image": "EXT"}`` naming the sample's image file
  ``KEY.EXT`` (e.g. ``"0.png"``), plus those image files (``.png``, ``.jpg``/``.jpeg``, ``.webp`` or
  ``.npy``).
- An image-text pair (LAION / img2dataset layout): ``KEY.txt`` holding the caption and one image file
  ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``, ``.npy``); a ``KEY.json`` without ``"parts"`` is metadata.

Both read back as the same thing: a list of parts, strings and images, in document order. PNG, JPEG and
WebP images decode to RGB PIL images; ``.npy`` files hold float32 (c, H, W) arrays and decode to tensors.

Shapes: c channels, H x W pixels.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "npy")


def import_webdataset():
    """webdataset, or an ImportError naming the extra that installs it."""
    try:
        import webdataset
    except ImportError as error:
        raise ImportError(
            'reading and writing shards needs webdataset: pip install "flamingo-pytorch[data]"'
        ) from error
    return webdataset


def encode_image(image, extension: str) -> tuple[str, bytes]:
    """An image -> (its file extension, the file's bytes).

    A (c, H, W) float tensor in [0, 1], an (H, W, c) uint8 array or a PIL image is encoded as an
    ``extension`` file: PNG keeps 8-bit pixels exactly (a float tensor is rounded to ``round(255 x) / 255``),
    JPEG is lossy, ``.npy`` keeps a float tensor exactly (as float32 (c, H, W)). A ``pathlib.Path`` to an
    image file is stored as it is, under its own extension.
    """
    import numpy as np

    if isinstance(image, Path):
        suffix = image.suffix.lower().lstrip(".")
        if suffix not in IMAGE_EXTENSIONS:
            raise ValueError(f"image file {image} must end in one of {IMAGE_EXTENSIONS}")
        return suffix, image.read_bytes()
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"image extension must be one of {IMAGE_EXTENSIONS}, got {extension!r}")
    if extension == "npy":
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise TypeError(f"a .npy image must be a (c, H, W) tensor, got {type(image).__name__}")
        buffer = io.BytesIO()
        np.save(buffer, image.detach().cpu().float().numpy())
        return extension, buffer.getvalue()
    from PIL import Image

    if isinstance(image, Tensor):
        if image.ndim != 3:
            raise ValueError(f"an image tensor must be (c, H, W), got shape {tuple(image.shape)}")
        pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (c, H, W)
        image = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).numpy())  # (H, W, c) or (H, W)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[extension])
    return extension, buffer.getvalue()


def decode_image(data: bytes, extension: str):
    """The bytes of an image file -> an RGB PIL image, or a float tensor (c, H, W) for ``.npy``."""
    if extension == "npy":
        import numpy as np

        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).float()
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def interleaved_sample(key: str, parts: Sequence, *, image_format: str = "png") -> dict:
    """An interleaved document -> its shard files: ``{"__key__": key, "json": ..., "0.png": ..., ...}``.

    Args:
        key: the sample's name in the shard (unique within the shard; no dots).
        parts: strings (text) and images (tensors, arrays, PIL images or image file paths), in document order.
        image_format: the file extension for images given as pixels, one of ``IMAGE_EXTENSIONS``.
    """
    check_key(key)
    files, entries = {"__key__": key}, []
    for part in parts:
        if isinstance(part, str):
            entries.append(part)
            continue
        extension, data = encode_image(part, image_format)
        name = f"{len(files) - 1}.{extension}"
        files[name] = data
        entries.append({"image": name})
    files["json"] = json.dumps({"parts": entries}).encode()
    return files


def pair_sample(key: str, image, caption: str, *, image_format: str = "jpg") -> dict:
    """An image-text pair -> its shard files: ``{"__key__": key, "txt": caption, "jpg": ...}``; the image as
    for ``interleaved_sample``."""
    check_key(key)
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    extension, data = encode_image(image, image_format)
    return {"__key__": key, "txt": caption.encode(), extension: data}


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"a sample key must be a non-empty string without '.' or '/', got {key!r}")


def write_shards(
    samples: Iterable[dict], directory: str | Path, *, samples_per_shard: int = 1000, prefix: str = "shard"
) -> list[str]:
    """Write samples (from ``interleaved_sample`` / ``pair_sample``) into tar shards -> the shards' paths.

    Shards are named ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... in ``directory``; each holds
    ``samples_per_shard`` samples, the last one the rest.
    """
    wds = import_webdataset()
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, writer, written = [], None, 0
    try:
        for sample in samples:
            if written % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                paths.append(str(directory / f"{prefix}-{len(paths):06d}.tar"))
                writer = wds.TarWriter(paths[-1], encoder=False, mtime=0.0)
            writer.write(sample)
            written += 1
    finally:
        if writer is not None:
            writer.close()
    return paths


def sample_parts(sample: dict) -> list:
    """A sample read from a shard (``{"__key__": ..., "json": bytes, ...}``) -> its parts: strings and
    images, in document order."""
    key = sample.get("__key__", "?")
    source = f"shard {sample.get('__url__', '?')}, sample {key}"
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if isinstance(meta, dict) and "parts" in meta:
        parts = []
        for part in meta["parts"]:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("image"), str) and part["image"] in sample:
                parts.append(ImageFile(part["image"], sample[part["image"]], source))
            else:
                raise ValueError(f"sample {key}: a part must be a string or {{'image': NAME}} of a file, got {part!r}")
        return parts
    if "txt" in sample:
        names = [name for name in IMAGE_EXTENSIONS if name in sample]
        if len(names) != 1:
            raise ValueError(f"sample {key}: an image-text pair needs exactly one image file, found {names}")
        return [ImageFile(names[0], sample[names[0]], source), sample["txt"].decode()]
    raise ValueError(f"sample {key}: neither a document (.json with 'parts') nor a pair (.txt + image)")


class ImageFile:
    """An image not decoded yet: its file name in the sample, its bytes, and which shard and sample hold it
    (for error messages); ``decode()`` reads it."""

    def __init__(self, name: str, data: bytes, source: str = ""):
        self.name, self.data, self.source = name, data, source

    def decode(self):
        return decode_image(self.data, self.name.rsplit(".", 1)[-1])
