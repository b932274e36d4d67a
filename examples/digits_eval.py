"""Evaluation for the digits demo: exact match over fixed episodes, controls, the nearest-neighbour
ceiling, 95% intervals, and the figure.

Shapes: E episodes, t = N K + 1 images per episode (the query last), n text length, e feature width.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from digits_encoder import nearest_neighbour_answers
from digits_episodes import NAME_AT, SLOT, Episodes, ImagePool, prompt_of, sample_episodes
from torch import Tensor, nn
from word_tokenizer import WordTokenizer

EVAL_SEED = 2**31 - 1  # evaluation episodes come from their own seed, the same in every run
# How the episodes are shown to the model, in table order.
SETTINGS = {
    "images": "with the images",
    "withheld": "control: images withheld (text only)",
    "foreign_query": "control: query from a class not in the prompt",
    "moved_supports": "control: support images moved one place",
}


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion hits / total."""
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(correct: Tensor) -> dict:
    """Exact-match accuracy with its 95% interval from a (E,) bool tensor."""
    hits, total = int(correct.sum()), len(correct)
    low, high = wilson_interval(hits, total)
    return {"accuracy": hits / total, "low": low, "high": high}


def foreign_queries(episodes: Episodes, others: ImagePool, generator: torch.Generator) -> Tensor:
    """For each episode an image (E, 1, 8, 8) from ``others`` of a class absent from its prompt."""
    chosen = []
    for classes in episodes.classes.tolist():
        allowed = torch.nonzero(~torch.isin(others.labels, torch.tensor(classes))).flatten()
        chosen.append(allowed[torch.randint(len(allowed), (1,), generator=generator)])
    return others.images[torch.cat(chosen)]


def shown_images(episodes: Episodes, setting: str, foreign: Tensor) -> Tensor | None:
    """The images (E, t, 1, 8, 8) the model gets in a setting of ``SETTINGS``; None when withheld."""
    images = episodes.images
    if setting == "withheld":
        return None
    if setting == "foreign_query":
        return torch.cat((images[:, :-1], foreign[:, None]), dim=1)
    if setting == "moved_supports":  # support k shows support k-1's image, beside support k's name
        return torch.cat((images[:, :-1].roll(1, dims=1), images[:, -1:]), dim=1)
    return images


@torch.no_grad()
def answer(model: nn.Module, episodes: Episodes, images: Tensor | None, batch: int = 250) -> Tensor:
    """Greedy one-token answers (E,) to the episodes' prompts (every name is one token), ``batch`` at a time."""
    prompt, out = prompt_of(episodes), []
    for start in range(0, len(prompt), batch):
        rows = slice(start, start + batch)
        tokens = model.generate(prompt[rows], None if images is None else images[rows], max_new_tokens=1, temperature=0)
        out.append(tokens[:, -1])
    return torch.cat(out)


def evaluate_setting(
    model: nn.Module, pool: ImagePool, others: ImagePool, ways: int, shots: int, count: int, tokenizer: WordTokenizer
) -> tuple[dict, Episodes, Tensor]:
    """Every setting of ``SETTINGS`` and the nearest-neighbour matcher on ``count`` fixed episodes.

    -> the row of results, the episodes, and the model's answers (E,) with the real images.
    """
    generator = torch.Generator().manual_seed(EVAL_SEED + 1000 * ways + shots)
    episodes = sample_episodes(pool, count, ways, shots, generator, tokenizer)
    foreign = foreign_queries(episodes, others, generator)
    row, answers = {"ways": ways, "shots": shots, "episodes": count, "chance": 1 / ways}, None
    for setting in SETTINGS:
        given = answer(model, episodes, shown_images(episodes, setting, foreign))
        row[setting] = score(given == episodes.answer)
        answers = given if setting == "images" else answers
    nearest = nearest_neighbour_answers(model.img_encoder, episodes.images)  # (E,) support slots
    names = episodes.text[torch.arange(count), SLOT * nearest + NAME_AT]
    row["nearest_neighbour"] = score(names == episodes.answer)
    return row, episodes, answers


def format_table(rows: list[dict]) -> str:
    columns = ["images", "nearest_neighbour", "withheld", "foreign_query", "moved_supports"]
    header = f"{'split':<7}{'N-way K-shot':<14}{'chance':>8}" + "".join(f"{c:>22}" for c in columns)
    lines = [header]
    for row in rows:
        cells = "".join(
            f"{100 * row[c]['accuracy']:>9.1f} [{100 * row[c]['low']:4.1f},{100 * row[c]['high']:5.1f}]"
            for c in columns
        )
        lines.append(f"{row['split']:<7}{row['ways']}-way {row['shots']}-shot{'':<3}{100 * row['chance']:>8.1f}{cells}")
    return "\n".join(lines)


def save_figure(path: Path, shown: list[tuple[str, Episodes, Tensor]], tokenizer: WordTokenizer) -> None:
    """A PNG with one row per episode: the support images under their names, then the query under the
    model's answer (green right, red wrong). ``shown`` holds (title, episodes, answers (E,))."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError('the figure needs matplotlib: pip install "flamingo-pytorch[examples]"') from error
    rows = [(title, episodes, answers, e) for title, episodes, answers in shown for e in range(len(episodes.text))]
    columns = max(episodes.images.shape[1] for _, episodes, _ in shown)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.5 * len(rows)), squeeze=False)
    for r, (title, episodes, answers, e) in enumerate(rows):
        t = episodes.images.shape[1]
        for c in range(columns):
            axis = axes[r, c]
            axis.axis("off")
            if c >= t:
                continue
            axis.imshow(episodes.images[e, c, 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
            if c < t - 1:
                axis.set_title(tokenizer.words[int(episodes.text[e, SLOT * c + NAME_AT])], fontsize=9)
                continue
            said, truth = tokenizer.words[int(answers[e])], tokenizer.words[int(episodes.answer[e])]
            right = said == truth
            axis.set_title(
                f"? {said}" + ("" if right else f" (not {truth})"), fontsize=9, color="green" if right else "red"
            )
        axes[r, 0].text(-0.6, 0.5, title, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    figure.suptitle("Support images under the names this prompt gave them; last: the query and the model's answer")
    figure.savefig(path, dpi=60, bbox_inches="tight")
    plt.close(figure)
