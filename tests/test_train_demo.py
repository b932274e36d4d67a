"""The shapes demo (examples/train_shapes.py): its task, its tokenizer, and a tiny run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import shapes_dataset  # noqa: E402
import train_shapes  # noqa: E402
from shapes_dataset import (  # noqa: E402
    ANSWER_OFFSET,
    ATTRIBUTES,
    QUESTIONS,
    SLOT_LENGTH,
    Scenes,
    make_batch,
    make_tokenizer,
    render,
    sample_scenes,
)
from shapes_eval import greedy_decode, show_images  # noqa: E402
from word_tokenizer import WordTokenizer  # noqa: E402


def test_tokenizer_round_trip_and_unknown_word():
    tokenizer = make_tokenizer()
    text = "<image> what color ? red . <image> what corner ? bottom-right ."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with pytest.raises(ValueError, match="purple"):
        tokenizer.encode("what color ? purple")
    with pytest.raises(ValueError, match="<image>"):
        WordTokenizer(["<pad>", "a"])


def test_batches_are_seeded_and_laid_out_in_fixed_slots():
    tokenizer = make_tokenizer()
    first = make_batch(3, 4, tokenizer, torch.Generator().manual_seed(5))
    again = make_batch(3, 4, tokenizer, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    assert torch.equal(first.text, again.text)
    assert first.text.shape == (3, 4 * SLOT_LENGTH) and first.images.shape == (3, 4, 3, 32, 32)
    slots = first.text.view(3, 4, SLOT_LENGTH)
    assert (slots[..., 0] == tokenizer.image_id).all() and (slots[..., ANSWER_OFFSET + 1] == tokenizer.ids["."]).all()
    asked = [[tokenizer.words[i] for i in row] for row in slots[..., 2].tolist()]
    assert asked == [[QUESTIONS[q] for q in row] for row in first.questions.tolist()]


def test_answers_describe_the_image():
    """Each rendered attribute is visible in the pixels: corner from the shape's centre, size from its area."""
    scenes = sample_scenes(64, torch.Generator().manual_seed(1))
    images = render(scenes, torch.Generator().manual_seed(2))
    shape_pixels = (images - 0.15).abs().amax(dim=1) > 0.3  # (b, H, W): far from the grey background
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = shape_pixels.sum(dim=(1, 2)).float()
    centre_x = (shape_pixels * xs).sum(dim=(1, 2)) / area
    centre_y = (shape_pixels * ys).sum(dim=(1, 2)) / area
    corner = (centre_x > 16).long() + 2 * (centre_y > 16).long()
    assert torch.equal(corner, scenes.corner)
    for shape in range(len(ATTRIBUTES["shape"])):
        same = scenes.shape == shape
        assert area[same & (scenes.size == 0)].max() < area[same & (scenes.size == 1)].min()


