"""Running the benchmark: tasks x shots x trials, and writing results, predictions and a table.

``run`` is what ``python -m flamingo_pytorch.evaluate`` calls: for each task whose files are given,
for each number of shots, one trial per seed; it writes under ``output_dir``:

    results.json                  {task: [{"shots", "trials", "mean", "stddev"}]} (OpenFlamingo's layout)
    results.md                    the same as a Markdown table (mean +- std over trials)
    predictions/<task>_<shots>shot_seed<seed>.json

Under ``torch.distributed`` (``torchrun``), each rank runs the model on its share of every trial's
batches, rank 0 gathers the outputs, scores and writes; results equal a single process's
(``distributed``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flamingo_pytorch.evaluation import datasets, distributed, tasks
from flamingo_pytorch.evaluation.demonstrations import ClassBalancedDemonstrations, RicesDemonstrations
from flamingo_pytorch.evaluation.prompts import PromptTemplate

CAPTIONING, VQA = ("coco", "flickr30"), ("vqav2", "ok_vqa", "textvqa", "vizwiz")
CLASSIFICATION = ("imagenet", "hateful_memes")
TASKS = (*CAPTIONING, *VQA, *CLASSIFICATION)
METRIC = {**dict.fromkeys(CAPTIONING, "CIDEr"), **dict.fromkeys(VQA, "VQA acc."), "imagenet": "top-1 acc."}
METRIC["hateful_memes"] = "ROC AUC"


@dataclass
class TaskData:
    """One task's examples: training (demonstrations), test (evaluated) and what scores them."""

    train: list[dict]
    test: list[dict]
    references: dict | None = None  # captioning: image id -> captions
    annotations: dict | None = None  # VQA: question id -> annotation record
    class_names: list[str] | None = None  # classification


def caption_data(karpathy_json: str, image_root: str, dataset: str, references_json: str | None) -> TaskData:
    train = datasets.read_karpathy_captions(karpathy_json, image_root, "train", dataset)
    test = datasets.read_karpathy_captions(karpathy_json, image_root, "test", dataset)
    references = datasets.read_coco_references(references_json) if references_json else None
    return TaskData(train, test, references=references)


def vqa_data(paths: dict, name: str) -> TaskData:
    """``paths``: {train,test}_{questions_json,annotations_json,image_dir}."""
    train = datasets.read_vqa(
        paths["train_questions_json"], paths["train_annotations_json"], paths["train_image_dir"], name
    )
    test_annotations = paths.get("test_annotations_json")
    test = datasets.read_vqa(paths["test_questions_json"], test_annotations, paths["test_image_dir"], name)
    annotations = None
    if test_annotations:
        annotations = {r["question_id"]: r for r in datasets.read_json(test_annotations)["annotations"]}
    return TaskData(train, test, annotations=annotations)


def hateful_memes_data(train_jsonl: str, test_jsonl: str, image_dir: str) -> TaskData:
    train = datasets.read_hateful_memes(train_jsonl, image_dir)
    test = datasets.read_hateful_memes(test_jsonl, image_dir)
    return TaskData(train, test, class_names=list(datasets.HATEFUL_MEMES_CLASSES))


def image_folder_data(root: str, class_names: list[str] | None = None) -> TaskData:
    train = datasets.read_image_folder(Path(root, "train"), class_names)
    test = datasets.read_image_folder(Path(root, "val"), class_names)
    names = class_names or sorted(p.name for p in Path(root, "train").iterdir() if p.is_dir())
    return TaskData(train, test, class_names=names)


def image_list_data(train_json: str, test_json: str) -> TaskData:
    """Classification from JSON lists; the classes are the training list's, in first-seen order."""
    train, names = datasets.read_image_list(train_json)
    test, test_names = datasets.read_image_list(test_json)
    unknown = sorted(set(test_names) - set(names))
    if unknown:
        raise ValueError(f"{test_json} has classes that {train_json} lacks: {unknown[:5]}")
    for item in test:
        item["class_id"] = names.index(item["class_name"])
    return TaskData(train, test, class_names=names)


def run_trial(model, task: str, data: TaskData, shots: int, seed: int, settings: dict, demonstrations):
    common = dict(num_shots=shots, seed=seed, demonstrations=demonstrations, **settings)
    if task in CAPTIONING:
        return tasks.evaluate_captioning(model, data.train, data.test, data.references, **common)
    if task in VQA:
        max_new_tokens = 10 if task == "textvqa" else 5  # as OpenFlamingo
        return tasks.evaluate_vqa(
            model, data.train, data.test, data.annotations, max_new_tokens=max_new_tokens, **common
        )
    hateful = task == "hateful_memes"
    return tasks.evaluate_classification(
        model, data.train, data.test, data.class_names, hateful_memes=hateful, **common
    )


