"""The shapes demo as a VQAv2-format task for ``python -m flamingo_pytorch.evaluate``.

    python examples/shapes_eval_data.py --out out/shapes_vqav2          # writes the data, prints the command
    SHAPES_CHECKPOINT=out/flamingo_shapes.safetensors python -m flamingo_pytorch.evaluate \\
        --model_script examples/shapes_eval_data.py $(cat out/shapes_vqav2/arguments.txt) --shots 0 1 2 3

The test split is the demo's own held-out set (``train_shapes.held_out_set``: 512 sequences of 4
images, 2,048 questions), one question per image as the demo asks it; the training split, which
the demonstrations are drawn from, is fresh images from another seed. Questions are the demo's
words (``what color ?``) and the prompt template is the demo's slot format,
``<image> what color ? red . `` per demonstration and ``<image> what color ?`` for the query, with
``.`` ending the answer: the model was trained on that format, not on OpenFlamingo's. As a model
script, ``load_model()`` loads the checkpoint named by ``$SHAPES_CHECKPOINT``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules sit next to this file

from harness_data import command_line, pil_to_tensor, transformers_tokenizer, write_json, write_vqav2_split
from shapes_dataset import (
    ANSWER_OFFSET,
    ATTRIBUTES,
    QUESTIONS,
    SLOT_LENGTH,
    make_batch,
    make_tokenizer,
    render,
    sample_scenes,
)

TEMPLATES = {"vqav2": {"demonstration": "<image> {question} {answer} . ", "query": "<image> {question}"}}
END_OF_ANSWER = "."
TRAIN_SEED = 2**31 - 2  # the demonstrations' images: neither the training seeds nor the held-out set's


def question_text(question: int) -> str:
    return f"what {QUESTIONS[question]} ?"


def held_out_examples(sequences: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The demo's held-out set, first ``sequences`` sequences: images (B, 3, 32, 32), questions, answers."""
    from train_shapes import EVAL_SEED, NUM_IMAGES

    tokenizer, generator = make_tokenizer(), torch.Generator().manual_seed(EVAL_SEED)
    batches = [make_batch(128, NUM_IMAGES, tokenizer, generator) for _ in range(-(-sequences // 128))]
    images = torch.cat([batch.images for batch in batches])[:sequences].flatten(0, 1)  # (B, 3, H, W)
    questions = torch.cat([batch.questions for batch in batches])[:sequences].flatten()  # (B,)
    text = torch.cat([batch.text for batch in batches])[:sequences]  # (sequences, t * SLOT_LENGTH)
    answers = text.view(-1, SLOT_LENGTH)[:, ANSWER_OFFSET]  # (B,): each slot's answer token
    words = tokenizer.words
    return images, [question_text(q) for q in questions.tolist()], [words[a] for a in answers.tolist()]


def fresh_examples(count: int, seed: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """``count`` new images, each with one uniformly drawn question and its answer."""
    generator = torch.Generator().manual_seed(seed)
    scenes = sample_scenes(count, generator)
    questions = torch.randint(len(QUESTIONS), (count,), generator=generator).tolist()
    images = render(scenes, generator)  # (count, 3, H, W)
    labels = scenes.labels().tolist()  # (count, 4)
    answers = [ATTRIBUTES[QUESTIONS[q]][label[q]] for q, label in zip(questions, labels)]
    return images, [question_text(q) for q in questions], answers


def write_shapes_vqav2(root: str | Path, train: int = 512, test_sequences: int = 512) -> dict:
    """Write the VQAv2-format files and the prompt templates under ``root``; -> the evaluate command's
    arguments (also written, one per line pair, to ``root/arguments.txt``)."""
    root = Path(root)
    arguments = write_vqav2_split(root, "train", *fresh_examples(train, TRAIN_SEED))
    arguments.update(write_vqav2_split(root, "test", *held_out_examples(test_sequences)))
    arguments["prompt_templates"] = write_json(root / "prompt_templates.json", TEMPLATES)
    arguments["end_of_chunk"] = END_OF_ANSWER
    (root / "arguments.txt").write_text(" ".join(command_line(arguments)) + "\n", encoding="utf-8")
    return arguments


def load_model():
    """For ``--model_script``: the demo's checkpoint ($SHAPES_CHECKPOINT), its tokenizer, its transform."""
    from train_shapes import load_checkpoint

    path = Path(os.environ.get("SHAPES_CHECKPOINT", "out/flamingo_shapes.safetensors"))
    model, _, _ = load_checkpoint(path, torch.device("cpu"))
    return model, transformers_tokenizer(make_tokenizer().words), pil_to_tensor


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/shapes_vqav2"))
    parser.add_argument("--train", type=int, default=512, help="training images (the demonstrations' pool)")
    parser.add_argument("--test-sequences", type=int, default=512, help="held-out sequences (4 questions each)")
    args = parser.parse_args(argv)
    arguments = write_shapes_vqav2(args.out, args.train, args.test_sequences)
    print(
        "python -m flamingo_pytorch.evaluate --model_script examples/shapes_eval_data.py "
        + " ".join(command_line(arguments))
    )
    return arguments


if __name__ == "__main__":
    main()
