"""What the demos need to be evaluated by ``python -m flamingo_pytorch.evaluate``: their word-list
vocabulary as a transformers tokenizer, a PIL -> tensor transform, and writers of the official
file formats (VQAv2 questions/annotations with COCO-named images; JSON image lists).

Used by ``shapes_eval_data.py`` and ``digits_eval_data.py``; see docs/evaluation.md, "Does it
measure something?".

Shapes: c channels, H x W pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def transformers_tokenizer(words: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` with the same ids as ``WordTokenizer(words)``: words split on
    whitespace, ``<pad>`` for padding, ``<image>`` a special token; an unknown word raises."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("the harness's tokenizer needs transformers: pip install transformers") from error
    tokenizer = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", additional_special_tokens=["<image>"])


def pil_to_tensor(image, scale: float = 255.0) -> Tensor:
    """A PIL image -> (c, H, W) float tensor, pixel values divided by ``scale``."""
    array = np.asarray(image, dtype=np.float32)  # (H, W) or (H, W, c)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (c, H, W)
    return tensor / scale


def save_rgb(image: Tensor, path: Path) -> None:
    """(3, H, W) floats in [0, 1] -> a JPEG at quality 100 without chroma subsampling (COCO's files are
    JPEGs; at 4:4:4 and quality 100 the 32 x 32 shapes come back within a few levels of 255)."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)


def write_json(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def write_vqav2_split(root: Path, split: str, images: Tensor, questions: list[str], answers: list[str]) -> dict:
    """One VQAv2-format split: image i (images (B, 3, H, W)) asked ``questions[i]``, answered
    ``answers[i]`` by all ten annotators. ``split`` "train" -> ``train2014/`` images; "test" ->
    ``val2014/``. -> the ``--vqav2_{split}_*`` arguments of ``python -m flamingo_pytorch.evaluate``."""
    if not len(images) == len(questions) == len(answers):
        raise ValueError(
            f"images, questions, answers must be as many, got {len(images)}, {len(questions)}, {len(answers)}"
        )
    folder = "train2014" if split == "train" else "val2014"
    image_dir = root / folder
    records, annotations = [], []
    for index, (image, question, answer) in enumerate(zip(images, questions, answers)):
        save_rgb(image, image_dir / f"COCO_{folder}_{index:012d}.jpg")
        records.append({"image_id": index, "question": question, "question_id": index})
        annotations.append(
            {
                "question_id": index,
                "image_id": index,
                "question_type": question,
                "answer_type": "other",
                "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            }
        )
    header = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": folder}
    return {
        f"vqav2_{split}_questions_json": write_json(root / f"{split}_questions.json", {**header, "questions": records}),
        f"vqav2_{split}_annotations_json": write_json(root / f"{split}_annotations.json", {"annotations": annotations}),
        f"vqav2_{split}_image_dir": str(image_dir),
    }


def command_line(arguments: dict) -> list[str]:
    """{"vqav2_test_image_dir": "x"} -> ["--vqav2_test_image_dir", "x"]."""
    return [item for key, value in arguments.items() for item in (f"--{key}", str(value))]
