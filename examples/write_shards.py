"""Write webdataset shards: of the generated shapes task (documents or pairs), or of your own documents.

    python examples/write_shards.py out/shapes-docs --count 1024 --images 4 --per-shard 128
    python examples/write_shards.py out/shapes-pairs --pairs --count 1024 --per-shard 128 --format jpg
    python examples/write_shards.py out/mine --jsonl documents.jsonl --per-shard 1000

With ``--jsonl``, each line is a document, ``{"parts": ["text", {"image": "images/1.jpg"}, "more text"]}``,
or a pair, ``{"image": "images/2.jpg", "caption": "a cat"}``; image paths are relative to the file's
folder, and the image files go into the shards as they are.

A document is a few-shot sequence of the demo (shapes_dataset.py): ``<image> what color ? red . <image> ...``,
stored as parts ``[image, "what color ? red .", image, ...]``; a pair is one image and its caption,
``"large red circle top-left ."``. Read them back with ``flamingo_pytorch.data.DocumentLoader`` and the
demo's ``make_tokenizer()`` (see docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules sit next to this file

from shapes_dataset import ATTRIBUTES, make_batch, make_labelled_images, make_tokenizer

from flamingo_pytorch.shards import interleaved_sample, pair_sample, write_shards


def shapes_documents(count: int, num_images: int, seed: int, *, chunk: int = 256) -> Iterator[list]:
    """``count`` few-shot sequences as parts, drawn ``chunk`` at a time with ``make_batch`` from one generator:
    with ``count <= chunk`` they are exactly ``make_batch(count, num_images, tokenizer, Generator(seed))``."""
    tokenizer, generator = make_tokenizer(), torch.Generator().manual_seed(seed)
    for start in range(0, count, chunk):
        batch = make_batch(min(chunk, count - start), num_images, tokenizer, generator)
        for text, images in zip(batch.text, batch.images):
            slots = text.view(num_images, -1)  # (t, SLOT_LENGTH): <image> what ATTRIBUTE ? ANSWER .
            yield [part for slot, image in zip(slots, images) for part in (image, tokenizer.decode(slot[1:]))]


def shapes_pairs(count: int, seed: int, *, chunk: int = 256) -> Iterator[tuple[torch.Tensor, str]]:
    """``count`` single images with a caption naming all four attributes, e.g. ``"large red circle top-left ."``."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, count, chunk):
        images, labels = make_labelled_images(min(chunk, count - start), generator)  # (B, 3, H, W), (B, 4)
        for image, label in zip(images, labels.tolist()):
            words = {name: values[label[i]] for i, (name, values) in enumerate(ATTRIBUTES.items())}
            yield image, f"{words['size']} {words['color']} {words['shape']} {words['corner']} ."


def jsonl_samples(path: Path) -> Iterator[dict]:
    """The documents and pairs of a JSON-lines file (see the module docstring) -> shard samples."""
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        entry, key = json.loads(line), f"{number:08d}"
        if "parts" in entry:
            parts = [part if isinstance(part, str) else path.parent / part["image"] for part in entry["parts"]]
            yield interleaved_sample(key, parts)
        else:
            yield pair_sample(key, path.parent / entry["image"], entry["caption"])


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="where the shards go")
    parser.add_argument("--jsonl", type=Path, help="a file of your own documents and pairs, one a line")
    parser.add_argument("--pairs", action="store_true", help="shapes image-text pairs rather than documents")
    parser.add_argument("--count", type=int, default=1024, help="documents or pairs to write")
    parser.add_argument("--images", type=int, default=4, help="images per document")
    parser.add_argument("--per-shard", type=int, default=128, help="samples per shard")
    parser.add_argument("--format", default="png", choices=["png", "jpg", "npy"], help="image files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jsonl is not None:
        samples = jsonl_samples(args.jsonl)
    elif args.pairs:
        pairs = shapes_pairs(args.count, args.seed)
        samples = (
            pair_sample(f"{i:08d}", image, text, image_format=args.format) for i, (image, text) in enumerate(pairs)
        )
    else:
        docs = shapes_documents(args.count, args.images, args.seed)
        samples = (interleaved_sample(f"{i:08d}", parts, image_format=args.format) for i, parts in enumerate(docs))
    paths = write_shards(samples, args.directory, samples_per_shard=args.per_shard)
    print(f"wrote {len(paths)} shards to {args.directory}")
    return paths


if __name__ == "__main__":
    main()
