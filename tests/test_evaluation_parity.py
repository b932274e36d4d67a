"""Our evaluation harness equals OpenFlamingo's own ``evaluate.py`` on the same model and files.

A tiny OpenFlamingo model is built with OpenFlamingo's code (a random Llama with its
``FlamingoLMMixin`` and a tiny open_clip ViT, as tests/test_openflamingo.py builds them) and the
same weights are loaded onto our ``Flamingo`` with ``load_openflamingo``. OpenFlamingo's
``evaluate_captioning`` / ``evaluate_vqa`` / ``evaluate_classification`` run on theirs, through
``TheirEvalModel`` below: the thinnest stand-in for ``open_flamingo.eval.models.open_flamingo.EvalModel``
(not shipped in the package; it loads from the hub), doing what that class does around the
tiny model. Ours run on ours. Both record every batch; we check the same prompts token for
token, the same demonstration images in the same order for the same seeds, the same
predictions and the same scores.

Setup only, no change to either side's logic: their LM's forward may be called without an
``attention_mask`` (transformers 5 leaves out an all-ones mask; FlamingoLMMixin requires the
argument), their LM's generation config suppresses ``<image>`` (our ``Flamingo.generate`` never
emits it; OpenFlamingo's could), both LMs pad with the tokenizer's pad id, a one-process gloo
group stands in for their distributed run, and their METEOR/SPICE scorers are stubbed (CIDEr does
not depend on them; SPICE downloads models).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
import types
from argparse import Namespace

import numpy as np
import pytest
import torch
from einops import repeat

from flamingo_pytorch.evaluation import tasks
from flamingo_pytorch.evaluation.demonstrations import RicesDemonstrations
from flamingo_pytorch.evaluation.fixtures import (
    fixture_tokenizer,
    write_captions,
    write_hateful_memes,
    write_vqa_split,
)
from flamingo_pytorch.evaluation.models import EvalModel, as_image
from flamingo_pytorch.evaluation.runner import caption_data, hateful_memes_data, vqa_data
from flamingo_pytorch.openflamingo import load_openflamingo

pytest.importorskip("open_flamingo", reason="pip install --no-deps open-flamingo==2.0.1")
open_clip = pytest.importorskip("open_clip", reason="pip install -e '.[clip]'")
pytest.importorskip("pycocoevalcap", reason="pip install -e '.[eval]'")
transformers = pytest.importorskip("transformers")

from open_flamingo.src.flamingo import Flamingo as TheirFlamingo  # noqa: E402
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

VISION_WIDTH, IMAGE = 48, 32


def image_transform(image) -> torch.Tensor:
    """PIL -> (3, 32, 32) float, centred: the same for both sides."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE, IMAGE)), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.25  # (c, H, W)


