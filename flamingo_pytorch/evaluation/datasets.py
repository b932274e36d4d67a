"""Reading the evaluation sets in the formats their authors publish them in.

Every reader returns a list of plain dicts, one per example, with the keys the harness uses:

    captioning      image, caption (the first reference), image_id, references (all of them)
    VQA             image, question, question_id, answers (list of str, with annotations)
    classification  image, id, class_id, class_name (and ocr: the meme's text, for HatefulMemes)

``image`` is a path; ``load_image`` opens it. The orders are the files' orders (OpenFlamingo's
evaluation draws its subsets and demonstrations by index, so the order is part of parity).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VQA_SETS = ("vqav2", "ok_vqa", "textvqa", "vizwiz")
HATEFUL_MEMES_CLASSES = ("no", "yes")  # class id 0, 1, as OpenFlamingo names them


def load_image(path: str | Path):
    """Open an image file fully (PIL), so that the file handle is closed."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def read_karpathy_captions(path: str | Path, image_root: str | Path, split: str, dataset: str = "coco") -> list[dict]:
    """Karpathy-split captions (``dataset_coco.json``, ``dataset_flickr30k.json``): the ``split`` images.

    Args:
        path: the Karpathy JSON ({"images": [{"filename", "filepath"?, "split", "sentences", "cocoid"?}]}).
        image_root: COCO: the folder holding ``train2014/`` and ``val2014/`` (each image is read from
            ``image_root/filepath/filename``); Flickr30k: the folder of its images.
        split: "train" (demonstrations) or "test" (evaluated); "val" and "restval" are read as written.
        dataset: "coco" (image ids are ``cocoid``) or "flickr" (ids are the file names without suffix).
    """
    if dataset not in ("coco", "flickr"):
        raise ValueError(f"dataset must be 'coco' or 'flickr', got {dataset!r}")
    items = []
    for entry in read_json(path)["images"]:
        if entry["split"] != split:
            continue
        folder = Path(image_root, entry.get("filepath", "")) if dataset == "coco" else Path(image_root)
        references = [sentence["raw"] for sentence in entry["sentences"]]
        image_id = entry["cocoid"] if dataset == "coco" else entry["filename"].split(".")[0]
        items.append(
            dict(image=str(folder / entry["filename"]), caption=references[0], image_id=image_id, references=references)
        )
    return items


def read_coco_references(path: str | Path) -> dict:
    """A COCO-style captions file ({"images", "annotations": [{"image_id", "caption"}]}) -> {image_id: [captions]},
    in the file's image order (what OpenFlamingo scores CIDEr against: ``captions_val2014.json``,
    or Flickr30k's COCO-style file)."""
    data = read_json(path)
    references = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        references[annotation["image_id"]].append(annotation["caption"])
    return references


def vqa_image_path(image_dir: str | Path, image_id, dataset: str) -> str:
    """Where each VQA set keeps a question's image (VQAv2 and OK-VQA: COCO's file names)."""
    if dataset in ("vqav2", "ok_vqa"):
        split = Path(image_dir).name  # train2014, val2014 or test2015, as in COCO's file names
        return os.path.join(image_dir, f"COCO_{split}_{int(image_id):012d}.jpg")
    if dataset == "vizwiz":
        return os.path.join(image_dir, image_id)
    if dataset == "textvqa":
        return os.path.join(image_dir, f"{image_id}.jpg")
    raise ValueError(f"dataset must be one of {VQA_SETS}, got {dataset!r}")


def read_vqa(
    questions_path: str | Path, annotations_path: str | Path | None, image_dir: str | Path, dataset: str
) -> list[dict]:
    """Official VQA-format questions ({"questions": [{"image_id", "question", "question_id"}]}) and,
    if given, annotations ({"annotations": [{"question_id", "answers": [{"answer", ...}], ...}]}).

    Questions keep their file order; answers are matched to them by ``question_id``.
    """
    questions = read_json(questions_path)["questions"]
    by_id = {}
    if annotations_path is not None:
        by_id = {record["question_id"]: record for record in read_json(annotations_path)["annotations"]}
    items = []
    for question in questions:
        item = dict(
            image=vqa_image_path(image_dir, question["image_id"], dataset),
            question=question["question"],
            question_id=question["question_id"],
        )
        if annotations_path is not None:
            record = by_id[question["question_id"]]
            item["answers"] = [answer["answer"] for answer in record["answers"]]
        items.append(item)
    return items


def read_hateful_memes(annotations_path: str | Path, image_dir: str | Path) -> list[dict]:
    """HatefulMemes jsonl ({"id", "img": "img/01235.png", "label": 0/1, "text"} per line)."""
    items = []
    with open(annotations_path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            record = json.loads(line)
            label = int(record["label"])
            items.append(
                dict(
                    id=record["id"],
                    image=os.path.join(image_dir, record["img"].split("/")[-1]),
                    ocr=record["text"],
                    class_id=label,
                    class_name=HATEFUL_MEMES_CLASSES[label],
                )
            )
    return items


def read_image_folder(root: str | Path, class_names: list[str] | None = None) -> list[dict]:
    """Class folders (``root/<class folder>/<image>``, as torchvision's ImageFolder reads them: folders
    and files in sorted order). Class k is the k-th folder; its name is ``class_names[k]`` if given
    (ImageNet's folders are WordNet ids: pass the 1,000 readable names), else the folder's name."""
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if class_names is not None and len(class_names) != len(folders):
        raise ValueError(f"class_names has {len(class_names)} names but {root} has {len(folders)} class folders")
    names = list(class_names) if class_names is not None else folders
    items = []
    for class_id, folder in enumerate(folders):
        for directory, _, files in sorted(os.walk(Path(root, folder), followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    path = os.path.join(directory, name)
                    items.append(dict(image=path, class_id=class_id, class_name=names[class_id]))
    for index, item in enumerate(items):
        item["id"] = index
    return items


def read_image_list(path: str | Path, image_root: str | Path = "") -> tuple[list[dict], list[str]]:
    """A JSON list [{"image": path, "class_name": name}, ...] -> (items, class names in first-seen order).
    Relative image paths are read from ``image_root`` (default: the list's folder)."""
    image_root = image_root or Path(path).parent
    names: list[str] = []
    items = []
    for index, record in enumerate(read_json(path)):
        if record["class_name"] not in names:
            names.append(record["class_name"])
        items.append(
            dict(
                id=index,
                image=os.path.join(image_root, record["image"]),
                class_id=names.index(record["class_name"]),
                class_name=record["class_name"],
            )
        )
    return items, names
