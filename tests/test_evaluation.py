"""The evaluation harness's parts: OpenFlamingo's draws, prompts, answer cleaning, cached class
scores, RICES, and a whole run on the fixtures (FlamingoPaLM, tiny sizes)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from flamingo_pytorch import Flamingo, FlamingoPaLM
from flamingo_pytorch.evaluation import runner, tasks
from flamingo_pytorch.evaluation.demonstrations import RandomDemonstrations, RicesDemonstrations, evaluation_order
from flamingo_pytorch.evaluation.fixtures import fixture_tokenizer, write_hateful_memes, write_vqa_split
from flamingo_pytorch.evaluation.models import EvalModel
from flamingo_pytorch.evaluation.prompts import build_prompt

transformers = pytest.importorskip("transformers")


def image_transform(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (c, H, W)


class PatchEncoder(nn.Module):
    """(B, 3, 32, 32) -> (B, 16, 24): 8 x 8 patches, linearly embedded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, kernel_size=8, stride=8)

    def forward(self, images):
        return self.conv(images).flatten(2).transpose(1, 2)  # (B, p, e)


def open_gates(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(0.7)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return fixture_tokenizer()


def tiny_flamingo(tokenizer) -> Flamingo:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    media = tokenizer.convert_tokens_to_ids("<image>")
    model = Flamingo(
        lm, media_token_id=media, vision_encoder=PatchEncoder(), media_dim=24, dim_head=8, heads=2,
        perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=8,
    )  # fmt: skip
    return open_gates(model)


def tiny_palm(tokenizer) -> FlamingoPaLM:
    torch.manual_seed(0)
    model = FlamingoPaLM(
        num_tokens=len(tokenizer), dim=32, depth=2, dim_head=8, heads=2, media_token_id=2, cross_attn_every=1,
        img_encoder=PatchEncoder(), media_dim=24, perceiver_num_latents=4, perceiver_depth=1,
        perceiver_num_time_embeds=8,
    )  # fmt: skip
    return open_gates(model)


def test_random_demonstrations_are_openflamingos_draws():
    """Same seed, same subset, order and demonstrations as OpenFlamingo's utils (global RNGs restored)."""
    utils = pytest.importorskip("open_flamingo.eval.utils")
    train, test = [{"n": i} for i in range(50)], [{"n": 100 + i} for i in range(30)]
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        np.random.seed(5)
        chosen = np.random.choice(len(test), 11, replace=False)
        query_set = utils.get_query_set(train, 20)
        subset = torch.utils.data.Subset(test, chosen)
        sampler = torch.utils.data.distributed.DistributedSampler(subset, num_replicas=1, rank=0)
        their_order = [int(chosen[i]) for i in sampler]
        utils.random_seed(5)
        theirs = [utils.sample_batch_demos_from_query_set(query_set, 4, n) for n in (4, 4, 3)]
    finally:
        random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    order, numpy_rng = evaluation_order(len(test), 11, seed=5)
    draw = RandomDemonstrations(train, 20, numpy_rng, seed=5)
    assert order == their_order
    assert [draw([None] * n, 4) for n in (4, 4, 3)] == theirs


def test_prompts_hold_one_image_token_per_image():
    demos = [{"image": f"d{i}", "question": "Q?", "answers": ["a"]} for i in range(2)]
    query = {"image": "q", "question": "What?"}
    text, images = build_prompt("vqa", demos, query, num_shots=2)
    assert text == "<image>Question:Q? Short answer:a<|endofchunk|>\n" * 2 + "<image>Question:What? Short answer:"
    assert images == ["d0", "d1", "q"]
    text, images = build_prompt("vqa", demos, query, num_shots=0)  # two text-only demonstrations
    assert text.count("<image>") == 1 and text.startswith("Question:Q?") and images == ["q"]


def test_answer_cleaning_is_openflamingos():
    pytest.importorskip("pycocoevalcap")
    from open_flamingo.eval.coco_metric import postprocess_captioning_generation
    from open_flamingo.eval.vqa_metric import postprocess_vqa_generation

    outputs = [
        'a "red" square Output: more',
        "yes, it is Question: x",
        "blue Short answer: no",
        "two Answer",
        "x, y, z",
    ]
    for text in outputs:
        assert tasks.clean_caption(text) == postprocess_captioning_generation(text).replace('"', "")
        assert tasks.clean_answer(text) == postprocess_vqa_generation(text)


@pytest.mark.parametrize("build", [tiny_flamingo, tiny_palm], ids=["flamingo", "flamingo_palm"])
def test_class_scores_from_one_prompt_pass_equal_a_full_forward_per_class(tokenizer, build):
    """The prompt runs once (cached); each class is then scored from the cache. Reference: the whole
    prompt + class name run for each class (Flamingo: the left-padded batch, as OpenFlamingo runs it;
    FlamingoPaLM: each row alone). float32 through two layers of width 32 with logits of order 1:
    reordered sums differ by ~1e-6; 1e-5 is the bound."""
    from PIL import Image

    model = EvalModel(build(tokenizer), tokenizer, image_transform)
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue", "green")]
    texts = ["<image>Output:a red<|endofchunk|><image>Output:", "<image>is an image with: 'x' written on it. Output:"]
    batch_images = [images[:2], images[2:]]
    names = ["red", "blue square", "a gray stripe"]
    scores = model.class_log_likelihoods(texts, batch_images, names)  # (2, 3)
    ids, mask = model.prepare_text(texts)
    pixels, time_mask = model.prepare_images(batch_images)
    for k, tokens in enumerate(model.class_tokens(names)):
        tokens = tokens.expand(2, -1)
        full = torch.cat((ids, tokens), dim=1)
        with torch.no_grad():
            if isinstance(model.model, Flamingo):
                full_mask = torch.cat((mask, torch.ones_like(tokens, dtype=torch.bool)), dim=1)
                logits = model.model(full, pixels, time_mask=time_mask, attention_mask=full_mask).logits
            else:  # each row alone, without its padding (the class tokens sit at the end either way)
                rows = [full[r : r + 1, int((~mask[r]).sum()) :] for r in range(2)]
                counts = [int(time_mask[r].sum()) for r in range(2)]
                logits = [
                    model.model(rows[r], pixels[r : r + 1, : counts[r]])[:, -tokens.shape[1] - 1 :] for r in range(2)
                ]
                logits = torch.cat(logits)  # (2, L + 1, v)
        log_probs = torch.log_softmax(logits[:, -tokens.shape[1] - 1 : -1], dim=-1)
        expected = log_probs.gather(2, tokens[:, :, None]).squeeze(-1).mean(dim=1)
        torch.testing.assert_close(scores[:, k], expected, atol=1e-5, rtol=0)
    assert scores[0].unique().numel() == 3  # the classes are told apart
    if isinstance(model.model, Flamingo):  # the fallback for caches without crop(): the reference itself
        tokens = model.class_tokens(names)
        with torch.no_grad():
            uncached = torch.stack(model.uncached_scores(ids, mask, pixels, time_mask, tokens), dim=1)
        torch.testing.assert_close(scores, uncached, atol=1e-5, rtol=0)


def test_rices_takes_the_most_similar_most_similar_last_and_caches_features(tmp_path):
    train = [{"image": i} for i in range(6)]
    vectors = torch.eye(6)  # image i points along axis i
    calls = []

    def features(images):
        calls.append(len(images))
        return torch.stack([vectors[i] if isinstance(i, int) else i for i in images])

    rices = RicesDemonstrations(train, features, batch_size=4, cache_path=str(tmp_path / "f.pt"))
    assert calls == [4, 2]
    query = {"image": torch.tensor([1.0, 0.2, 0.0, 0.0, 0.0, 0.1])}
    assert [item["image"] for item in rices([query], 2)[0]] == [1, 0]  # 0 is the most similar, and last
    again = RicesDemonstrations(train, features, cache_path=str(tmp_path / "f.pt"))
    assert calls == [4, 2, 1] and torch.equal(again.train_features, rices.train_features)  # read, not encoded


def test_a_run_writes_results_predictions_and_a_table(tokenizer, tmp_path):
    paths = write_hateful_memes(tmp_path / "data", train=8, test=6)
    for split, count, seed in (("train", 8, 2), ("test", 4, 3)):
        paths.update(write_vqa_split(tmp_path / "data", "vqav2", split, count, seed))
    data = {
        "vqav2": runner.vqa_data({k[len("vqav2_") :]: v for k, v in paths.items() if k.startswith("vqav2_")}, "vqav2"),
        "hateful_memes": runner.hateful_memes_data(
            paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
        ),
    }
    model = EvalModel(tiny_palm(tokenizer), tokenizer, image_transform)
    results = runner.run(model, data, tmp_path / "out", shots=(0, 2), seeds=(1, 2), batch_size=3, progress=False)
    assert [row["shots"] for row in results["vqav2"]] == [0, 2]
    assert all(len(row["trials"]) == 2 for rows in results.values() for row in rows)
    assert 0 <= results["vqav2"][0]["mean"] <= 100
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == "| task | metric | 0-shot | 2-shot |" and table[3].startswith("| hateful_memes | ROC AUC |")
    predictions = json.loads((tmp_path / "out" / "predictions" / "vqav2_2shot_seed1.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(item["question_id"] for item in data["vqav2"].test)


@pytest.mark.slow
def test_the_command_runs_every_task_on_the_fixtures(tmp_path, capsys):
    pytest.importorskip("pycocoevalcap")
    from flamingo_pytorch.evaluation.cli import main

    results = main(
        ["--tiny", "--fixtures", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--shots", "0", "2",
         "--num_samples", "3", "--batch_size", "2", "--num_beams", "1"]
    )  # fmt: skip
    assert sorted(results) == sorted(runner.TASKS)
    assert "| coco | CIDEr |" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "predictions").iterdir())) == 2 * len(runner.TASKS)


