"""Evaluation for the shapes demo: greedy answers and exact-match accuracy on held-out images.

Shapes: b batch, t images per sequence, n text length, c=3 channels, H=W=32.
"""

from __future__ import annotations

import torch
from shapes_dataset import ANSWER_OFFSET, ATTRIBUTES, CHANCE, QUESTIONS, SLOT_LENGTH, Batch
from torch import Tensor, nn

# How the held-out images are shown to the model, in table order.
SETTINGS = {
    "images": "with images",
    "rolled": "images rolled by one slot",
    "blank": "blank images",
    "text": "text only (frozen LM)",
}


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: Tensor, images: Tensor | None, *, max_new_tokens: int) -> Tensor:
    """Greedy continuation of prompt (b, n) -> (b, max_new_tokens) new token ids.

    ``model.generate`` encodes the images once and decodes with key/value caches; it never emits
    the image token, and leaves the model's train/eval mode and ``requires_grad`` as they were.
    """
    tokens = model.generate(prompt, images, max_new_tokens=max_new_tokens, temperature=0)
    return tokens[:, prompt.shape[1] :]


def show_images(images: Tensor, setting: str) -> Tensor | None:
    """The images (b, t, c, H, W) the model gets in a setting of ``SETTINGS``; None for text only."""
    if setting == "images":
        return images
    if setting == "rolled":
        return images.roll(1, dims=1)  # slot k shows image k-1: right answers now need the wrong image
    if setting == "blank":
        return torch.zeros_like(images)
    return None


@torch.no_grad()
def answer_slots(model: nn.Module, batch: Batch, setting: str) -> tuple[Tensor, Tensor]:
    """Answer every slot of every sequence, one slot at a time with the earlier slots as context.

    Returns (b, t) bool exact matches (the answer word, then the stop token) and (b, t, 2) answers.
    """
    images = show_images(batch.images, setting)
    t = batch.images.shape[1]
    correct, answers = [], []
    for k in range(t):
        end = SLOT_LENGTH * k + ANSWER_OFFSET  # the prompt ends with slot k's "?"
        prompt, target = batch.text[:, :end], batch.text[:, end : end + 2]  # (b, 2): the answer, then "."
        generated = greedy_decode(model, prompt, None if images is None else images[:, : k + 1], max_new_tokens=2)
        correct.append((generated == target).all(dim=-1))
        answers.append(generated)
    return torch.stack(correct, dim=1), torch.stack(answers, dim=1)


def evaluate(model: nn.Module, batches: list[Batch], amp: bool = False) -> dict:
    """Exact-match accuracy in every setting, overall and per question: {setting: {question: acc}}."""
    model.eval()
    device = next(model.parameters()).device
    results = {}
    for setting in SETTINGS:
        hits, questions = [], []
        for batch in batches:
            batch = Batch(batch.text.to(device), batch.images.to(device), batch.questions.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                correct, _ = answer_slots(model, batch, setting)
            hits.append(correct.flatten().cpu())
            questions.append(batch.questions.flatten().cpu())
        hits, questions = torch.cat(hits).float(), torch.cat(questions)
        row = {"all": hits.mean().item()}
        row.update({name: hits[questions == i].mean().item() for i, name in enumerate(QUESTIONS)})
        results[setting] = row
    results["chance"] = {"all": CHANCE, **{name: 1 / len(ATTRIBUTES[name]) for name in QUESTIONS}}
    return results


def format_table(results: dict) -> str:
    """A plain-text table: one row per setting, accuracy overall and per question."""
    columns = ["all", *QUESTIONS]
    names = {**SETTINGS, "chance": "chance (uniform guess)"}
    width = max(len(name) for name in names.values())
    lines = [f"{'exact match on held-out images':<{width}}  " + "  ".join(f"{c:>7}" for c in columns)]
    for key, row in results.items():
        lines.append(f"{names[key]:<{width}}  " + "  ".join(f"{100 * row[c]:6.1f}%" for c in columns))
    return "\n".join(lines)
