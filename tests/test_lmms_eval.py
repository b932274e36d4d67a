"""The lmms-eval plugin (``--model flamingo``): its answers are ``EvalModel``'s on the same prompts.

A tiny random Flamingo (a 2-layer Llama and a 1-layer transformers CLIP vision tower, gates open) is
saved as a user would hold one: the language model and its tokenizer with ``save_pretrained``, the
vision tower and its image processor likewise, and ``save_trained``'s file. The plugin loads it from
those files; the reference is ``EvalModel`` over the model in memory. The quick tests call the
plugin class in process; the slow ones load an OpenFlamingo checkpoint.pt with an open_clip tower,
and run lmms-eval's own command on local task YAMLs (lmms-eval's import alone takes ~15 s on 2 cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

instance = pytest.importorskip("lmms_eval.api.instance", reason="pip install -e '.[eval]'")
transformers = pytest.importorskip("transformers")

from flamingo_pytorch.evaluation import EvalModel  # noqa: E402
from flamingo_pytorch.evaluation.fixtures import draw, fixture_tokenizer, scenes  # noqa: E402
from flamingo_pytorch.evaluation.lmms_eval_plugin.models.flamingo import FlamingoLMMs, place_images  # noqa: E402
from flamingo_pytorch.flamingo import Flamingo  # noqa: E402

unwrap_generation_output = instance.unwrap_generation_output

PLUGIN = "flamingo_pytorch.evaluation.lmms_eval_plugin"
# Log-likelihoods: the plugin's come from the prompt's key/value cache, the check's from one whole
# forward; the two differ by float32 rounding in differently ordered sums: logits of size ~1-10,
# eps 1.2e-7, a few ulps each through 2 layers, summed over <= 4 continuation tokens -> ~1e-5.
TOLERANCE = 1e-4


def tiny_flamingo(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    vision = transformers.CLIPVisionModel(vision_config).eval()
    model = Flamingo(
        lm, media_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_encoder=vision, dim_head=8, heads=2,
        ff_mult=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=8,
    )  # fmt: skip
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(0.7)  # open: the images change the text's logits
    return model.eval(), lm, vision


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model_args for the plugin, the reference EvalModel over the same model in memory)."""
    folder = tmp_path_factory.mktemp("flamingo")
    tokenizer = fixture_tokenizer()
    model, lm, vision = tiny_flamingo(tokenizer)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer.save_pretrained(folder / "lm")
    lm.save_pretrained(folder / "lm")
    processor.save_pretrained(folder / "vision")
    vision.save_pretrained(folder / "vision")
    model.save_trained(str(folder / "flamingo.safetensors"))

    def transform(image):
        return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]  # (c, H, W)

    args = {"checkpoint": folder / "flamingo.safetensors", "lm": folder / "lm", "vision": folder / "vision"}
    return {key: str(value) for key, value in args.items()}, EvalModel(model, tokenizer, transform)


def images(count: int, seed: int) -> list:
    rng = np.random.RandomState(seed)
    return [draw(*scene, rng) for scene in scenes(count, seed)]


def requests_for(docs: list[dict], second: object) -> list[SimpleNamespace]:
    """lmms-eval's simple-model request args: (context, second, doc_to_visual, doc_id, task, split)."""
    return [
        SimpleNamespace(args=(doc["context"], second(doc), lambda d: d["images"], i, "tiny", "test"))
        for i, doc in enumerate(docs)
    ]


def test_place_images_gives_one_image_token_per_image_in_order():
    a, b = object(), object()
    assert place_images("Q: what?", [a, b]) == ("<image><image>Q: what?", [a, b])
    assert place_images("x<image>y<image>", [a, b]) == ("x<image>y<image>", [a, b])
    assert place_images("<image 2> left, <image 1> right, <image 2>", [a, b]) == (
        "<image> left, <image> right, <image>",
        [b, a, b],
    )
    with pytest.raises(ValueError, match="2 <image> tokens but the request has 1"):
        place_images("<image><image>", [a])
    with pytest.raises(ValueError, match="names images \\[3\\]"):
        place_images("<image 3>", [a, b])
    with pytest.raises(ValueError, match="without images"):
        place_images("text only", [])


def test_generate_until_equals_eval_model(saved):
    """Loaded from the saved files, batched, with images placed three ways: EvalModel's generations."""
    args, reference = saved
    plugin = FlamingoLMMs(**args, device="cpu", batch_size=3)
    pictures = images(4, seed=1)
    docs = [
        {"context": "Output:", "images": pictures[:1]},
        {"context": "<image>Output: red<|endofchunk|><image>Output:", "images": pictures[1:3]},
        {"context": "<image 2>then<image 1>Output:", "images": pictures[2:4]},
    ]
    plugin.task_dict = {"tiny": {"test": docs}}
    gen_kwargs = {"max_new_tokens": 6, "until": ["\n"]}
    got = plugin.generate_until(requests_for(docs, lambda doc: dict(gen_kwargs)))
    texts = ["<image>Output:", docs[1]["context"], "<image>then<image>Output:"]
    expected = reference.generate(
        texts, [pictures[:1], pictures[1:3], [pictures[3], pictures[2]]], max_new_tokens=6, num_beams=1
    )
    assert got == [text.split("\n")[0] for text in expected]
    assert any(got), "the tiny model generated nothing: the comparison would be empty"