def fresh_trial(model, *, task, data, shots, seed, settings, demonstrations, class_balanced):
    """``run_trial``, class-balanced draws from a fresh generator (so a trial can run twice alike)."""
    if class_balanced:
        demonstrations = ClassBalancedDemonstrations(data.train, seed)
    return run_trial(model, task, data, shots, seed, settings, demonstrations)


def model_calls(data: TaskData, shots: int, seed: int, settings: dict) -> int:
    """How many model calls a trial makes: one per batch, times the passes of prompt ensembling."""
    count = distributed.number_of_batches(len(data.test), settings["num_samples"], seed, settings["batch_size"])
    return count * tasks.permutations(shots, settings.get("prompt_ensembling", False))


def run(
    model,
    data: dict[str, TaskData],
    output_dir: str | Path,
    *,
    shots: Sequence[int] = (0, 4, 8, 16, 32),
    seeds: Sequence[int] = (42,),
    num_samples: int = -1,
    query_set_size: int = 2048,
    batch_size: int = 8,
    num_beams: int = 3,
    rices: bool = False,
    rices_cache_dir: str | None = None,
    progress: bool = True,
    prompt_templates: dict[str, PromptTemplate] | None = None,
    class_balanced: bool = False,
    prompt_ensembling: bool = False,
) -> dict:
    """Evaluate ``model`` (an ``EvalModel``) on each task of ``data`` -> results (also written to disk).

    ``prompt_templates``: task name -> a prompt format of one's own (default: OpenFlamingo's).
    ``class_balanced``: classification demonstrations K per class (``shots`` = K x classes), drawn
    per trial seed, instead of at random. ``prompt_ensembling``: classification scores averaged over
    ``min(6, shots!)`` shuffles of each query's demonstrations (``tasks.evaluate_classification``).
    Under an initialised ``torch.distributed`` process group, call it on every rank: the ranks share
    each trial's batches and rank 0 alone scores, writes and returns the results (the other ranks
    return ``{}``)."""
    if class_balanced and rices:
        raise ValueError("choose class_balanced or rices demonstrations, not both")
    prompt_templates = prompt_templates or {}
    unknown = sorted(set(prompt_templates) - set(TASKS))
    if unknown:
        raise ValueError(f"prompt_templates has unknown tasks {unknown}: choose among {', '.join(TASKS)}")
    output_dir = Path(output_dir)
    rank, world = process_rank_and_world()
    if rank == 0:
        (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
    results = {}
    settings = dict(num_samples=num_samples, query_set_size=query_set_size, batch_size=batch_size)
    for task, task_data in data.items():
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose among {', '.join(TASKS)}")
        demonstrations = None
        if class_balanced and task not in CLASSIFICATION:
            raise ValueError(f"class_balanced demonstrations are for classification tasks, not {task!r}")
        if rices:
            cache = str(Path(rices_cache_dir, f"{task}.pt")) if rices_cache_dir else None
            build = functools.partial(RicesDemonstrations, task_data.train, model.vision_features, batch_size, cache)
            demonstrations = distributed.rank_zero_first(build, rank, world, wait=cache is not None)
        extra = {"progress": task if progress and rank == 0 else False, "prompt_template": prompt_templates.get(task)}
        extra.update({"prompt_ensembling": prompt_ensembling} if task in CLASSIFICATION else {"num_beams": num_beams})
        results[task] = []
        for shot in shots:
            scores = []
            for seed in seeds:
                trial = functools.partial(
                    fresh_trial, task=task, data=task_data, shots=shot, seed=seed, settings={**settings, **extra},
                    demonstrations=demonstrations, class_balanced=class_balanced,
                )  # fmt: skip
                if world == 1:
                    outcome = trial(model)
                else:
                    count = model_calls(task_data, shot, seed, {**settings, **extra})
                    outcome = distributed.run_sharded(trial, model, rank, world, count)
                if outcome is None:  # not rank 0: it scores and writes
                    continue
                score, predictions = outcome
                scores.append(score)
                path = output_dir / "predictions" / f"{task}_{shot}shot_seed{seed}.json"
                path.write_text(json.dumps(predictions, indent=1), encoding="utf-8")
            results[task].append({"shots": shot, "trials": scores, **tasks.summary(scores)})
    if rank != 0:
        return {}
    (output_dir / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (output_dir / "results.md").write_text(markdown_table(results), encoding="utf-8")
    return results


def process_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def markdown_table(results: dict) -> str:
    """Tasks as rows, shots as columns: mean (+- std when there are several trials)."""
    shots = sorted({row["shots"] for rows in results.values() for row in rows})
    lines = ["| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |", "|---|---|" + "---|" * len(shots)]
    for task, rows in results.items():
        by_shot = {row["shots"]: row for row in rows}
        cells = []
        for s in shots:
            row = by_shot.get(s)
            if row is None:
                cells.append("")
            elif len(row["trials"]) > 1:
                cells.append(f"{row['mean']:.2f} ± {row['stddev']:.2f}")
            else:
                cells.append(f"{row['mean']:.2f}")
        lines.append(f"| {task} | {METRIC[task]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