def build_models(tokenizer):
    """(their OpenFlamingo model with open gates, our Flamingo with the same weights)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    vision = open_clip.CLIPVisionCfg(layers=1, width=VISION_WIDTH, head_width=16, image_size=IMAGE, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()
    plain_lm, plain_clip = copy.deepcopy(lm), copy.deepcopy(clip)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    clip.visual.output_tokens = True
    media, end_of_chunk = tokenizer.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    theirs = TheirFlamingo(clip, lm, end_of_chunk, media, vis_dim=VISION_WIDTH, cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in lm.gated_cross_attn_layers:
            block.attn_gate.uniform_(0.5, 1.0)
            block.ff_gate.uniform_(0.5, 1.0)
    lm.generation_config.suppress_tokens = [media]
    mixin_forward = type(lm).forward

    def forward(self, input_ids, attention_mask=None, **kwargs):  # transformers 5 drops an all-ones mask
        return mixin_forward(self, input_ids, attention_mask, **kwargs)

    type(lm).forward = forward  # (extend_instance made this class for this one model)
    ours = load_openflamingo(theirs.state_dict(), plain_lm, media_token_id=media, vision_encoder=plain_clip)
    return theirs.eval(), ours.eval()


class TheirEvalModel:
    """What OpenFlamingo's ``EvalModel`` does (batching, generation, rank classification without
    cache, prompts) around an already-built model; records every call."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.device, self.lm_name = model, tokenizer, "cpu", "tiny"
        self.calls, self.outputs = [], []

    def _prepare_images(self, batch):
        count, out = max(len(row) for row in batch), None
        for i, row in enumerate(batch):
            for j, image in enumerate(row):
                pixels = image_transform(image)
                if out is None:
                    out = torch.zeros((len(batch), count, 1, *pixels.shape))
                out[i, j, 0] = pixels
        return out

    def _prepare_text(self, batch):
        encoded = self.tokenizer(batch, padding="longest", truncation=True, return_tensors="pt", max_length=2000)
        return encoded["input_ids"], encoded["attention_mask"].bool()

    def record(self, batch_text, batch_images):
        self.calls.append((list(batch_text), [[image.filename for image in row] for row in batch_images]))

    def get_outputs(
        self, batch_text, batch_images, min_generation_length, max_generation_length, num_beams, length_penalty
    ):
        self.record(batch_text, batch_images)
        images, (input_ids, attention_mask) = self._prepare_images(batch_images), self._prepare_text(batch_text)
        with torch.inference_mode():
            out = self.model.generate(
                images, input_ids, attention_mask, min_new_tokens=min_generation_length,
                max_new_tokens=max_generation_length, num_beams=num_beams, length_penalty=length_penalty,
            )  # fmt: skip
        decoded = self.tokenizer.batch_decode(out[:, len(input_ids[0]) :], skip_special_tokens=True)
        self.outputs += decoded
        return decoded

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        assert not use_cache  # their cached path reuses one transformers cache across classes
        self.record(batch_text, batch_images)
        images, (ids, mask) = self._prepare_images(batch_images), self._prepare_text(batch_text)
        scores = []
        for name in all_class_names:
            tokens = self.tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"]
            tokens = repeat(tokens, "b s -> (r b) s", r=len(batch_text))
            with torch.inference_mode():
                logits = self.model(
                    vision_x=images, lang_x=torch.cat([ids, tokens], 1),
                    attention_mask=torch.cat([mask, torch.ones_like(tokens).bool()], 1), clear_conditioned_layers=True,
                ).logits  # fmt: skip
            log_probs = torch.log_softmax(logits, dim=-1)[:, -tokens.shape[1] - 1 : -1]
            token_scores = torch.gather(log_probs, 2, tokens[:, :, None]).squeeze(-1)
            scores.append(token_scores.mean(dim=1) if normalize_length else token_scores.sum(dim=1))
        self.outputs.append(torch.vstack(scores).T.cpu())
        return self.outputs[-1]

    def get_caption_prompt(self, caption=None):
        return (
            f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"
        )

    def get_vqa_prompt(self, question, answer=None):
        end = "<|endofchunk|>" if answer is not None else ""
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{end}"

    def get_hateful_memes_prompt(self, text, label=None):
        end = "<|endofchunk|>" if label is not None else ""
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label or ''}{end}"


class RecordingEvalModel(EvalModel):
    """Our EvalModel, recording each batch's prompts and image paths."""

    calls: list
    outputs: list

    def generate(self, texts, batch_images, **kwargs):
        self.calls.append((list(texts), [list(row) for row in batch_images]))
        self.outputs += super().generate(texts, batch_images, **kwargs)
        return self.outputs[len(self.outputs) - len(texts) :]

    def class_log_likelihoods(self, texts, batch_images, class_names):
        self.calls.append((list(texts), [list(row) for row in batch_images]))
        self.outputs.append(super().class_log_likelihoods(texts, batch_images, class_names))
        return self.outputs[-1]