def whole_forward_scores(reference: EvalModel, text: str, pictures: list, continuation: str) -> tuple[float, bool]:
    """The check: prompt and continuation through one forward, summed log-probability, greedy match."""
    ids, _ = reference.prepare_text([text])
    pixels, time_mask = reference.prepare_images([pictures])
    tokens = reference.class_tokens([continuation])[0]  # (1, L)
    with torch.no_grad():
        logits = reference.model(torch.cat((ids, tokens), 1), pixels, time_mask=time_mask).logits
    logits = logits[:, ids.shape[1] - 1 : -1]  # (1, L, v): the predictions of the continuation
    log_probs = torch.log_softmax(logits.float(), -1).gather(2, tokens[:, :, None])
    return float(log_probs.sum()), bool((logits.argmax(-1) == tokens).all())


def test_loglikelihood_is_the_summed_log_probability(saved):
    """Per request: the continuation's summed log-probability and greedy flag, from one whole forward."""
    _, reference = saved
    plugin = FlamingoLMMs(model=reference)
    pictures = images(3, seed=2)
    docs = [
        {"context": "Output:", "images": pictures[:1]},
        {"context": "<image>Output: red<|endofchunk|><image>Output:", "images": pictures[1:3]},
    ]
    plugin.task_dict = {"tiny": {"test": docs}}
    choices = [" red", " blue circle", " a green stripe on", "<|endofchunk|>"]
    requests = [
        SimpleNamespace(args=(doc["context"], choice, lambda d: d["images"], i, "tiny", "test"))
        for i, doc in enumerate(docs)
        for choice in choices
    ]
    # make one choice the greedy continuation, so that the flag is tested both ways
    ids, _ = reference.prepare_text(["<image>Output:"])
    pixels, time_mask = reference.prepare_images([pictures[:1]])
    first = reference.model(ids, pixels, time_mask=time_mask).logits[0, -1].argmax()
    greedy_choice = reference.tokenizer.decode([int(first)])
    requests.append(SimpleNamespace(args=("Output:", greedy_choice, lambda d: d["images"], 0, "tiny", "test")))
    got = [unwrap_generation_output(output)[0] for output in plugin.loglikelihood(requests)]  # as lmms-eval reads it
    texts = ["<image>Output:", docs[1]["context"]]
    for request, (total, greedy) in zip(requests, got):
        doc_id, continuation = request.args[3], request.args[1]
        want_total, want_greedy = whole_forward_scores(reference, texts[doc_id], docs[doc_id]["images"], continuation)
        assert abs(total - want_total) <= TOLERANCE * max(1.0, abs(want_total)), (continuation, total, want_total)
        assert greedy == want_greedy
    assert got[-1][1] and not all(greedy for _, greedy in got)


