"""The evaluation's metrics equal OpenFlamingo's own on the same files.

CIDEr: ours (pycocoevalcap's PTB tokenizer and Cider on the predicted images) against
``open_flamingo.eval.coco_metric.compute_cider`` (pycocotools + ``COCOEvalCap``, its METEOR and
SPICE stubbed out: SPICE downloads models, and neither changes CIDEr). VQA accuracy: ours against
``open_flamingo.eval.vqa_metric.compute_vqa_accuracy`` over answers chosen to hit every rule of
the normalisation. Both sides compute in float64 from the same tokens, so they agree to rounding
(1e-9 is ~1e6 ulps of a score of order 1, far above the reordering error of a few dozen additions).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from flamingo_pytorch.evaluation import metrics
from flamingo_pytorch.evaluation.datasets import read_coco_references, read_json
from flamingo_pytorch.evaluation.fixtures import write_captions, write_vqa_split

TRICKY = [
    "two", "2", "Two.", "the dog", "dog", "a dog.", "dogs", "isnt", "isn't", "1,000", "1000", "a/b", "a / b",
    "yes", "Yes!", "no", "none", "0", "10 apples.", "3.5", "3 . 5", "dont know", "don't know", "red-ish",
    "red ish", "hes", "he's", "the", "(left)", "left", "a\tcat", "cat\n", "  cat ", "oclock", "o'clock",
]  # fmt: skip


def stub_scorer():
    class Stub:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "stub"

    return Stub


@pytest.fixture
def their_coco_metric(monkeypatch):
    pytest.importorskip("open_flamingo")
    eval_module = pytest.importorskip("pycocoevalcap.eval", reason="pip install -e '.[eval]'")
    if shutil.which("java") is None:
        pytest.skip("the PTB tokenizer needs Java")
    monkeypatch.setattr(eval_module, "Spice", stub_scorer())
    monkeypatch.setattr(eval_module, "Meteor", stub_scorer())
    from open_flamingo.eval import coco_metric

    return coco_metric


@pytest.mark.parametrize("dataset", ["coco", pytest.param("flickr", marks=pytest.mark.slow)])
def test_cider_equals_openflamingos(their_coco_metric, tmp_path, dataset):
    paths = write_captions(tmp_path, dataset, train=2, test=10)
    references = read_coco_references(paths[f"{dataset}_annotations_json"])
    rng = random.Random(0)
    predictions = {}
    for image_id, captions in list(references.items())[1:]:  # one image left unpredicted
        words = rng.choice(captions).split()
        rng.shuffle(words)
        predictions[image_id] = " ".join(words[: rng.randint(1, len(words))]) + rng.choice(["", ".", " red"])
    result = tmp_path / "results.json"
    result.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in predictions.items()]))
    theirs = their_coco_metric.compute_cider(str(result), paths[f"{dataset}_annotations_json"])["CIDEr"]
    ours = metrics.cider(predictions, references)
    assert 0.05 < ours < 10  # neither degenerate
    assert abs(ours - theirs) <= 1e-9


def test_vqa_accuracy_equals_openflamingos(tmp_path, capsys):
    pytest.importorskip("open_flamingo")
    from open_flamingo.eval.vqa_metric import compute_vqa_accuracy

    rng = random.Random(1)
    for name in ("vqav2", "vizwiz"):  # VizWiz: answer records without answer_id
        paths = write_vqa_split(tmp_path, name, "test", 30, seed=3)
        data = read_json(paths[f"{name}_test_annotations_json"])
        for record in data["annotations"]:
            for answer in record["answers"]:
                answer["answer"] = rng.choice(TRICKY[:12]) if rng.random() < 0.8 else rng.choice(TRICKY)
        annotations_path = tmp_path / f"{name}_annotations.json"
        annotations_path.write_text(json.dumps(data))
        predictions = [
            {"question_id": r["question_id"], "answer": rng.choice(TRICKY)} for r in data["annotations"][:-2]
        ]
        result = tmp_path / f"{name}_results.json"
        result.write_text(json.dumps(predictions))
        theirs = compute_vqa_accuracy(str(result), paths[f"{name}_test_questions_json"], str(annotations_path))
        ours = metrics.vqa_accuracy(predictions, {r["question_id"]: r for r in data["annotations"]})
        assert 5 < ours < 95
        assert abs(ours - theirs) <= 1e-9, name
    capsys.readouterr()  # their progress output


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("1,000", "1000"),
        ("x/y", "x y"),
        ("x / y", "x y"),
        ("a/b", "b"),
        ("isnt", "isn't"),
        ("3.5", "3.5"),
    ],
)
def test_answer_normalisation(raw, normalized):
    assert metrics.normalize_answer(raw) == normalized


def test_vqa_accuracy_counts_matches_among_the_other_answers():
    answers = [{"answer": "cat", "answer_id": i} for i in range(2)] + [
        {"answer": "dog", "answer_id": i} for i in range(2, 10)
    ]
    # each of 2 "cat" answers sees 1 other cat: 1/3; each of 8 dogs sees 2 cats: 2/3
    assert metrics.question_accuracy("cat", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10, abs=1e-15)
