"""Few-shot naming episodes over scikit-learn's handwritten digits (8 x 8, 10 classes, no download).

An N-way K-shot episode draws N digit classes, gives each a made-up name drawn afresh for the
episode, shows K images per class each followed by its name, then asks for a query image's name:

    <image> dax . <image> wug . <image> blick . <image>   ->   wug .

(The image sits right before its name, with no filler words. With "<image> this is a dax ." or
"this is a <image> dax ." the small language model's text-only stage stayed at chance for 1,000 to
1,500 steps in eight tries; without the filler it learns to copy within about 500 steps.)

The name means nothing outside its prompt, so the answer has to be read from the prompt. The
language model's text-only version puts a symbol token, drawn afresh per episode and class, where
each image would be: the same copy-by-matching task with exact matches.

Shapes: E episodes, t = N K + 1 images per episode, n text length, 1 channel, 8 x 8 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from word_tokenizer import WordTokenizer

SEEN_CLASSES, NOVEL_CLASSES = tuple(range(7)), (7, 8, 9)
NAMES = ["dax", "wug", "blick", "fep", "toma", "zup", "kiki", "bouba", "glorp", "mib", "tufa", "pimo"]
NAMES += ["lorp", "nefa", "quib", "rasp", "sorn", "tib", "vash", "yek", "zorb", "gade", "hune", "jibe"]
NUM_SYMBOLS = 48  # the text-only stage's stand-ins for images
SLOT, NAME_AT = 3, 1  # tokens per support item (<image> NAME .), and where the name sits among them
SPLIT_SEED = 0  # the image split is the same for every training seed
# Extra training classes: each seen digit under each of these transforms is a class of its own.
# No 180-degree turns or flips: a turned 6 is a 9, and 7-9 must stay unseen.
TRANSFORMS = ("identity", "rot90", "rot270", "invert", "invert rot90", "invert rot270")


@dataclass
class ImagePool:
    """Images (B, 1, 8, 8) in [0, 1] with class labels (B,) long."""

    images: Tensor
    labels: Tensor

    def classes(self) -> list[int]:
        return sorted(set(self.labels.tolist()))


@dataclass
class Episodes:
    """A batch of episodes: text (E, n) long ending in "NAME ." (the answer), images (E, t, 1, 8, 8),
    classes (E, t) long (the class shown in each image slot; the last slot is the query), answer (E,)
    long (the answer's token id), loss_mask (E, n) bool (True on names the prompt makes predictable,
    i.e. of a class already named earlier in the episode), and symbols (E, n) long (the text with each
    <image> replaced by its class's symbol, for the text-only stage)."""

    text: Tensor
    images: Tensor
    classes: Tensor
    answer: Tensor
    loss_mask: Tensor
    symbols: Tensor


def make_tokenizer() -> WordTokenizer:
    symbols = [f"<s{i}>" for i in range(NUM_SYMBOLS)]
    return WordTokenizer(["<pad>", "<image>", ".", *NAMES, *symbols])


def transform(images: Tensor, name: str) -> Tensor:
    """Apply one of ``TRANSFORMS`` to images (B, 1, 8, 8)."""
    if "invert" in name:
        images = 1.0 - images
    if "rot90" in name:
        images = images.rot90(1, dims=(-2, -1))
    if "rot270" in name:
        images = images.rot90(3, dims=(-2, -1))
    return images


def load_pools() -> dict[str, ImagePool]:
    """The fixed split: seen classes 0-6 into train (60%), val (15%) and test (25%) images; the
    novel classes 7-9 whole. -> {"train", "val", "test", "novel"}."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            'the digits demo needs scikit-learn: pip install "flamingo-pytorch[examples]"'
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    parts = {"train": [], "val": [], "test": []}
    for digit in SEEN_CLASSES:
        index = torch.nonzero(labels == digit).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        a, b = int(0.6 * len(index)), int(0.75 * len(index))
        for part, chosen in zip(parts, (index[:a], index[a:b], index[b:])):
            parts[part].append(chosen)
    pools = {part: ImagePool(images[torch.cat(ix)], labels[torch.cat(ix)]) for part, ix in parts.items()}
    novel = torch.isin(labels, torch.tensor(NOVEL_CLASSES))
    pools["novel"] = ImagePool(images[novel], labels[novel])
    return pools


def with_transforms(pool: ImagePool, transforms: tuple[str, ...]) -> ImagePool:
    """Each (digit, transform) pair becomes class ``digit * len(transforms) + i``."""
    images = [transform(pool.images, name) for name in transforms]
    labels = [pool.labels * len(transforms) + i for i in range(len(transforms))]
    return ImagePool(torch.cat(images), torch.cat(labels))


def instance_pool(pool: ImagePool) -> ImagePool:
    """Each image of ``pool`` a class of its own, held twice. A 1-shot episode over it names single
    images (two of its ways may show the same digit), and its query is a second copy of one support
    image, which training then augments differently: a class code per digit cannot answer it, only
    what tells one image from another can."""
    return ImagePool(pool.images.repeat(2, 1, 1, 1), torch.arange(len(pool.labels)).repeat(2))


def sample_episodes(
    pool: ImagePool, count: int, ways: int, shots: int, generator: torch.Generator, tokenizer: WordTokenizer
) -> Episodes:
    """``count`` N-way K-shot episodes from ``pool``; every class needs at least K + 1 images."""
    classes = pool.classes()
    if ways > min(len(classes), len(NAMES)):
        raise ValueError(f"ways must be at most {min(len(classes), len(NAMES))} for this pool, got {ways}")
    by_class = {c: torch.nonzero(pool.labels == c).flatten() for c in classes}
    words = tokenizer.ids
    rows, slots, answers, masks, symbol_rows = [], [], [], [], []
    for _ in range(count):
        chosen = [classes[i] for i in torch.randperm(len(classes), generator=generator)[:ways]]
        names = [words[NAMES[i]] for i in torch.randperm(len(NAMES), generator=generator)[:ways]]
        symbols = [words[f"<s{i}>"] for i in torch.randperm(NUM_SYMBOLS, generator=generator)[:ways]]
        query = int(torch.randint(ways, (1,), generator=generator))
        picks = {}  # way -> image indices, K for the support (+ 1 for the query's class)
        for way, c in enumerate(chosen):
            need = shots + (way == query)
            picks[way] = by_class[c][torch.randperm(len(by_class[c]), generator=generator)[:need]].tolist()
        order = [(way, k) for way in range(ways) for k in range(shots)]
        order = [order[i] for i in torch.randperm(len(order), generator=generator)] + [(query, shots)]
        text, symbol_text, mask, named = [], [], [], set()
        for way, _ in order:
            text += [words["<image>"], names[way], words["."]]
            symbol_text += [symbols[way], names[way], words["."]]
            mask += [False, way in named, False]
            named.add(way)
        rows.append(text), symbol_rows.append(symbol_text), masks.append(mask), answers.append(names[query])
        slots.append([(picks[way][k], chosen[way]) for way, k in order])
    index = torch.tensor([[i for i, _ in row] for row in slots])  # (E, t)
    return Episodes(
        text=torch.tensor(rows),
        images=pool.images[index],  # (E, t, 1, 8, 8)
        classes=torch.tensor([[c for _, c in row] for row in slots]),
        answer=torch.tensor(answers),
        loss_mask=torch.tensor(masks),
        symbols=torch.tensor(symbol_rows),
    )


def prompt_of(episodes: Episodes) -> Tensor:
    """The prompt (E, n - 2): the text without the answer "NAME .", ending in the query's <image>."""
    return episodes.text[:, :-2]


def next_token_labels(text: Tensor, loss_mask: Tensor) -> Tensor:
    """Labels (E, n) for ``forward(labels=)``: position i predicts token i + 1 where it is a
    predictable name, -100 elsewhere."""
    labels = torch.full_like(text, -100)
    labels[:, :-1] = torch.where(loss_mask[:, 1:], text[:, 1:], -100)
    return labels
