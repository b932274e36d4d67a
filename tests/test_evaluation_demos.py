"""The demos through the evaluation harness: prompt templates of one's own, an end-of-answer token,
images withheld as a control, and the shapes demo written as a VQAv2-format task and evaluated by
``python -m flamingo_pytorch.evaluate`` end to end (examples/shapes_eval_data.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from flamingo_pytorch.evaluation import cli, datasets
from flamingo_pytorch.evaluation.models import EvalModel, until_end
from flamingo_pytorch.evaluation.prompts import PromptTemplate, build_prompt

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import shapes_eval_data  # noqa: E402
import train_shapes  # noqa: E402
from harness_data import pil_to_tensor, transformers_tokenizer  # noqa: E402
from shapes_dataset import ANSWER_OFFSET, SLOT_LENGTH, make_tokenizer  # noqa: E402
from shapes_encoder import ShapesEncoder  # noqa: E402

SHAPES_TEMPLATE = PromptTemplate(**shapes_eval_data.TEMPLATES["vqav2"])


def untrained_shapes_model():
    torch.manual_seed(0)
    config = train_shapes.model_config(make_tokenizer())
    return train_shapes.build_model(config, ShapesEncoder(dim=config["dim"])).eval(), config


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_vqav2")
    return shapes_eval_data.write_shapes_vqav2(root, train=6, test_sequences=2)  # 8 held-out questions


def test_prompt_template_writes_demonstrations_and_query():
    demos = [{"image": "a", "question": "what size ?", "answers": ["small", "large"]}]
    query = {"image": "b", "question": "what color ?"}
    text, images = build_prompt("vqa", demos, query, num_shots=1, template=SHAPES_TEMPLATE)
    assert text == "<image> what size ? small . <image> what color ?" and images == ["a", "b"]
    text, images = build_prompt("vqa", demos, query, num_shots=0, template=SHAPES_TEMPLATE)
    assert text == " what size ? small . <image> what color ?" and images == ["b"]  # text-only demonstrations
    with pytest.raises(ValueError, match="query must hold <image> once"):
        PromptTemplate(demonstration="<image>{question}", query="{question}")


def test_until_end_cuts_at_the_first_end_token():
    assert until_end([9, 4, 7, 4], 4) == [9] and until_end([9, 7], 4) == [9, 7]


def test_shapes_prompts_are_the_demos_own_tokens(shapes_files):
    """Three held-out slots as demonstrations and the fourth as the query give the token ids the demo
    was trained and evaluated on, and the JPEG files give back its images (quality 100, 4:4:4: every
    DCT coefficient is rounded by at most 0.5, and 64 of them through basis values of at most 1/4
    move a pixel by at most 8 levels, plus a level or two for the colour conversion: 10/255)."""
    test = datasets.read_vqa(
        shapes_files["vqav2_test_questions_json"],
        shapes_files["vqav2_test_annotations_json"],
        shapes_files["vqav2_test_image_dir"],
        "vqav2",
    )
    model, _ = untrained_shapes_model()
    harness = EvalModel(model, transformers_tokenizer(make_tokenizer().words), pil_to_tensor, end_of_chunk=".")
    text, paths = build_prompt("vqa", test[:3], test[3], num_shots=3, template=SHAPES_TEMPLATE)
    input_ids, attention_mask = harness.prepare_text([text])
    demo = train_shapes.held_out_set()[0]
    assert input_ids[0].tolist() == demo.text[0, : 3 * SLOT_LENGTH + ANSWER_OFFSET].tolist()
    assert bool(attention_mask.all())
    images, time_mask = harness.prepare_images([paths])
    assert images.shape == (1, 4, 3, 32, 32) and bool(time_mask.all())
    assert (images[0] - demo.images[0]).abs().max() <= 10 / 255


@pytest.mark.parametrize("withhold", [None, "blank", "none"])
def test_withheld_images_never_reach_the_model(shapes_files, withhold):
    """What the model's generate and prefill receive: the images, zeros of their shape, or nothing."""
    model, _ = untrained_shapes_model()
    received = []

    def spy(method):
        def wrapped(text, images=None, **kwargs):
            received.append((images, kwargs.get("time_mask")))
            return method(text, images, **kwargs)

        return wrapped

    model.generate, model.prefill = spy(model.generate), spy(model.prefill)
    tokenizer = transformers_tokenizer(make_tokenizer().words)
    harness = EvalModel(model, tokenizer, pil_to_tensor, end_of_chunk=".", withhold_images=withhold)
    test = datasets.read_vqa(
        shapes_files["vqav2_test_questions_json"], None, shapes_files["vqav2_test_image_dir"], "vqav2"
    )
    texts = [f"<image> {item['question']}" for item in test[:2]]
    harness.generate(texts, [[item["image"]] for item in test[:2]], max_new_tokens=2)
    harness.class_log_likelihoods(texts, [[item["image"]] for item in test[:2]], ["red", "small"])
    assert len(received) == 2
    real = torch.stack([pil_to_tensor(datasets.load_image(item["image"])) for item in test[:2]])[:, None]
    for images, time_mask in received:
        if withhold == "none":
            assert images is None and time_mask is None
        elif withhold == "blank":
            assert images.shape == real.shape and not images.any() and bool(time_mask.all())
        else:
            assert torch.equal(images, real) and bool(time_mask.all())
    with pytest.raises(ValueError, match="withhold_images"):
        EvalModel(model, tokenizer, pil_to_tensor, end_of_chunk=".", withhold_images="zeros")


