"""A visual question-answering task generated in code: one coloured shape per 32 x 32 image.

Each image shows a square, circle, triangle or cross, in one of six colours, small or large, in
one of the four corners, on a noisy background. Each image in a sequence gets one question about
one attribute, so the answer can only come from that image:

    <image> what color ? red . <image> what corner ? top-left . <image> what shape ? circle . ...

Every slot is ``SLOT_LENGTH`` tokens, so slot k's answer sits at position
``SLOT_LENGTH * k + ANSWER_OFFSET`` in every sequence. Everything is drawn from a
``torch.Generator``, so a seed fixes the data.

Shapes: b batch, t images per sequence, n text length (SLOT_LENGTH * t), c=3 channels, H=W=32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from word_tokenizer import WordTokenizer

IMAGE_SIZE = 32
COLORS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.85, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
}
ATTRIBUTES = {
    "color": tuple(COLORS),
    "shape": ("square", "circle", "triangle", "cross"),
    "size": ("small", "large"),
    "corner": ("top-left", "top-right", "bottom-left", "bottom-right"),
}
QUESTIONS = tuple(ATTRIBUTES)  # question k asks about attribute QUESTIONS[k]
SLOT_LENGTH = 6  # <image> what ATTRIBUTE ? ANSWER .
ANSWER_OFFSET = 4  # the answer's position inside a slot
CHANCE = sum(1 / len(values) for values in ATTRIBUTES.values()) / len(ATTRIBUTES)  # uniform guess per question


def make_tokenizer() -> WordTokenizer:
    """The task's whole vocabulary: specials, question words, answers."""
    answers = [value for values in ATTRIBUTES.values() for value in values]
    return WordTokenizer(["<pad>", "<image>", "what", "?", ".", *QUESTIONS, *answers])


@dataclass
class Scenes:
    """Attribute indices of b scenes, each (b,) long, indexing into ``ATTRIBUTES[name]``."""

    color: Tensor
    shape: Tensor
    size: Tensor
    corner: Tensor

    def labels(self) -> Tensor:
        """(b, 4) long: the attributes in ``QUESTIONS`` order."""
        return torch.stack([getattr(self, name) for name in QUESTIONS], dim=-1)


def sample_scenes(count: int, generator: torch.Generator) -> Scenes:
    """Draw ``count`` scenes with independent, uniform attributes."""
    draw = {name: torch.randint(len(values), (count,), generator=generator) for name, values in ATTRIBUTES.items()}
    return Scenes(**draw)


def render(scenes: Scenes, generator: torch.Generator) -> Tensor:
    """Draw the scenes: -> (b, 3, 32, 32) float images in [0, 1], with jitter in place, size and colour."""
    b = scenes.color.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(b, 1, 1, generator=generator)  # (b, 1, 1)

    quarter = IMAGE_SIZE / 4
    center_x = quarter * (1 + 2 * (scenes.corner % 2)).view(b, 1, 1) + uniform(-1.0, 1.0)
    center_y = quarter * (1 + 2 * (scenes.corner // 2)).view(b, 1, 1) + uniform(-1.0, 1.0)
    radius = torch.where(scenes.size.view(b, 1, 1) == 1, uniform(6.0, 7.0), uniform(3.5, 4.5))
    pixels = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    dx = pixels.view(1, 1, -1) - center_x  # (b, 1, W) -> broadcasts to (b, H, W)
    dy = pixels.view(1, -1, 1) - center_y  # (b, H, 1)
    masks = torch.stack(
        [
            (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85),  # square
            dx**2 + dy**2 <= radius**2,  # circle
            (dy.abs() <= radius * 0.9) & (dx.abs() <= (dy + radius * 0.9) * 0.6),  # triangle, apex up
            ((dx.abs() <= radius / 3) & (dy.abs() <= radius)) | ((dy.abs() <= radius / 3) & (dx.abs() <= radius)),
        ],
        dim=1,
    )  # (b, 4 shapes, H, W)
    mask = masks[torch.arange(b), scenes.shape]  # (b, H, W)
    palette = torch.tensor(list(COLORS.values()))  # (6, 3)
    color = palette[scenes.color] + 0.08 * torch.randn(b, 3, generator=generator)  # (b, 3)
    background = 0.15 + 0.05 * torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    images = torch.where(mask.unsqueeze(1), color.view(b, 3, 1, 1), background)  # (b, 3, H, W)
    return images.clamp(0.0, 1.0)


def encode_slots(scenes: Scenes, questions: Tensor, tokenizer: WordTokenizer) -> Tensor:
    """Question/answer text for (b, t) scenes and (b, t) question ids -> (b, SLOT_LENGTH * t) tokens."""
    labels = scenes.labels()  # (b t, 4)
    rows = []
    for question, label in zip(questions.flatten().tolist(), labels.tolist()):
        name = QUESTIONS[question]
        rows.append(tokenizer.encode(f"<image> what {name} ? {ATTRIBUTES[name][label[question]]} ."))
    b, t = questions.shape
    return torch.tensor(rows).view(b, t * SLOT_LENGTH)  # (b, t slots of SLOT_LENGTH tokens)


@dataclass
class Batch:
    """Few-shot sequences: text (b, n) token ids, images (b, t, 3, H, W), questions (b, t) ids."""

    text: Tensor
    images: Tensor
    questions: Tensor


def make_batch(batch_size: int, num_images: int, tokenizer: WordTokenizer, generator: torch.Generator) -> Batch:
    """``batch_size`` sequences of ``num_images`` image/question/answer slots."""
    scenes = sample_scenes(batch_size * num_images, generator)
    questions = torch.randint(len(QUESTIONS), (batch_size, num_images), generator=generator)
    images = render(scenes, generator).view(batch_size, num_images, 3, IMAGE_SIZE, IMAGE_SIZE)
    return Batch(encode_slots(scenes, questions, tokenizer), images, questions)


def make_labelled_images(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Single images and their attributes for pretraining the encoder: (count, 3, H, W), (count, 4)."""
    scenes = sample_scenes(count, generator)
    return render(scenes, generator), scenes.labels()
