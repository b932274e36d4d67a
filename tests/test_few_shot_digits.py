"""The digits few-shot demo (examples/few_shot_digits.py): its episodes, its controls, and a tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import few_shot_digits  # noqa: E402
from digits_encoder import DigitsEncoder, nearest_neighbour_answers  # noqa: E402
from digits_episodes import (  # noqa: E402
    NAME_AT,
    NAMES,
    NOVEL_CLASSES,
    SLOT,
    instance_pool,
    load_pools,
    make_tokenizer,
    next_token_labels,
    sample_episodes,
    with_transforms,
)
from digits_eval import shown_images, wilson_interval  # noqa: E402


@pytest.fixture(scope="module")
def pools():
    return load_pools()


def test_split_keeps_novel_digits_out_and_images_disjoint(pools):
    assert set(pools["novel"].labels.tolist()) == set(NOVEL_CLASSES)
    for part in ("train", "val", "test"):
        assert set(pools[part].labels.tolist()) == set(range(7))
    flat = {part: {tuple(x.flatten().tolist()) for x in pools[part].images} for part in ("train", "val", "test")}
    assert sum(len(pools[p].labels) for p in flat) + len(pools["novel"].labels) == 1797
    # Disjoint up to the few exact duplicates the data set itself holds.
    assert len(flat["train"] & flat["test"]) <= 3 and len(flat["val"] & flat["test"]) <= 3
    extended = with_transforms(pools["train"], ("identity", "rot90"))
    assert extended.classes() == list(range(14))
    torch.testing.assert_close(
        extended.images[extended.labels == 3], pools["train"].images[pools["train"].labels == 1].rot90(1, dims=(-2, -1))
    )


def test_episode_text_names_each_class_consistently(pools):
    tokenizer = make_tokenizer()
    episodes = sample_episodes(pools["test"], 20, 4, 2, torch.Generator().manual_seed(3), tokenizer)
    assert episodes.text.shape == (20, SLOT * 9) and episodes.images.shape == (20, 9, 1, 8, 8)
    names = episodes.text[:, NAME_AT::SLOT]  # (E, t): the name after each image, the answer last
    assert torch.equal(names[:, -1], episodes.answer)
    for e in range(20):
        by_class = {}
        for c, name in zip(episodes.classes[e].tolist(), names[e].tolist()):
            assert by_class.setdefault(c, name) == name  # one name per class
        assert len(set(by_class.values())) == 4 and all(tokenizer.words[n] in NAMES for n in by_class.values())
        assert sorted(episodes.classes[e, :-1].tolist()) == sorted(list(by_class) * 2)
    # The images are the pool's images of the stated classes.
    for e, t in ((0, 0), (5, 8)):
        matches = (pools["test"].images == episodes.images[e, t]).flatten(1).all(dim=1)
        assert int(episodes.classes[e, t]) in pools["test"].labels[matches].tolist()
    # Symbols stand where the images are, one symbol per class; the rest of the text is the same.
    image_slots = episodes.text == tokenizer.image_id
    assert torch.equal(episodes.symbols[~image_slots], episodes.text[~image_slots])
    symbols = episodes.symbols[:, ::SLOT]
    assert all(len(set(zip(s.tolist(), c.tolist()))) == 4 for s, c in zip(symbols, episodes.classes))


def test_instance_episodes_name_single_images(pools):
    """Stage 2's other episodes: each way is one training image, the query a copy of one of them."""
    train = pools["train"]
    instances = instance_pool(train)
    assert instances.classes() == list(range(len(train.labels)))
    episodes = sample_episodes(instances, 50, 5, 1, torch.Generator().manual_seed(5), make_tokenizer())
    names = episodes.text[:, NAME_AT::SLOT]  # (E, t)
    supports, query = episodes.images[:, :-1], episodes.images[:, -1:]  # (E, 5, 1, 8, 8), (E, 1, 1, 8, 8)
    same = (supports == query).flatten(2).all(dim=-1)  # (E, 5): the supports equal to the query
    assert same.any(dim=1).all()
    for e in range(50):
        assert len(set(episodes.classes[e, :-1].tolist())) == 5  # five different images
        assert episodes.answer[e] in names[e, :-1][same[e]]  # a copy of the query sits beside its answer
    ways_of_one_digit = [len(set(train.labels[episodes.classes[e, :-1]].tolist())) < 5 for e in range(50)]
    assert any(ways_of_one_digit)  # two ways can show the same digit: no class code answers these