def openflamingo_files(folder: Path, tokenizer) -> dict[str, str]:
    """An OpenFlamingo checkpoint.pt (their classes, open gates), its Llama folder and a tiny open_clip
    architecture registered from a JSON config with its weights in a local file."""
    open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
    their = pytest.importorskip("open_flamingo.src.flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    tokenizer.save_pretrained(folder / "lm")
    lm.save_pretrained(folder / "lm")
    clip_config = {
        "embed_dim": 8,
        "vision_cfg": {"layers": 1, "width": 48, "head_width": 16, "image_size": 32, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1},
    }
    (folder / "tiny-vit.json").write_text(json.dumps(clip_config))
    open_clip.add_model_config(folder / "tiny-vit.json")
    clip = open_clip.create_model("tiny-vit").eval()
    torch.save(clip.state_dict(), folder / "clip.pt")
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    clip.visual.output_tokens = True
    media, end_of_chunk = tokenizer.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    theirs = their.Flamingo(clip, lm, end_of_chunk, media, vis_dim=48, cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            block.attn_gate.uniform_(0.5, 1.0)
            block.ff_gate.uniform_(0.5, 1.0)
    torch.save(theirs.state_dict(), folder / "checkpoint.pt")
    args = {"checkpoint": "checkpoint.pt", "lm": "lm", "vision_pretrained": "clip.pt"}
    return {**{key: str(folder / value) for key, value in args.items()}, "vision": "open_clip:tiny-vit"}


@pytest.mark.slow  # ~11 s on 2 cores, mostly importing open_flamingo and open_clip
def test_an_openflamingo_checkpoint_answers_as_load_openflamingo(tmp_path):
    """checkpoint.pt + open_clip: the plugin's answers are EvalModel's over load_openflamingo's model."""
    from flamingo_pytorch.openflamingo import load_openflamingo

    tokenizer = fixture_tokenizer()
    args = openflamingo_files(tmp_path, tokenizer)
    plugin = FlamingoLMMs(**args, device="cpu", batch_size=2)
    import open_clip

    clip, _, transform = open_clip.create_model_and_transforms("tiny-vit", pretrained=args["vision_pretrained"])
    lm = transformers.AutoModelForCausalLM.from_pretrained(args["lm"])
    model = load_openflamingo(args["checkpoint"], lm, media_token_id=2, vision_encoder=clip.visual)
    reference = EvalModel(model, tokenizer, transform)
    pictures = images(3, seed=4)
    docs = [{"context": "Output:", "images": pictures[:1]}, {"context": "<image 2>or<image 1>", "images": pictures[1:]}]
    plugin.task_dict = {"tiny": {"test": docs}}
    got = plugin.generate_until(requests_for(docs, lambda doc: {"max_new_tokens": 4}))
    texts, ordered = ["<image>Output:", "<image>or<image>"], [pictures[:1], [pictures[2], pictures[1]]]
    assert got == reference.generate(texts, ordered, max_new_tokens=4, num_beams=1)
    scored = plugin.loglikelihood(requests_for(docs, lambda doc: " red square"))
    for (total, greedy), text, row in zip([unwrap_generation_output(x)[0] for x in scored], texts, ordered):
        want_total, want_greedy = whole_forward_scores(reference, text, row, " red square")
        assert abs(total - want_total) <= TOLERANCE * max(1.0, abs(want_total)) and greedy == want_greedy


def write_tasks(folder: Path) -> None:
    """Two local lmms-eval tasks over JSON files: a generate_until and a multiple_choice one."""
    pictures = images(4, seed=3)
    rows = []
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{i}.png")
        rows.append({"id": i, "images": [str(folder / f"{i}.png")], "question": "Output:", "answer": "red"})
    rows[3]["images"].append(str(folder / "0.png"))  # a two-image document
    rows[3]["question"] = "<image 2>and<image 1>Output:"
    (folder / "data.json").write_text(json.dumps(rows))
    (folder / "tiny_utils.py").write_text(
        "from PIL import Image\n\n"
        "def doc_to_visual(doc):\n    return [Image.open(path).convert('RGB') for path in doc['images']]\n\n"
        "def doc_to_text(doc):\n    return doc['question']\n"
    )
    common = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {folder / 'data.json'}}}\n"
        "test_split: test\n"
        "doc_to_visual: !function tiny_utils.doc_to_visual\n"
        "doc_to_text: !function tiny_utils.doc_to_text\n"
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: flamingo_tiny_gen\noutput_type: generate_until\n" + common + "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 5\n  until: ['\\n']\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "tiny_mc.yaml").write_text(
        "task: flamingo_tiny_mc\noutput_type: multiple_choice\n" + common + "doc_to_target: 0\n"
        "doc_to_choice: ['red', 'blue', 'green square']\n"
        "metric_list:\n  - metric: acc\n"
    )


def samples(out: Path, task: str) -> list[dict]:
    path = next(out.rglob(f"*samples_{task}*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.slow
def test_lmms_eval_command_equals_eval_model(saved, tmp_path):
    """``python -m lmms_eval --model flamingo`` on local tasks: EvalModel's generations and scores."""
    args, reference = saved
    write_tasks(tmp_path)
    env = {
        **os.environ, "LMMS_EVAL_PLUGINS": PLUGIN, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    model_args = ",".join(f"{key}={value}" for key, value in {**args, "device": "cpu"}.items())
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "flamingo", "--model_args", model_args,
        "--tasks", "flamingo_tiny_gen,flamingo_tiny_mc", "--include_path", str(tmp_path), "--batch_size", "1",
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0 and "Error during evaluation" not in done.stdout + done.stderr, log
    rows = json.loads((tmp_path / "data.json").read_text())
    pictures = [[Image.open(path).convert("RGB") for path in row["images"]] for row in rows]
    prompts = [place_images(row["question"], row_pictures) for row, row_pictures in zip(rows, pictures)]
    generated = samples(tmp_path / "out", "flamingo_tiny_gen")
    assert [sample["doc_id"] for sample in generated] == list(range(len(rows)))
    for (text, pictures), sample in zip(prompts, generated):
        expected = reference.generate([text], [pictures], max_new_tokens=5, num_beams=1)[0]
        assert sample.get("resps", sample["filtered_resps"]) == expected.split("\n")[0]  # logged raw if filtered
    scored = samples(tmp_path / "out", "flamingo_tiny_mc")
    assert [sample["doc_id"] for sample in scored] == list(range(len(rows)))
    for (text, pictures), sample in zip(prompts, scored):
        for choice, response in zip(["red", "blue", "green square"], sample["filtered_resps"], strict=True):
            total, greedy = whole_forward_scores(reference, text, pictures, " " + choice)
            logged, logged_greedy = float(response[0]), response[1]  # the log writes both as strings
            assert abs(logged - total) <= TOLERANCE * max(1.0, abs(total)), (choice, response, total)
            assert logged_greedy == str(greedy)