def test_a_tokenizer_without_the_flamingo_tokens_or_with_another_image_id_is_refused(tokenizer):
    model = tiny_palm(tokenizer)
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers_without_specials())
    with pytest.raises(ValueError, match="tokenizer has no <image> token"):
        EvalModel(model, plain, image_transform)
    model.media_token_id = 5
    with pytest.raises(ValueError, match="<image> is id 2 but the model's media_token_id is 5"):
        EvalModel(model, tokenizer, image_transform)


def tokenizers_without_specials():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))


def test_classification_from_json_lists(tmp_path):
    (tmp_path / "train.json").write_text(
        json.dumps([{"image": f"t{i}.png", "class_name": c} for i, c in enumerate("abca")])
    )
    (tmp_path / "test.json").write_text(json.dumps([{"image": "q.png", "class_name": "c"}]))
    data = runner.image_list_data(str(tmp_path / "train.json"), str(tmp_path / "test.json"))
    assert data.class_names == ["a", "b", "c"] and [item["class_id"] for item in data.train] == [0, 1, 2, 0]
    assert data.test == [{"id": 0, "image": str(tmp_path / "q.png"), "class_id": 2, "class_name": "c"}]
    (tmp_path / "other.json").write_text(json.dumps([{"image": "q.png", "class_name": "z"}]))
    with pytest.raises(ValueError, match=r"lacks: \['z'\]"):
        runner.image_list_data(str(tmp_path / "train.json"), str(tmp_path / "other.json"))


@pytest.mark.parametrize("build", [tiny_flamingo, tiny_palm], ids=["flamingo", "flamingo_palm"])
def test_rices_with_the_models_own_features_puts_the_same_image_last(tokenizer, build, tmp_path):
    paths = write_hateful_memes(tmp_path, train=6, test=2)
    data = runner.hateful_memes_data(
        paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
    )
    model = EvalModel(build(tokenizer), tokenizer, image_transform)
    features = model.vision_features([item["image"] for item in data.train[:2]])
    assert features.shape == (2, 24)
    rices = RicesDemonstrations(data.train, model.vision_features, batch_size=4)
    chosen = rices([data.train[3], data.train[5]], 3)
    assert [row[-1]["id"] for row in chosen] == [data.train[3]["id"], data.train[5]["id"]]
    assert all(len({item["id"] for item in row}) == 3 for row in chosen)