def load_their_evaluate():
    """OpenFlamingo's evaluate.py as a module (it imports its siblings by bare name)."""
    import open_flamingo

    directory = os.path.join(os.path.dirname(open_flamingo.__file__), "eval")
    saved = {name: sys.modules.get(name) for name in ("utils", "ok_vqa_utils")}
    stub = types.ModuleType("ok_vqa_utils")  # needs nltk data (downloads); OK-VQA is not compared here
    stub.postprocess_ok_vqa_generation = None
    sys.modules["ok_vqa_utils"] = stub
    sys.path.insert(0, directory)
    try:
        spec = importlib.util.spec_from_file_location("openflamingo_evaluate", os.path.join(directory, "evaluate.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(directory)
        for name, sibling in list(sys.modules.items()):  # its siblings, imported under bare names
            if "." not in name and os.path.dirname(getattr(sibling, "__file__", None) or "") == directory:
                del sys.modules[name]
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


@pytest.fixture(scope="module")
def their_evaluate(tmp_path_factory):
    module = load_their_evaluate()
    if not torch.distributed.is_initialized():
        store = tmp_path_factory.mktemp("process_group") / "store"  # a file, not a port
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield module
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    paths = {**write_captions(root, "coco", 16, 8), **write_hateful_memes(root, 16, 8)}
    for split, count, seed in (("train", 16, 2), ("test", 8, 3)):
        paths.update(write_vqa_split(root, "vqav2", split, count, seed))
    tokenizer = fixture_tokenizer()
    theirs, ours = build_models(tokenizer)
    return paths, tokenizer, theirs, ours


@pytest.fixture
def both(setup, monkeypatch, tmp_path):
    import pycocoevalcap.eval as coco_eval

    class Stub:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "stub"

    monkeypatch.setattr(coco_eval, "Spice", Stub)
    monkeypatch.setattr(coco_eval, "Meteor", Stub)
    monkeypatch.chdir(tmp_path)  # their results files land in the working directory
    paths, tokenizer, theirs, ours = setup
    their_model = TheirEvalModel(theirs, tokenizer)
    our_model = RecordingEvalModel(ours, copy.deepcopy(tokenizer), image_transform)
    our_model.calls, our_model.outputs = [], []
    return paths, their_model, our_model


def args_for(paths, **overrides) -> Namespace:
    root = paths.get("coco_image_root", "")
    overrides = {"num_samples": 5, "rices": False, "batch_size": 3, "query_set_size": 12, **overrides}
    return Namespace(
        model="open_flamingo", rank=0, world_size=1,
        coco_train_image_dir_path=os.path.join(root, "train2014"),
        coco_val_image_dir_path=os.path.join(root, "val2014"),
        coco_karpathy_json_path=paths.get("coco_karpathy_json"),
        coco_annotations_json_path=paths.get("coco_annotations_json"),
        vqav2_train_image_dir_path=paths.get("vqav2_train_image_dir"),
        vqav2_test_image_dir_path=paths.get("vqav2_test_image_dir"),
        vqav2_train_questions_json_path=paths.get("vqav2_train_questions_json"),
        vqav2_train_annotations_json_path=paths.get("vqav2_train_annotations_json"),
        vqav2_test_questions_json_path=paths.get("vqav2_test_questions_json"),
        vqav2_test_annotations_json_path=paths.get("vqav2_test_annotations_json"),
        hateful_memes_image_dir_path=paths.get("hateful_memes_image_dir"),
        hateful_memes_train_annotations_json_path=paths.get("hateful_memes_train_jsonl"),
        hateful_memes_test_annotations_json_path=paths.get("hateful_memes_test_jsonl"),
        **overrides,
    )  # fmt: skip


def assert_same_batches(their_model, our_model):
    assert len(their_model.calls) == len(our_model.calls) > 0
    for (their_texts, their_images), (our_texts, our_images) in zip(their_model.calls, our_model.calls):
        assert our_texts == their_texts
        assert torch.equal(our_model.prepare_text(our_texts)[0], their_model._prepare_text(their_texts)[0])
        assert our_images == their_images


@pytest.mark.slow
@pytest.mark.parametrize(("shots", "seed"), [(0, 42), (4, 7)])
def test_captioning_equals_openflamingos(their_evaluate, both, shots, seed):
    paths, their_model, our_model = both
    args = args_for(paths)
    their_score = their_evaluate.evaluate_captioning(args, their_model, seed=seed, num_shots=shots, dataset_name="coco")
    data = caption_data(paths["coco_karpathy_json"], paths["coco_image_root"], "coco", paths["coco_annotations_json"])
    our_score, predictions = tasks.evaluate_captioning(
        our_model, data.train, data.test, data.references, num_shots=shots, seed=seed, num_samples=5,
        query_set_size=12, batch_size=3,
    )  # fmt: skip
    assert_same_batches(their_model, our_model)
    assert our_model.outputs == their_model.outputs  # the raw generations, before cleaning
    assert len(predictions) == 5 and len(set(our_model.outputs)) > 1
    assert abs(our_score - their_score) <= 1e-9


@pytest.mark.parametrize(
    ("shots", "seed", "beams"),
    [(0, 2, 1), pytest.param(0, 1, 3, marks=pytest.mark.slow), pytest.param(4, 42, 3, marks=pytest.mark.slow)],
)
def test_vqa_equals_openflamingos(their_evaluate, both, shots, seed, beams, capsys):
    """Generated answers compared token for token. A random tiny model's next-token logits lie
    close together, so the quick case decodes greedily with a seed whose smallest top-1/top-2 logit
    gap over all steps is 4e-3, far above the float32 difference between the two implementations'
    logits (~1e-6): no token can flip on another machine. Beam search (OpenFlamingo's 3 beams,
    more near-ties) runs in the slow cases."""
    paths, their_model, our_model = both
    args = args_for(paths)
    their_score = their_evaluate.evaluate_vqa(
        args, their_model, seed=seed, num_shots=shots, dataset_name="vqav2", num_beams=beams
    )
    data = vqa_data({key[len("vqav2_") :]: value for key, value in paths.items() if key.startswith("vqav2_")}, "vqav2")
    our_score, predictions = tasks.evaluate_vqa(
        our_model, data.train, data.test, data.annotations, num_shots=shots, seed=seed, num_samples=5,
        query_set_size=12, batch_size=3, num_beams=beams,
    )  # fmt: skip
    assert_same_batches(their_model, our_model)
    assert our_model.outputs == their_model.outputs
    assert len(predictions) == 5 and len(set(our_model.outputs)) > 1
    assert abs(our_score - their_score) <= 1e-9
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize(("shots", "seed"), [(4, 3), (8, 42)])
def test_hateful_memes_equals_openflamingos(their_evaluate, both, shots, seed):
    """Rank classification: our prompt runs once per batch (cached), theirs once per class; the
    class scores agree to float32 rounding: log-softmax of logits of order 1 over 400 tokens,
    summed through two tiny layers, ~1e-6; 1e-4 leaves room, and the ROC AUC is equal."""
    paths, their_model, our_model = both
    args = args_for(paths, num_samples=8)
    their_score = their_evaluate.evaluate_classification(
        args, their_model, seed=seed, num_shots=shots, dataset_name="hateful_memes", no_kv_caching=True
    )
    data = hateful_memes_data(
        paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
    )
    our_score, predictions = tasks.evaluate_classification(
        our_model, data.train, data.test, data.class_names, num_shots=shots, seed=seed, num_samples=8,
        query_set_size=12, batch_size=3, hateful_memes=True,
    )  # fmt: skip
    assert_same_batches(their_model, our_model)
    for ours, theirs in zip(our_model.outputs, their_model.outputs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert len(predictions) == 8 and 0 < sum(p["gt_label"] == "yes" for p in predictions) < 8
    assert abs(our_score - their_score) <= 1e-9


@pytest.mark.parametrize(("shots", "seed", "samples"), [(2, 5, 4), pytest.param(3, 5, 8, marks=pytest.mark.slow)])
def test_hateful_memes_prompt_ensembling_equals_openflamingos(their_evaluate, both, shots, seed, samples):
    """``--classification_prompt_ensembling``: min(6, shots!) passes per batch (2 in the quick case,
    6 in the slow one), each after shuffling every query's demonstrations again (in place, so the
    shuffles accumulate). The same prompts pass for pass (so the shuffles
    draw as OpenFlamingo's global ``random`` does), per-pass class scores within 1e-4 (as above),
    the averaged probabilities within 1e-4 (a softmax probability moves at most 1/4 of the score
    difference's error, itself within 2e-4), and the same ROC AUC."""
    paths, their_model, our_model = both
    args = args_for(paths, num_samples=samples)
    their_score = their_evaluate.evaluate_classification(
        args, their_model, seed=seed, num_shots=shots, dataset_name="hateful_memes", no_kv_caching=True,
        use_prompt_ensembling=True,
    )  # fmt: skip
    data = hateful_memes_data(
        paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
    )
    our_score, predictions = tasks.evaluate_classification(
        our_model, data.train, data.test, data.class_names, num_shots=shots, seed=seed, num_samples=samples,
        query_set_size=12, batch_size=3, hateful_memes=True, prompt_ensembling=True,
    )  # fmt: skip
    passes, calls = min(6, math.factorial(shots)), math.ceil(samples / 3) * min(6, math.factorial(shots))
    assert len(our_model.calls) == calls  # batches of 3, each scored once per pass
    assert_same_batches(their_model, our_model)
    first_query_orders = {tuple(images[0]) for _, images in our_model.calls[:passes]}
    assert len(first_query_orders) > 1  # the passes do shuffle the demonstrations
    for ours, theirs in zip(our_model.outputs, their_model.outputs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    outputs = their_model.outputs
    averaged = [torch.stack(outputs[i : i + passes], dim=-1).mean(dim=-1) for i in range(0, calls, passes)]
    probabilities = torch.softmax(torch.cat(averaged), dim=1).max(dim=1).values  # (samples,)
    expected = torch.tensor([p["pred_score"] for p in predictions], dtype=probabilities.dtype)
    torch.testing.assert_close(expected, probabilities, atol=1e-4, rtol=0)
    assert 0 < sum(p["gt_label"] == "yes" for p in predictions) < samples
    assert abs(our_score - their_score) <= 1e-9


@pytest.mark.slow
def test_zero_shot_classification_differs_from_openflamingo_only_in_its_images(their_evaluate, both):
    """OpenFlamingo's ``evaluate_classification`` passes the two text-only demonstrations' images at
    0 shots (it tests ``effective_num_shots > 0``), so its query's ``<image>`` reads the first
    demonstration's image. Ours passes the query's image alone: the same text, one image."""
    paths, their_model, our_model = both
    their_evaluate.evaluate_classification(
        args_for(paths, num_samples=3),
        their_model,
        seed=0,
        num_shots=0,
        dataset_name="hateful_memes",
        no_kv_caching=True,
    )
    data = hateful_memes_data(
        paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
    )
    tasks.evaluate_classification(
        our_model, data.train, data.test, data.class_names, num_shots=0, seed=0, num_samples=3,
        query_set_size=12, batch_size=3, hateful_memes=True,
    )  # fmt: skip
    (their_texts, their_images), (our_texts, our_images) = their_model.calls[0], our_model.calls[0]
    assert our_texts == their_texts and all(text.count("<image>") == 1 for text in our_texts)
    assert [row[-1:] for row in their_images] == our_images and all(len(row) == 3 for row in their_images)


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 4])
def test_rices_demonstrations_equal_openflamingos(their_evaluate, both, monkeypatch, shots):
    """RICES over the same CLIP (a tiny random one, pooled embeddings): the same demonstrations,
    most similar last, and so the same prompts, generations and CIDEr."""
    paths, their_model, our_model = both
    torch.manual_seed(1)
    vision = open_clip.CLIPVisionCfg(layers=1, width=VISION_WIDTH, head_width=16, image_size=IMAGE, patch_size=8)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=32, width=16, heads=2, layers=1)
    clip = open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *args, **kwargs: (clip, None, image_transform))
    args = args_for(paths, rices=True, rices_vision_encoder_path="tiny", rices_vision_encoder_pretrained="none")
    their_score = their_evaluate.evaluate_captioning(args, their_model, seed=3, num_shots=shots, dataset_name="coco")

    def features(images):
        return clip.encode_image(torch.stack([image_transform(as_image(image)) for image in images]))

    data = caption_data(paths["coco_karpathy_json"], paths["coco_image_root"], "coco", paths["coco_annotations_json"])
    rices = RicesDemonstrations(data.train, features, batch_size=3)
    our_score, _ = tasks.evaluate_captioning(
        our_model, data.train, data.test, data.references, num_shots=shots, seed=3, num_samples=5,
        batch_size=3, demonstrations=rices,
    )  # fmt: skip
    assert_same_batches(their_model, our_model)
    assert our_model.outputs == their_model.outputs
    assert abs(our_score - their_score) <= 1e-9