def test_shapes_demo_through_the_command(shapes_files, tmp_path, monkeypatch):
    """Write an untrained shapes model's checkpoint, evaluate it with ``python -m flamingo_pytorch.evaluate``
    on the written files, in the demo's prompt format, at 0 and 3 shots (its most: 4 images)."""
    model, config = untrained_shapes_model()
    checkpoint = tmp_path / "shapes.safetensors"
    train_shapes.save_checkpoint(checkpoint, model, config, {})
    monkeypatch.setenv("SHAPES_CHECKPOINT", str(checkpoint))
    arguments = [item for key, value in shapes_files.items() for item in (f"--{key}", str(value))]
    out = tmp_path / "results"
    options = ["--shots", "0", "3", "--trial_seeds", "1", "2", "--output_dir", str(out), "--withhold_images", "blank"]
    results = cli.main(["--model_script", str(EXAMPLES / "shapes_eval_data.py"), *arguments, *options])
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert [row["shots"] for row in written["vqav2"]] == [0, 3]
    for row in written["vqav2"]:
        assert len(row["trials"]) == 2 and all(0.0 <= score <= 100.0 for score in row["trials"])
        predictions = json.loads((out / "predictions" / f"vqav2_{row['shots']}shot_seed1.json").read_text())
        assert sorted(p["question_id"] for p in predictions) == list(range(8))
        vocabulary = set(make_tokenizer().words) - {"<pad>", "<image>", "."}
        assert all(set(p["answer"].split()) <= vocabulary for p in predictions)  # cut before the "."


def test_digits_files_give_back_the_demos_images_and_format(tmp_path):
    """The written digits come back exactly (17 grey levels stored as 15 k, read as / 240), and a
    classification prompt in the demo's template tokenizes as the demo's episodes do."""
    pytest.importorskip("sklearn")
    import digits_eval_data
    from digits_episodes import load_pools
    from digits_episodes import make_tokenizer as digits_tokenizer

    arguments = digits_eval_data.write_digits_classification(tmp_path, "novel", per_class=6)
    train = datasets.read_image_list(arguments["imagenet_train_list"])[0]
    pool = load_pools()["novel"]
    first_seven = int(torch.nonzero(pool.labels == 7).flatten()[0])
    image = digits_eval_data.digits_transform(datasets.load_image(train[0]["image"]))
    assert train[0]["class_name"] == digits_eval_data.CLASS_NAMES[7] and torch.equal(image, pool.images[first_seven])
    template = PromptTemplate(**digits_eval_data.TEMPLATES["imagenet"])
    text, _ = build_prompt("classification", train[:2], train[2], num_shots=2, template=template)
    words = digits_tokenizer()
    ids = transformers_tokenizer(words.words)(text)["input_ids"]
    name = digits_eval_data.CLASS_NAMES[7]
    assert ids == words.encode(f"<image> {name} . <image> {name} . <image>")
    assert 0.0 < digits_eval_data.coverage(arguments, shots=1, seed=0) < 1.0


def test_class_balanced_demonstrations_hold_every_class_k_times():
    from collections import Counter

    from flamingo_pytorch.evaluation.demonstrations import ClassBalancedDemonstrations

    train = [{"id": i, "class_name": name} for i, name in enumerate(["a"] * 5 + ["b"] * 3 + ["c"] * 4)]
    draw = ClassBalancedDemonstrations(train, seed=0)
    rows = draw([{}] * 20, 6)
    assert all(Counter(item["class_name"] for item in row) == {"a": 2, "b": 2, "c": 2} for row in rows)
    assert all(len({item["id"] for item in row}) == 6 for row in rows)  # without replacement
    assert len({tuple(item["id"] for item in row) for row in rows}) > 1  # orders and picks vary
    assert ClassBalancedDemonstrations(train, seed=0)([{}] * 20, 6) == rows  # the seed fixes them
    with pytest.raises(ValueError, match="multiple of the 3 classes"):
        draw([{}], 4)
    with pytest.raises(ValueError, match="a class has 3"):
        draw([{}], 12)


def test_run_refuses_templates_for_unknown_tasks_and_mixed_draws(tmp_path):
    from flamingo_pytorch.evaluation import runner

    with pytest.raises(ValueError, match="unknown tasks \\['shapes'\\]"):
        runner.run(None, {}, tmp_path, prompt_templates={"shapes": SHAPES_TEMPLATE})
    with pytest.raises(ValueError, match="class_balanced or rices"):
        runner.run(None, {}, tmp_path, class_balanced=True, rices=True)