def test_loss_only_on_names_the_prompt_makes_predictable(pools):
    tokenizer = make_tokenizer()
    episodes = sample_episodes(pools["test"], 8, 3, 2, torch.Generator().manual_seed(4), tokenizer)
    labels = next_token_labels(episodes.text, episodes.loss_mask)
    for e in range(8):
        seen, expected = set(), []
        for slot, c in enumerate(episodes.classes[e].tolist()):
            if c in seen:
                expected.append(SLOT * slot + NAME_AT - 1)  # the <image> before the name predicts it
            seen.add(c)
        assert torch.nonzero(labels[e] != -100).flatten().tolist() == expected
        assert torch.equal(labels[e, expected], episodes.text[e, [i + 1 for i in expected]])


def test_controls_and_nearest_neighbour(pools):
    tokenizer = make_tokenizer()
    episodes = sample_episodes(pools["test"], 6, 3, 1, torch.Generator().manual_seed(5), tokenizer)
    moved = shown_images(episodes, "moved_supports", None)
    torch.testing.assert_close(moved[:, 1], episodes.images[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(moved[:, 0], episodes.images[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(moved[:, 3], episodes.images[:, 3], rtol=0, atol=0)
    assert shown_images(episodes, "withheld", None) is None
    # A query equal to one support image is nearest to it, whatever the encoder.
    images = episodes.images.clone()
    images[:, -1] = images[:, 1]
    assert nearest_neighbour_answers(DigitsEncoder(dim=16).eval(), images).tolist() == [1] * 6
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)


def test_tiny_run_end_to_end_and_eval_only_reproduces_it(tmp_path):
    tiny = ["--encoder-steps", "2", "--lm-steps", "2", "--flamingo-steps", "2", "--episodes", "12"]
    results = few_shot_digits.main([*tiny, "--out", str(tmp_path / "train")])
    checkpoint = tmp_path / "train" / few_shot_digits.CHECKPOINT
    assert checkpoint.exists() and (tmp_path / "train" / few_shot_digits.FIGURE).stat().st_size > 0
    written = json.loads((tmp_path / "train" / few_shot_digits.RESULTS).read_text())
    assert written == json.loads(json.dumps(results))
    assert written["training"]["training_classes"] == 7  # the seen digits as they are
    assert [(r["split"], r["ways"], r["shots"]) for r in written["rows"]] == [("seen", 5, 1), ("novel", 3, 1)]
    for row in written["rows"]:
        assert row["chance"] == pytest.approx(1 / row["ways"])
        for column in ("images", "withheld", "foreign_query", "moved_supports", "nearest_neighbour"):
            cell = row[column]
            assert 0 <= cell["low"] <= cell["accuracy"] <= cell["high"] <= 1
            assert round(cell["accuracy"] * 12) == pytest.approx(cell["accuracy"] * 12)
    again = few_shot_digits.main(
        ["--eval-only", "--checkpoint", str(checkpoint), "--episodes", "12", "--out", str(tmp_path / "eval")]
    )
    assert again["rows"] == written["rows"]
    other = few_shot_digits.main(
        [
            "--eval-only",
            "--checkpoint",
            str(checkpoint),
            "--episodes",
            "5",
            "--ways",
            "4",
            "--shots",
            "3",
            "--out",
            str(tmp_path / "e2"),
        ]
    )
    assert [(r["split"], r["ways"], r["shots"], r["episodes"]) for r in other["rows"]] == [
        ("seen", 4, 3, 5),
        ("novel", 3, 3, 5),
    ]


def test_extra_classes_train_on_turned_and_inverted_digits_too(tmp_path):
    tiny = ["--encoder-steps", "2", "--lm-steps", "2", "--flamingo-steps", "2", "--episodes", "4", "--extra-classes"]
    results = few_shot_digits.main([*tiny, "--out", str(tmp_path)])
    assert results["training"]["training_classes"] == 7 * 6  # each seen digit under 6 transforms
