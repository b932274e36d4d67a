"""Small evaluation sets in every supported format, with drawn images: for tests and trial runs.

``python -m flamingo_pytorch.evaluation.fixtures DIR`` writes, under DIR, a few dozen examples per
task, nothing downloaded: each image is a coloured shape on a coloured background (32 x 32), and
its captions, questions and labels say what is drawn. ``write_fixtures`` returns the paths as a
dict (the ``python -m flamingo_pytorch.evaluate`` arguments they fill). ``fixture_tokenizer``
trains a tiny byte-level BPE tokenizer on the fixtures' words, with ``<image>``,
``<|endofchunk|>`` and a padding token, for tiny models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 220, 40)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "stripe")
SIZE = 32


def draw(color: str, shape: str, background: str, rng: np.random.RandomState):
    """A SIZE x SIZE RGB PIL image: ``shape`` in ``color`` on ``background``, placed at random."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    x, y = rng.randint(2, 12, size=2)
    box = (int(x), int(y), int(x) + 16, int(y) + 16)
    if shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    else:
        pen.rectangle((0, int(y), SIZE, int(y) + 6), fill=COLORS[color])
    return image


def scenes(count: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.RandomState(seed)
    return [
        (list(COLORS)[rng.randint(len(COLORS))], SHAPES[rng.randint(len(SHAPES))], list(BACKGROUNDS)[rng.randint(3)])
        for _ in range(count)
    ]


def captions(color: str, shape: str, background: str) -> list[str]:
    return [
        f"A {color} {shape} on a {background} background.",
        f"a {shape} that is {color}",
        f"The {color} {shape}.",
        f"{color} {shape} , {background} background",
        f"A picture of a {color} {shape}",
    ]


def save(image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def write_json(path: Path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return str(path)


def write_captions(root: str | Path, name: str, train: int, test: int) -> dict:
    """Karpathy JSON plus the COCO-style reference file of its test images."""
    root = Path(root)
    rng, images, coco = np.random.RandomState(1), [], {"images": [], "annotations": []}
    for index, (color, shape, background) in enumerate(scenes(train + test, seed=len(name))):
        split = "train" if index < train else "test"
        image_id = 100 + index
        folder = ("train2014" if split == "train" else "val2014") if name == "coco" else ""
        filename = f"COCO_{folder}_{image_id:012d}.jpg" if name == "coco" else f"{image_id}.jpg"
        save(draw(color, shape, background, rng), root / name / "images" / folder / filename)
        texts = captions(color, shape, background)
        entry = {"filename": filename, "split": split, "sentences": [{"raw": text} for text in texts]}
        entry.update({"filepath": folder, "cocoid": image_id} if name == "coco" else {})
        images.append(entry)
        if split == "test":
            key = image_id if name == "coco" else str(image_id)
            coco["images"].append({"id": key})
            coco["annotations"] += [
                {"image_id": key, "id": 10 * image_id + k, "caption": text} for k, text in enumerate(texts)
            ]
    return {
        f"{name}_karpathy_json": write_json(root / name / "karpathy.json", {"images": images}),
        f"{name}_annotations_json": write_json(root / name / "references_coco_style.json", coco),
        f"{name}_image_root": str(root / name / "images"),
    }


QUESTIONS = (
    ("What color is the shape?", "color"),
    ("What shape is it?", "shape"),
    ("Is the background white?", "yes/no"),
)


def vqa_answers(kind: str, color: str, shape: str, background: str, rng: np.random.RandomState) -> list[str]:
    truth = {"color": color, "shape": shape, "yes/no": "yes" if background == "white" else "no"}[kind]
    wrong = {"color": list(COLORS), "shape": list(SHAPES), "yes/no": ["yes", "no"]}[kind]
    return [truth if rng.rand() < 0.7 else wrong[rng.randint(len(wrong))] for _ in range(10)]


def write_vqa_split(root: str | Path, name: str, split: str, count: int, seed: int) -> dict:
    root = Path(root)
    rng, questions, annotations = np.random.RandomState(seed), [], []
    folder = {"train": "train2014", "test": "val2014"}[split]
    for index, (color, shape, background) in enumerate(scenes(count, seed)):
        number = 1000 * seed + index
        image_id = {"vizwiz": f"VizWiz_{split}_{number:08d}.jpg", "textvqa": f"t{number}"}.get(name, number)
        image = draw(color, shape, background, rng)
        if name in ("vqav2", "ok_vqa"):
            save(image, root / name / folder / f"COCO_{folder}_{number:012d}.jpg")
        else:
            save(image, root / name / "images" / (image_id if name == "vizwiz" else f"{image_id}.jpg"))
        text, kind = QUESTIONS[index % len(QUESTIONS)]
        qid = 10 * number + index % len(QUESTIONS)
        questions.append({"image_id": image_id, "question": text, "question_id": qid})
        answers = vqa_answers(kind, color, shape, background, rng)
        records = [{"answer": a, "answer_confidence": "yes"} for a in answers]
        if name != "vizwiz":  # VizWiz's answers carry no answer_id
            records = [{**record, "answer_id": k + 1} for k, record in enumerate(records)]
        annotations.append(
            {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": kind, "answers": records}
        )
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": folder, "license": {}}
    image_dir = root / name / (folder if name in ("vqav2", "ok_vqa") else "images")
    return {
        f"{name}_{split}_image_dir": str(image_dir),
        f"{name}_{split}_questions_json": write_json(
            root / name / f"{split}_questions.json", {**header, "questions": questions}
        ),
        f"{name}_{split}_annotations_json": write_json(
            root / name / f"{split}_annotations.json", {**header, "annotations": annotations}
        ),
    }


def write_hateful_memes(root: str | Path, train: int, test: int) -> dict:
    root = Path(root)
    rng, paths = np.random.RandomState(7), {}
    for split, count in (("train", train), ("test", test)):
        lines = []
        for index, (color, shape, background) in enumerate(scenes(count, seed=7 + count)):
            number = 10000 + 100 * len(split) + index
            label = index % 2  # both labels in any few examples; "hateful" memes are red or blue
            color = ("green", "yellow", "red", "blue")[2 * label + rng.randint(2)]
            save(draw(color, shape, background, rng), root / "hateful_memes" / "img" / f"{number}.png")
            lines.append(
                {"id": number, "img": f"img/{number}.png", "label": label, "text": f"all {shape}s are {color}"}
            )
        path = root / "hateful_memes" / f"{split}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        paths[f"hateful_memes_{split}_jsonl"] = str(path)
    paths["hateful_memes_image_dir"] = str(root / "hateful_memes" / "img")
    return paths


def write_image_folders(root: str | Path, per_class_train: int, per_class_test: int) -> dict:
    root = Path(root)
    rng = np.random.RandomState(3)
    for split, count in (("train", per_class_train), ("val", per_class_test)):
        for color in COLORS:
            for k in range(count):
                shape, background = SHAPES[rng.randint(3)], list(BACKGROUNDS)[rng.randint(3)]
                save(draw(color, shape, background, rng), root / "classes" / split / color / f"{k:03d}.png")
    return {"imagenet_root": str(root / "classes")}


def write_fixtures(root: str | Path, train: int = 24, test: int = 12) -> dict:
    """Write every fixture set under ``root`` -> {argument name: path}."""
    root = Path(root)
    paths = {**write_captions(root, "coco", train, test), **write_captions(root, "flickr", train, test)}
    for name in ("vqav2", "ok_vqa", "textvqa", "vizwiz"):
        paths.update(write_vqa_split(root, name, "train", train, seed=2))
        paths.update(write_vqa_split(root, name, "test", test, seed=3))
    paths.update(write_hateful_memes(root, train, test))
    paths.update(write_image_folders(root, max(train // len(COLORS), 2), max(test // len(COLORS), 1)))
    return paths


def fixture_tokenizer(vocab_size: int = 400):
    """A tiny byte-level BPE tokenizer (transformers' fast tokenizer) trained on the fixtures' words;
    ids 0-3: ``<pad>``, ``<|endoftext|>``, ``<image>``, ``<|endofchunk|>``. Left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|endoftext|>", "<image>", "<|endofchunk|>"]
    words = [*COLORS, *BACKGROUNDS, *SHAPES, "Output", "Question", "Short", "answer", "Answer", "yes", "no"]
    texts = [" ".join(words), *(t for scene in scenes(40, 0) for t in captions(*scene)), *(q for q, _ in QUESTIONS)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|endoftext|>", padding_side="left"
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<image>", "<|endofchunk|>"]})
    return wrapped


def tiny_model():
    """(a random tiny FlamingoPaLM with open gates, ``fixture_tokenizer()``, a PIL -> tensor transform):
    untrained, so its scores are noise; it tries the pipeline end to end."""
    import torch
    from einops.layers.torch import Rearrange
    from torch import nn

    from flamingo_pytorch.flamingo_palm import FlamingoPaLM

    tokenizer = fixture_tokenizer()
    torch.manual_seed(0)
    patches = nn.Conv2d(3, 64, kernel_size=8, stride=8)  # (B, 64, 4, 4)
    encoder = nn.Sequential(patches, Rearrange("b e h w -> b (h w) e"))  # (B, 16 patches, 64)
    model = FlamingoPaLM(
        num_tokens=len(tokenizer), dim=64, depth=2, dim_head=16, heads=4, cross_attn_every=1,
        media_token_id=tokenizer.convert_tokens_to_ids("<image>"), img_encoder=encoder,
        perceiver_num_latents=8, perceiver_depth=1, perceiver_num_time_embeds=40,
    )  # fmt: skip
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(0.5)
    return model.eval(), tokenizer, pil_to_tensor


def pil_to_tensor(image):
    """PIL -> (3, SIZE, SIZE) float in [0, 1]."""
    import torch

    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (c, H, W)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m flamingo_pytorch.evaluation.fixtures OUTPUT_DIR")
    print(json.dumps(write_fixtures(sys.argv[1]), indent=1))
