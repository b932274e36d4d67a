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
``read_shard`` reads a shard to its end-of-archive marker: a shard cut short, or with a damaged member
header, raises ``DamagedShardError`` (tarfile alone would stop there silently, losing the rest).

Shapes: c channels, H x W pixels.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
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


class DamagedShardError(ValueError):
    """A shard that cannot be read to its end: truncated, or with a member header overwritten."""


def read_shard(url: str) -> Iterator[dict]:
    """One shard's samples, in order: ``{"__key__": KEY, "__url__": url, EXT: bytes, ...}`` (webdataset's layout).

    Raises:
        DamagedShardError: naming the shard and the member where reading stopped, when the tar ends before its
            end-of-archive marker (cut at a member boundary or inside one) or a member header is damaged; the
            sample being read then is not yielded.
    """
    stream = import_webdataset().gopen(url, "rb")
    try:
        sample = None
        for name, data in tar_members(stream, url):
            found = re.fullmatch(r"((?:.*/|)[^.]+)\.([^/]*)", name)  # KEY.EXT, split as webdataset does
            if found is None:
                continue
            key, extension = found[1], found[2].lower()
            if sample is not None and key != sample["__key__"]:
                yield sample
                sample = None
            sample = sample or {"__key__": key, "__url__": url}
            if extension in sample:
                raise DamagedShardError(f"shard {url}: member {name} appears twice in sample {key}")
            sample[extension] = data
        if sample is not None:
            yield sample
    finally:
        stream.close()


class CheckedHeader(tarfile.TarInfo):
    """A tar member header that raises where tarfile would end the archive quietly: a missing (cut) or damaged
    header after the first member. Only the end-of-archive marker (a zero block) ends it."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as error:  # EmptyHeaderError, TruncatedHeaderError, InvalidHeaderError
            raise tarfile.ReadError(f"{type(error).__name__}: {error}") from None


def tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in the tar ``stream``, metadata files (``__*__``) left out."""
    last = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=CheckedHeader) as archive:
            for info in archive:
                if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name):
                    yield info.name, archive.extractfile(info).read()
                last, archive.members = info.name, []  # keep no list of what was read
            while chunk := archive.fileobj.read(1 << 16):  # after the end marker, only zero padding
                if any(chunk):
                    raise tarfile.ReadError("data after an end-of-archive marker (a zeroed member header?)")
    except (tarfile.TarError, EOFError, OSError) as error:
        where = "at its first member" if last is None else f"after member {last}"
        raise DamagedShardError(f"shard {url} is truncated or damaged {where}: {error}") from None


def sample_parts(sample: dict) -> list:
    """A sample read from a shard (``{"__key__": ..., "json": bytes, ...}``) -> its parts: strings and
    images, in document order.

    Raises:
        ValueError: naming the shard and the sample, when it is neither a document (``.json`` with a list
            of ``"parts"``, each a string or ``{"image": NAME}`` of one of its files) nor a pair.
    """
    source = f"shard {sample.get('__url__', '?')}, sample {sample.get('__key__', '?')}"
    meta = read_text(sample, "json", source) if "json" in sample else {}
    if isinstance(meta, dict) and "parts" in meta:
        return document_parts(meta["parts"], sample, source)
    if "txt" in sample:
        names = [name for name in IMAGE_EXTENSIONS if name in sample]
        if len(names) != 1:
            raise ValueError(f"{source}: an image-text pair needs exactly one image file, found {names}")
        return [ImageFile(names[0], sample[names[0]], source), read_text(sample, "txt", source)]
    raise ValueError(f"{source}: neither a document (.json with 'parts') nor a pair (.txt + image)")


def document_parts(parts, sample: dict, source: str) -> list:
    """A document's ``"parts"`` -> strings and ``ImageFile``s, checking each against the schema."""
    if not isinstance(parts, list):
        raise ValueError(f"{source}: 'parts' must be a list of strings and {{'image': NAME}}, got {parts!r:.80}")
    read = []
    for part in parts:
        if isinstance(part, str):
            read.append(part)
        elif isinstance(part, dict) and set(part) == {"image"} and part["image"] in sample:
            if not isinstance(part["image"], str) or part["image"].rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
                raise ValueError(f"{source}: image {part['image']!r} must end in one of {IMAGE_EXTENSIONS}")
            read.append(ImageFile(part["image"], sample[part["image"]], source))
        else:
            raise ValueError(f"{source}: a part must be a string or {{'image': NAME}} of a file, got {part!r:.80}")
    return read


def read_text(sample: dict, extension: str, source: str):
    """The sample's ``.txt`` as a string, or its ``.json`` parsed."""
    try:
        text = sample[extension].decode("utf-8")
        return json.loads(text) if extension == "json" else text
    except ValueError as error:  # UnicodeDecodeError, JSONDecodeError
        raise ValueError(f"{source}: its .{extension} is not valid {extension.upper()}: {error}") from None


class ImageFile:
    """An image not decoded yet: its file name in the sample, its bytes, and which shard and sample hold it
    (for error messages); ``decode()`` reads it."""

    def __init__(self, name: str, data: bytes, source: str = ""):
        self.name, self.data, self.source = name, data, source

    def decode(self):
        return decode_image(self.data, self.name.rsplit(".", 1)[-1])
