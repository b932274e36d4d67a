"""Evaluation throughput: our harness on our Flamingo against OpenFlamingo's evaluate.py on theirs.

The tiny OpenFlamingo model of tests/test_evaluation_parity.py (a random Llama, 2 layers of width
32, a tiny open_clip ViT) and the same weights converted with ``load_openflamingo``; the fixture
datasets; COCO captioning (beam search, 3 beams, up to 20 tokens) and HatefulMemes rank
classification (ours: the prompt once per batch from the cache; theirs: ``no_kv_caching``, the
prompt once per class, as its cached path misreads transformers 5 caches) at 0 and 32 shots.
Scoring (CIDEr's Java tokenizer, ROC AUC) is stubbed out on both sides: the time is the prompts,
the images and the model. Items/s = evaluated examples / wall seconds of one ``evaluate_*`` call,
the median over ``--rounds`` alternating rounds after one warm-up each.

    python benchmarks/evaluation.py [--rounds 3] [--num-samples 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models and OpenFlamingo's thin EvalModel stand-in

import test_evaluation_parity as parity  # noqa: E402

from flamingo_pytorch.evaluation import metrics, tasks  # noqa: E402
from flamingo_pytorch.evaluation.fixtures import (  # noqa: E402
    fixture_tokenizer,
    write_captions,
    write_hateful_memes,
)
from flamingo_pytorch.evaluation.runner import caption_data, hateful_memes_data  # noqa: E402


def stub_scores(their_evaluate) -> None:
    their_evaluate.compute_cider = lambda result_path, annotations_path: {"CIDEr": 0.0}
    their_evaluate.roc_auc_score = lambda labels, scores: 0.0
    metrics.cider = lambda predictions, references: 0.0
    metrics.roc_auc = lambda labels, scores: 0.0


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cases(paths, their_model, our_model, their_evaluate, num_samples: int, batch_size: int):
    """{(task, shots, impl): a zero-argument run}."""
    args = parity.args_for(paths, num_samples=num_samples, batch_size=batch_size, query_set_size=40)
    coco = caption_data(paths["coco_karpathy_json"], paths["coco_image_root"], "coco", paths["coco_annotations_json"])
    memes = hateful_memes_data(
        paths["hateful_memes_train_jsonl"], paths["hateful_memes_test_jsonl"], paths["hateful_memes_image_dir"]
    )
    common = dict(num_samples=num_samples, query_set_size=40, batch_size=batch_size, seed=42)
    runs = {}
    for shots in (0, 32):
        runs["coco", shots, "openflamingo"] = lambda s=shots: their_evaluate.evaluate_captioning(
            args, their_model, num_shots=s, seed=42, dataset_name="coco"
        )
        runs["coco", shots, "ours"] = lambda s=shots: tasks.evaluate_captioning(
            our_model, coco.train, coco.test, coco.references, num_shots=s, **common
        )
        runs["hateful_memes", shots, "openflamingo"] = lambda s=shots: their_evaluate.evaluate_classification(
            args, their_model, num_shots=s, seed=42, dataset_name="hateful_memes", no_kv_caching=True
        )
        runs["hateful_memes", shots, "ours"] = lambda s=shots: tasks.evaluate_classification(
            our_model, memes.train, memes.test, memes.class_names, num_shots=s, hateful_memes=True, **common
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "evaluation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    paths = {
        **write_captions(folder, "coco", 40, args.num_samples),
        **write_hateful_memes(folder, 40, args.num_samples),
    }
    tokenizer = fixture_tokenizer()
    theirs, ours = parity.build_models(tokenizer)
    their_evaluate = parity.load_their_evaluate()
    stub_scores(their_evaluate)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=0, world_size=1)
    their_model = parity.TheirEvalModel(theirs, tokenizer)
    our_model = parity.RecordingEvalModel(ours, tokenizer, parity.image_transform)
    our_model.calls, our_model.outputs = [], []
    runs = cases(paths, their_model, our_model, their_evaluate, args.num_samples, args.batch_size)
    seconds = {key: [] for key in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for key, run in runs.items():
            seconds[key].append(timed(run))
            their_model.calls, their_model.outputs, our_model.calls, our_model.outputs = [], [], [], []
    rows = []
    for task, shots in sorted({(task, shots) for task, shots, _ in runs}):
        theirs_s = statistics.median(seconds[task, shots, "openflamingo"])
        ours_s = statistics.median(seconds[task, shots, "ours"])
        rows.append(
            dict(task=task, shots=shots, openflamingo_items_per_s=args.num_samples / theirs_s,
                 ours_items_per_s=args.num_samples / ours_s, speedup=theirs_s / ours_s)
        )  # fmt: skip
    print("| task | shots | OpenFlamingo items/s | ours items/s | ours / theirs |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['task']} | {row['shots']} | {row['openflamingo_items_per_s']:.1f} | "
            f"{row['ours_items_per_s']:.1f} | {row['speedup']:.2f}x |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows, "seconds": [
        {"case": list(key), "seconds": value} for key, value in seconds.items()]}, indent=1))  # fmt: skip
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
