"""The few-shot digits demo as a classification task for ``python -m flamingo_pytorch.evaluate``.

    python examples/digits_eval_data.py --split novel --out out_digits/harness_novel   # writes the data
    DIGITS_CHECKPOINT=out_digits/few_shot_digits.safetensors python -m flamingo_pytorch.evaluate \\
        --model_script examples/digits_eval_data.py $(cat out_digits/harness_novel/arguments.txt) --shots 1 2 4
    # the demo's N-way K-shot episodes: K per class, --shots K x N (3 ways: 3 6 12)
    ... --class_balanced --shots 3 6 12

The harness's classification reads JSON image lists (its ``--imagenet_*_list`` arguments, so the
results are filed under "imagenet"). Each digit class gets one made-up name for the whole set
(``CLASS_NAMES``: the model knows no name outside its prompt, so a fixed assignment is one of the
episodes' random ones), and the demo's format is the template: ``<image> dax . `` per
demonstration, ``<image>`` for the query, the class names ranked by likelihood after it. The images
are the demo's held-out ones: ``novel`` the digits 7, 8, 9 that no stage trained on, ``seen`` the
test images of digits 0-4; each class's images alternate between the demonstrations' pool and the
queries. By default the harness draws demonstrations at random from the pool (OpenFlamingo's
protocol), not K per class, so a query's class is sometimes absent from its prompt: ``coverage``
measures how often it is present, the ceiling for a model that can only name what the prompt
names. ``--class_balanced`` draws the demo's N-way K-shot episodes instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules sit next to this file

from digits_episodes import NAMES, ImagePool, load_pools, make_tokenizer
from harness_data import command_line, pil_to_tensor, transformers_tokenizer, write_json

TEMPLATES = {"imagenet": {"demonstration": "<image> {class_name} . ", "query": "<image>"}}
END_OF_ANSWER = "."
CLASS_NAMES = dict(zip(range(10), NAMES))  # digit -> its made-up name in this set
PIXEL_SCALE = 240.0  # the digits' 17 grey levels k / 16 are stored as 15 k, so k * 15 / 240 gives them back
SPLITS = {"novel": (7, 8, 9), "seen": (0, 1, 2, 3, 4)}


def save_digit(image: torch.Tensor, path: Path) -> None:
    """(1, 8, 8) in {0, 1/16, ..., 1} -> an 8-bit greyscale PNG holding 15 k for level k (exact)."""
    from PIL import Image

    levels = (image[0] * 16).round().to(torch.uint8) * 15  # (8, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(levels.numpy(), mode="L").save(path)


def digits_transform(image) -> torch.Tensor:
    """PIL greyscale digit -> (1, 8, 8) in [0, 1], as the demo's images."""
    return pil_to_tensor(image, scale=PIXEL_SCALE)


def write_digits_classification(root: str | Path, split: str = "novel", per_class: int | None = None) -> dict:
    """Write the images and the two JSON lists under ``root`` -> the evaluate command's arguments.
    ``per_class``: at most this many images of each class (default: all)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root)
    pool: ImagePool = load_pools()["novel" if split == "novel" else "test"]
    lists = {"train": [], "test": []}
    for digit in SPLITS[split]:
        index = torch.nonzero(pool.labels == digit).flatten().tolist()[:per_class]
        for position, i in enumerate(index):
            part = "train" if position % 2 == 0 else "test"
            name = f"images/{digit}_{i:04d}.png"
            save_digit(pool.images[i], root / name)
            lists[part].append({"image": name, "class_name": CLASS_NAMES[digit]})
    arguments = {f"imagenet_{part}_list": write_json(root / f"{part}.json", items) for part, items in lists.items()}
    arguments["prompt_templates"] = write_json(root / "prompt_templates.json", TEMPLATES)
    arguments["end_of_chunk"] = END_OF_ANSWER
    (root / "arguments.txt").write_text(" ".join(command_line(arguments)) + "\n", encoding="utf-8")
    return arguments


def coverage(arguments: dict, shots: int, seed: int, num_samples: int = -1, batch_size: int = 8) -> float:
    """The fraction of evaluated queries whose class is among their demonstrations' (same draws as
    the harness with these settings)."""
    from flamingo_pytorch.evaluation import runner, tasks
    from flamingo_pytorch.evaluation.prompts import PromptTemplate

    data = runner.image_list_data(arguments["imagenet_train_list"], arguments["imagenet_test_list"])
    template = PromptTemplate(**TEMPLATES["imagenet"])
    hits = total = 0
    for queries, texts, _ in tasks.trial_batches(
        "classification", data.train, data.test, num_shots=shots, seed=seed, num_samples=num_samples,
        query_set_size=2048, batch_size=batch_size, demonstrations=None, progress=False, prompt_template=template,
    ):  # fmt: skip
        for query, text in zip(queries, texts):
            hits += f" {query['class_name']} . " in text
            total += 1
    return hits / total


def load_model():
    """For ``--model_script``: the demo's checkpoint ($DIGITS_CHECKPOINT), its tokenizer, its transform."""
    from few_shot_digits import load_checkpoint

    path = Path(os.environ.get("DIGITS_CHECKPOINT", "out_digits/few_shot_digits.safetensors"))
    tokenizer = make_tokenizer()
    model, _ = load_checkpoint(path, tokenizer)
    return model, transformers_tokenizer(tokenizer.words), digits_transform


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="novel")
    parser.add_argument("--out", type=Path, default=Path("out_digits/harness_novel"))
    args = parser.parse_args(argv)
    arguments = write_digits_classification(args.out, args.split)
    command = " ".join(command_line(arguments))
    print(f"python -m flamingo_pytorch.evaluate --model_script examples/digits_eval_data.py {command}")
    return arguments


if __name__ == "__main__":
    main()
