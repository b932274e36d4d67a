"""OpenFlamingo's prompt formats, and the few-shot context built from demonstrations.

A demonstration is ``<image>`` then the task's text with its answer and ``<|endofchunk|>``; the query
is the same text with the answer left for the model. Captioning and VQA put a newline after each
demonstration, classification nothing. At 0 shots the context holds two demonstrations with their
``<image>`` removed (text only), as Flamingo and OpenFlamingo evaluate: the model sees the task's
format but no image except the query's. So each prompt holds exactly one ``<image>`` per image passed.
A ``PromptTemplate`` replaces a task's format with one's own (default: OpenFlamingo's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE, END_OF_CHUNK = "<image>", "<|endofchunk|>"
ZERO_SHOT_DEMONSTRATIONS = 2


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt format of one's own, for a model trained on another format than OpenFlamingo's.

    Both are ``str.format`` templates over an example's fields: ``{question}``, ``{answer}`` (the
    first human answer), ``{caption}``, ``{class_name}`` and ``{ocr}``, as the task has them. Each
    must hold ``<image>`` once (where the example's image goes).

    Args:
        demonstration: one demonstration, answer included, e.g. ``"<image> {question} {answer} . "``.
        query: the query, its answer left for the model, e.g. ``"<image> {question}"``.
    """

    demonstration: str
    query: str

    def __post_init__(self):
        for name in ("demonstration", "query"):
            text = getattr(self, name)
            if text.count(IMAGE) != 1:
                raise ValueError(f"PromptTemplate.{name} must hold {IMAGE} once, got {text.count(IMAGE)} in {text!r}")


def template_fields(item: dict) -> dict:
    """An example's fields for ``PromptTemplate``: its own keys, plus ``answer`` and a stripped ``caption``."""
    fields = dict(item)
    if "answers" in item:
        fields["answer"] = item["answers"][0]
    if "caption" in item:
        fields["caption"] = item["caption"].strip()
    return fields


def effective_shots(num_shots: int) -> int:
    """Demonstrations drawn for ``num_shots``: 2 text-only ones at 0 shots."""
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    return num_shots if num_shots > 0 else ZERO_SHOT_DEMONSTRATIONS


def with_answer(text: str, answer: str | None) -> str:
    return text if answer is None else f"{text}{answer}{END_OF_CHUNK}"


def caption_prompt(caption: str | None = None) -> str:
    return with_answer(f"{IMAGE}Output:", caption)


def vqa_prompt(question: str, answer: str | None = None) -> str:
    return with_answer(f"{IMAGE}Question:{question} Short answer:", answer)


def classification_prompt(class_name: str | None = None) -> str:
    return with_answer(f"{IMAGE}Output:", class_name)


def hateful_memes_prompt(text: str, class_name: str | None = None) -> str:
    return with_answer(f"{IMAGE}is an image with: '{text}' written on it. Is it hateful? Answer:", class_name)


def demonstration_text(task: str, item: dict) -> str:
    """One demonstration, answer included (its ``<image>`` first)."""
    if task == "captioning":
        return caption_prompt(item["caption"].strip()) + "\n"
    if task == "vqa":
        return vqa_prompt(item["question"], item["answers"][0]) + "\n"
    if task == "hateful_memes":
        return hateful_memes_prompt(item["ocr"], item["class_name"])
    if task == "classification":
        return classification_prompt(item["class_name"])
    raise ValueError(f"unknown task {task!r}")


def query_text(task: str, item: dict) -> str:
    """The query, its answer left for the model."""
    if task == "captioning":
        return caption_prompt()
    if task == "vqa":
        return vqa_prompt(item["question"])
    if task == "hateful_memes":
        return hateful_memes_prompt(item["ocr"])
    if task == "classification":
        return classification_prompt()
    raise ValueError(f"unknown task {task!r}")


def build_prompt(
    task: str, demonstrations: Sequence[dict], query: dict, num_shots: int, template: PromptTemplate | None = None
) -> tuple[str, list]:
    """(prompt text, its images in order): the demonstrations' images then the query's; at 0 shots
    only the query's, the demonstrations' ``<image>`` removed from the text. ``template``: a prompt
    format instead of OpenFlamingo's for ``task``."""
    if template is None:
        context = "".join(demonstration_text(task, item) for item in demonstrations)
        query_part = query_text(task, query)
    else:
        context = "".join(template.demonstration.format(**template_fields(item)) for item in demonstrations)
        query_part = template.query.format(**template_fields(query))
    images = [item["image"] for item in demonstrations] if num_shots > 0 else []
    if num_shots == 0:
        context = context.replace(IMAGE, "")
    return context + query_part, [*images, query["image"]]


def batch_prompts(
    task: str,
    demonstrations: Sequence[Sequence[dict]],
    queries: Sequence[dict],
    num_shots: int,
    template: PromptTemplate | None = None,
) -> tuple[list[str], list[list]]:
    """``build_prompt`` for each query of a batch with its own demonstrations."""
    built = [build_prompt(task, demos, query, num_shots, template) for demos, query in zip(demonstrations, queries)]
    return [text for text, _ in built], [images for _, images in built]
