"""The evaluation loops: few-shot captioning, VQA and classification, as OpenFlamingo runs them.

Each ``evaluate_*`` runs one trial (one number of shots, one seed) over a test set and returns
``(score, predictions)``. The loop is the same for every task: pick and order the evaluated
examples (``demonstrations.evaluation_order``), then batch by batch draw each query's
demonstrations (at random, or by RICES), build the prompts (``prompts.batch_prompts``), ask the
model, and post-process its answers as OpenFlamingo does.

Prompt ensembling (classification, OpenFlamingo's ``--classification_prompt_ensembling``): each
batch is scored ``min(6, shots!)`` times, each pass after shuffling every query's demonstrations
again (in place, so the shuffles accumulate), and the class scores are averaged over the passes.
The shuffles continue the Python generator that drew the demonstrations at random (query after
query, pass after pass, as OpenFlamingo's global ``random`` runs), or a ``random.Random(seed)``
of their own when the demonstrations come without one (RICES).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence

import torch

from flamingo_pytorch.evaluation import metrics
from flamingo_pytorch.evaluation.demonstrations import RandomDemonstrations, batches, evaluation_order
from flamingo_pytorch.evaluation.prompts import PromptTemplate, batch_prompts, effective_shots

Demonstrations = Callable[[Sequence[dict], int], list[list[dict]]]  # (queries, shots) -> demos per query


def clean_caption(text: str) -> str:
    """A generated caption up to the next ``Output``, without double quotes (OpenFlamingo's cleaning)."""
    return text.split("Output", 1)[0].replace('"', "")


def clean_answer(text: str) -> str:
    """A generated answer up to the next Question/Answer/Short, and up to its first ", "."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


def trial_batches(
    task: str,
    train: Sequence[dict],
    test: Sequence[dict],
    *,
    num_shots: int,
    seed: int,
    num_samples: int,
    query_set_size: int,
    batch_size: int,
    demonstrations: Demonstrations | None,
    progress: bool | str,
    prompt_template: PromptTemplate | None = None,
) -> Iterator[tuple[list[dict], list[str], list[list]]]:
    """(queries, prompts, images) batch by batch, the demonstrations drawn as OpenFlamingo draws them.
    ``progress``: a tqdm bar (named by the string, if one is given). ``prompt_template``: the prompt
    format instead of OpenFlamingo's (``prompts.PromptTemplate``)."""
    for queries, passes in trial_passes(
        task, train, test, num_shots=num_shots, seed=seed, num_samples=num_samples, query_set_size=query_set_size,
        batch_size=batch_size, demonstrations=demonstrations, progress=progress, prompt_template=prompt_template,
    ):  # fmt: skip
        yield queries, *passes[0]


def permutations(num_shots: int, prompt_ensembling: bool) -> int:
    """How many times each batch is scored: ``min(6, shots!)`` with prompt ensembling, else once."""
    return min(6, math.factorial(effective_shots(num_shots))) if prompt_ensembling else 1


def trial_passes(
    task: str,
    train: Sequence[dict],
    test: Sequence[dict],
    *,
    num_shots: int,
    seed: int,
    num_samples: int,
    query_set_size: int,
    batch_size: int,
    demonstrations: Demonstrations | None,
    progress: bool | str,
    prompt_template: PromptTemplate | None = None,
    prompt_ensembling: bool = False,
) -> Iterator[tuple[list[dict], list[tuple[list[str], list[list]]]]]:
    """(queries, [(prompts, images) per pass]) batch by batch: ``trial_batches`` with, under
    ``prompt_ensembling``, one pass per ``permutations`` with every query's demonstrations shuffled
    again before each (see the module's docstring for the generator)."""
    order, numpy_rng = evaluation_order(len(test), num_samples, seed)
    if demonstrations is None:
        demonstrations = RandomDemonstrations(train, query_set_size, numpy_rng, seed)
    rng = getattr(demonstrations, "rng", None)
    shuffles = rng if isinstance(rng, random.Random) else random.Random(seed)
    shots, count = effective_shots(num_shots), permutations(num_shots, prompt_ensembling)
    steps = list(batches(order, batch_size))
    if progress:
        from tqdm import tqdm  # the `eval` extra

        name = progress if isinstance(progress, str) else task
        steps = tqdm(steps, desc=f"{name} {num_shots}-shot seed {seed}")
    for step in steps:
        queries = [test[i] for i in step]
        drawn, passes = [list(demos) for demos in demonstrations(queries, shots)], []  # ours to shuffle
        for _ in range(count):
            if prompt_ensembling:
                for demos in drawn:
                    shuffles.shuffle(demos)  # in place: each pass shuffles the previous pass's order
            passes.append(batch_prompts(task, drawn, queries, num_shots, prompt_template))
        yield queries, passes


def evaluate_captioning(
    model,
    train: Sequence[dict],
    test: Sequence[dict],
    references: dict | None = None,
    *,
    num_shots: int,
    seed: int = 42,
    num_samples: int = -1,
    query_set_size: int = 2048,
    batch_size: int = 8,
    demonstrations: Demonstrations | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 3,
    length_penalty: float = 0.0,
    progress: bool | str = False,
    prompt_template: PromptTemplate | None = None,
) -> tuple[float, list[dict]]:
    """CIDEr x 100 of generated captions, and the predictions [{"image_id", "caption"}].

    ``references``: image id -> captions (default: each test example's ``references``).
    """
    predictions = {}
    for queries, texts, images in trial_batches(
        "captioning", train, test, num_shots=num_shots, seed=seed, num_samples=num_samples,
        query_set_size=query_set_size, batch_size=batch_size, demonstrations=demonstrations, progress=progress,
        prompt_template=prompt_template,
    ):  # fmt: skip
        outputs = model.generate(
            texts, images, max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty
        )
        for query, output in zip(queries, outputs):
            predictions[query["image_id"]] = clean_caption(output)
    if references is None:
        references = {item["image_id"]: item["references"] for item in test}
    score = metrics.cider(predictions, references) * 100.0
    return score, [{"image_id": key, "caption": caption} for key, caption in predictions.items()]


def evaluate_vqa(
    model,
    train: Sequence[dict],
    test: Sequence[dict],
    annotations: dict | None,
    *,
    num_shots: int,
    seed: int = 42,
    num_samples: int = -1,
    query_set_size: int = 2048,
    batch_size: int = 8,
    demonstrations: Demonstrations | None = None,
    max_new_tokens: int = 5,
    num_beams: int = 3,
    length_penalty: float = 0.0,
    progress: bool | str = False,
    prompt_template: PromptTemplate | None = None,
) -> tuple[float | None, list[dict]]:
    """VQA accuracy (percent) of generated short answers, and the predictions [{"answer", "question_id"}].

    ``annotations``: question id -> official annotation record; None (a test-dev split): no score.
    """
    predictions = []
    for queries, texts, images in trial_batches(
        "vqa", train, test, num_shots=num_shots, seed=seed, num_samples=num_samples,
        query_set_size=query_set_size, batch_size=batch_size, demonstrations=demonstrations, progress=progress,
        prompt_template=prompt_template,
    ):  # fmt: skip
        outputs = model.generate(
            texts, images, max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty
        )
        for query, output in zip(queries, outputs):
            predictions.append({"answer": clean_answer(output), "question_id": query["question_id"]})
    score = metrics.vqa_accuracy(predictions, annotations) if annotations is not None else None
    return score, predictions


def evaluate_classification(
    model,
    train: Sequence[dict],
    test: Sequence[dict],
    class_names: Sequence[str],
    *,
    num_shots: int,
    seed: int = 42,
    num_samples: int = -1,
    query_set_size: int = 2048,
    batch_size: int = 8,
    demonstrations: Demonstrations | None = None,
    hateful_memes: bool = False,
    progress: bool | str = False,
    prompt_template: PromptTemplate | None = None,
    prompt_ensembling: bool = False,
) -> tuple[float, list[dict]]:
    """Rank classification over ``class_names``: top-1 accuracy, or for HatefulMemes the ROC AUC of
    the probability of "yes" (softmax over the classes' scores), and the predictions.

    ``prompt_ensembling``: score each batch ``min(6, shots!)`` times with the demonstrations
    shuffled before each pass and average the class scores (OpenFlamingo's option)."""
    task = "hateful_memes" if hateful_memes else "classification"
    predictions = []
    for queries, passes in trial_passes(
        task, train, test, num_shots=num_shots, seed=seed, num_samples=num_samples,
        query_set_size=query_set_size, batch_size=batch_size, demonstrations=demonstrations, progress=progress,
        prompt_template=prompt_template, prompt_ensembling=prompt_ensembling,
    ):  # fmt: skip
        runs = [model.class_log_likelihoods(texts, images, class_names) for texts, images in passes]  # (b, C) each
        scores = torch.mean(torch.stack(runs, dim=-1), dim=-1)  # (b, C, passes) -> (b, C), as OpenFlamingo
        best_score, best = torch.topk(scores, k=1, dim=1)  # (b, 1) each
        probability = torch.exp(best_score[:, 0] - torch.logsumexp(scores, dim=1))  # (b,)
        for query, index, p in zip(queries, best[:, 0].tolist(), probability.tolist()):
            predictions.append(
                {"id": query["id"], "gt_label": query["class_name"], "pred_label": class_names[index], "pred_score": p}
            )
    if hateful_memes:
        positive = max(class_names)  # "yes", as OpenFlamingo picks it
        labels = [int(p["gt_label"] == positive) for p in predictions]
        scores = [p["pred_score"] if p["pred_label"] == positive else 1 - p["pred_score"] for p in predictions]
        return metrics.roc_auc(labels, scores), predictions
    labels, guesses = [p["gt_label"] for p in predictions], [p["pred_label"] for p in predictions]
    return metrics.top1_accuracy(labels, guesses), predictions


def summary(scores: Sequence[float]) -> dict:
    """Mean and standard deviation over trials, ignoring NaN (as OpenFlamingo reports them)."""
    finite = [score for score in scores if score is not None and not math.isnan(score)]
    if not finite:
        return {"mean": float("nan"), "stddev": float("nan")}
    mean = sum(finite) / len(finite)
    return {"mean": mean, "stddev": math.sqrt(sum((s - mean) ** 2 for s in finite) / len(finite))}
