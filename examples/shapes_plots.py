"""The demo's figure: loss curves of the three training stages and held-out images with answers."""

from __future__ import annotations

from pathlib import Path

from shapes_dataset import QUESTIONS
from torch import Tensor
from word_tokenizer import WordTokenizer

STAGES = {"encoder": "1b. image encoder (attributes)", "lm": "1. language model (text only)", "flamingo": "2. Flamingo"}


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Running mean over the last ``window`` values."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def save_figure(
    path: Path,
    losses: dict[str, list[float]],
    images: Tensor,
    questions: Tensor,
    answers: Tensor,
    truths: Tensor,
    tokenizer: WordTokenizer,
) -> None:
    """Write a PNG: a row of loss curves, then held-out images (N, 3, H, W) titled with
    question ids (N,), the model's answer ids (N,) and the true ones (N,): green right, red wrong."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("the demo's figure needs matplotlib: pip install matplotlib") from error
    columns = 8
    rows = -(-len(images) // columns)
    figure = plt.figure(figsize=(2 * columns, 3.6 + 2.4 * rows))
    grid = figure.add_gridspec(2, 1, height_ratios=[1.6, rows], hspace=0.35)
    curves = grid[0].subgridspec(1, len(STAGES), wspace=0.25)
    for i, (key, title) in enumerate(STAGES.items()):
        axis = figure.add_subplot(curves[i])
        values = losses.get(key, [])
        axis.plot(values, alpha=0.3, color="C0")
        axis.plot(smooth(values), color="C0")
        axis.set(title=title, xlabel="step", ylabel="loss")
    cells = grid[1].subgridspec(rows, columns, hspace=0.5)
    for i, image in enumerate(images):
        axis = figure.add_subplot(cells[i // columns, i % columns])
        axis.imshow(image.permute(1, 2, 0).float().clamp(0, 1).numpy())
        right = bool(answers[i] == truths[i])
        question = QUESTIONS[int(questions[i])]
        answer = tokenizer.words[int(answers[i])]
        if not right:
            answer += f" (not {tokenizer.words[int(truths[i])]})"
        axis.set_title(f"what {question} ?\n{answer}", fontsize=9, color="green" if right else "red")
        axis.axis("off")
    figure.suptitle(
        "Loss curves; below, held-out few-shot sequences (read left to right) with the model's answers: "
        "green right, red wrong"
    )
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)