def test_colour_answers_match_the_shape_pixels():
    scenes = Scenes(*(torch.tensor([i % len(v) for i in range(6)]) for v in ATTRIBUTES.values()))
    images = render(scenes, torch.Generator().manual_seed(0))
    palette = torch.tensor(list(shapes_dataset.COLORS.values()))  # (6, 3)
    centre_pixels = images[torch.arange(6), :, 8 + 16 * (scenes.corner // 2), 8 + 16 * (scenes.corner % 2)]
    nearest = torch.cdist(centre_pixels, palette).argmin(dim=-1)
    assert torch.equal(nearest, scenes.color)


def test_greedy_decode_appends_the_argmax_of_a_full_forward(tiny_model):
    prompt = torch.randint(4, 64, (2, 5))
    generated = greedy_decode(tiny_model, prompt, None, max_new_tokens=3)
    tokens = prompt
    for _ in range(3):
        tokens = torch.cat((tokens, tiny_model(tokens)[:, -1:].argmax(dim=-1)), dim=-1)
    assert torch.equal(generated, tokens[:, 5:])


def test_text_only_flamingo_is_its_language_model(tiny_model):
    """Stage 1 trains ``model.palm`` directly (so DDP holds only its parameters): it must be ``model(text)``."""
    text = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(tiny_model.palm(text), tiny_model(text), rtol=0, atol=0)


def test_rolled_images_show_each_slot_another_slots_image():
    images = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1)
    rolled = show_images(images, "rolled")
    assert torch.equal(rolled[:, 1:], images[:, :-1]) and torch.equal(rolled[:, 0], images[:, -1])
    assert show_images(images, "text") is None and not show_images(images, "blank").any()


def test_train_stage_rejects_parameters_that_do_not_match_requires_grad():
    module = torch.nn.Linear(2, 2)
    runtime = train_shapes.Runtime(rank=0, world_size=1, device=torch.device("cpu"), amp=False)
    with pytest.raises(ValueError, match="require grad"):
        train_shapes.train_stage("x", module, [module.weight], lambda m: m.weight.sum(), tuple, 1, 1e-3, runtime)


def test_eval_only_needs_a_checkpoint():
    with pytest.raises(SystemExit):
        train_shapes.parse_args(["--eval-only"])


@pytest.fixture
def small_eval(monkeypatch):
    """A smaller held-out set; and the thread count back as it was (main() sets it to 1 on CPU)."""
    for module in ("tqdm", "matplotlib", "safetensors"):  # the demo's optional dependencies
        pytest.importorskip(module)
    monkeypatch.setattr(train_shapes, "EVAL_SEQUENCES", 128)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_demo_trains_saves_reloads_and_reproduces_its_accuracy(tmp_path, small_eval):
    results = train_shapes.main(["--steps", "24", "--out", str(tmp_path / "run")])
    checkpoint = tmp_path / "run" / train_shapes.CHECKPOINT
    figure = tmp_path / "run" / train_shapes.FIGURE
    assert checkpoint.stat().st_size > 0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / train_shapes.RESULTS).read_text()) == results
    assert set(results) == {"images", "rolled", "blank", "text", "chance"}

    reloaded = train_shapes.main(["--eval-only", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval")])
    assert reloaded == results  # the same weights give the same greedy answers, exactly
    assert (tmp_path / "eval" / train_shapes.FIGURE).exists()

    model, config, losses = train_shapes.load_checkpoint(checkpoint, torch.device("cpu"))
    assert config["num_tokens"] == len(make_tokenizer()) and len(losses["flamingo"]) == 24
    assert all(not p.requires_grad for p in model.img_encoder.parameters())


def test_demo_runs_with_bf16_autocast(tmp_path, small_eval, tiny_model):
    runtime = train_shapes.Runtime(rank=0, world_size=1, device=torch.device("cpu"), amp=True)
    with runtime.autocast():
        assert tiny_model(torch.randint(0, 64, (1, 6))).dtype == torch.bfloat16
    results = train_shapes.main(["--steps", "4", "--amp", "--out", str(tmp_path)])
    assert 0.0 <= results["images"]["all"] <= 1.0


def test_demo_with_a_transformers_llama_trains_saves_and_reloads(tmp_path, small_eval):
    pytest.importorskip("transformers", reason="--lm llama needs transformers (pip install -e '.[hf]')")
    results = train_shapes.main(["--steps", "12", "--lm", "llama", "--out", str(tmp_path / "run")])
    assert set(results) == {"images", "rolled", "blank", "text", "chance"}
    checkpoint = tmp_path / "run" / train_shapes.CHECKPOINT
    reloaded = train_shapes.main(["--eval-only", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval")])
    assert reloaded == results  # the same weights give the same greedy answers, exactly
    model, config, _ = train_shapes.load_checkpoint(checkpoint, torch.device("cpu"))
    assert config["lm"] == "llama" and type(model.lm).__name__ == "LlamaForCausalLM"
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.flamingo_parameters()}
