"""The command line of ``python -m flamingo_pytorch.evaluate``: which model, which data, which shots.

The model comes from a Python file (``--model_script``) whose ``load_model()`` returns
``(model, tokenizer, image_transform)``: a ``Flamingo`` or ``FlamingoPaLM`` with its weights (e.g.
from ``load_openflamingo`` or ``load_trained``), a transformers tokenizer knowing ``<image>`` and
``<|endofchunk|>``, and a PIL -> tensor transform. ``--tiny`` instead builds a random tiny model,
and ``--fixtures DIR`` writes the small generated datasets and evaluates on all of them: a trial
of the whole pipeline in a minute on a CPU.

Under ``torchrun --nproc_per_node=N -m flamingo_pytorch.evaluate ...`` the N processes share the
work (``distributed``): each holds the model (on ``cuda:LOCAL_RANK`` on a GPU machine), rank 0
writes the outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from flamingo_pytorch.evaluation import distributed, runner
from flamingo_pytorch.evaluation.datasets import VQA_SETS
from flamingo_pytorch.evaluation.models import WITHHOLD, EvalModel
from flamingo_pytorch.evaluation.prompts import END_OF_CHUNK, PromptTemplate

VQA_FILES = ("train_questions_json", "train_annotations_json", "train_image_dir", "test_questions_json")
VQA_FILES += ("test_annotations_json", "test_image_dir")


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m flamingo_pytorch.evaluate", description=__doc__.split("\n\n")[0])
    model = parse.add_mutually_exclusive_group(required=True)
    model.add_argument("--model_script", help="a .py file whose load_model() returns (model, tokenizer, transform)")
    model.add_argument("--tiny", action="store_true", help="a random tiny FlamingoPaLM (to try the pipeline)")
    parse.add_argument("--output_dir", default="evaluation_results")
    parse.add_argument("--shots", nargs="+", type=int, default=[0, 4, 8, 16, 32])
    parse.add_argument("--trial_seeds", nargs="+", type=int, default=[42])
    parse.add_argument("--num_samples", type=int, default=-1, help="test examples per trial (-1: all)")
    parse.add_argument("--query_set_size", type=int, default=2048)
    parse.add_argument("--batch_size", type=int, default=8)
    parse.add_argument("--num_beams", type=int, default=3)
    parse.add_argument("--rices", action="store_true", help="demonstrations by RICES instead of at random")
    parse.add_argument(
        "--class_balanced", action="store_true", help="classification: K demonstrations per class (shots = K x classes)"
    )
    parse.add_argument(
        "--classification_prompt_ensembling", action="store_true",
        help="classification: average the class scores over min(6, shots!) shuffles of the demonstrations",
    )  # fmt: skip
    parse.add_argument("--rices_cache_dir", help="where RICES keeps the training images' features")
    parse.add_argument("--device", default=None)
    parse.add_argument("--fixtures", help="write the generated fixture datasets here and evaluate on all of them")
    parse.add_argument(
        "--prompt_templates",
        help='a JSON file {task: {"demonstration": ..., "query": ...}}: prompt formats instead of OpenFlamingo\'s',
    )
    parse.add_argument("--end_of_chunk", default=END_OF_CHUNK, help="the token that ends an answer (generation stops)")
    parse.add_argument(
        "--withhold_images", choices=WITHHOLD, help="control: zero images (blank) or none at all, prompts unchanged"
    )
    for name in ("coco", "flickr30"):
        for what in ("karpathy_json", "image_root", "annotations_json"):
            parse.add_argument(f"--{name}_{what}")
    for name in VQA_SETS:
        for what in VQA_FILES:
            parse.add_argument(f"--{name}_{what}")
    for what in ("train_jsonl", "test_jsonl", "image_dir"):
        parse.add_argument(f"--hateful_memes_{what}")
    parse.add_argument("--imagenet_root", help="a folder with train/ and val/ class folders")
    parse.add_argument("--imagenet_class_names", help="a text file: the class folders' readable names, one a line")
    parse.add_argument("--imagenet_train_list", help='instead of folders: a JSON list [{"image", "class_name"}]')
    parse.add_argument("--imagenet_test_list", help="the test examples, in the same format")
    return parse


def fixture_arguments(paths: dict) -> dict:
    """The fixtures' paths under the command's argument names."""
    renamed = {key.replace("flickr_", "flickr30_"): value for key, value in paths.items()}
    return {key.replace("_karpathy_json", "_karpathy_json"): value for key, value in renamed.items()}


def task_data(args: dict) -> dict[str, runner.TaskData]:
    """Each task whose files were given -> its TaskData."""
    data = {}
    for name, dataset in (("coco", "coco"), ("flickr30", "flickr")):
        if args.get(f"{name}_karpathy_json"):
            data[name] = runner.caption_data(
                args[f"{name}_karpathy_json"], args[f"{name}_image_root"], dataset, args.get(f"{name}_annotations_json")
            )
    for name in VQA_SETS:
        if args.get(f"{name}_test_questions_json"):
            data[name] = runner.vqa_data({what: args.get(f"{name}_{what}") for what in VQA_FILES}, name)
    if args.get("imagenet_root"):
        names = None
        if args.get("imagenet_class_names"):
            names = Path(args["imagenet_class_names"]).read_text(encoding="utf-8").splitlines()
        data["imagenet"] = runner.image_folder_data(args["imagenet_root"], names)
    if args.get("imagenet_test_list"):
        data["imagenet"] = runner.image_list_data(args["imagenet_train_list"], args["imagenet_test_list"])
    if args.get("hateful_memes_test_jsonl"):
        data["hateful_memes"] = runner.hateful_memes_data(
            args["hateful_memes_train_jsonl"], args["hateful_memes_test_jsonl"], args["hateful_memes_image_dir"]
        )
    return data


def load_model(args: argparse.Namespace) -> EvalModel:
    if args.tiny:
        from flamingo_pytorch.evaluation.fixtures import tiny_model

        model, tokenizer, transform = tiny_model()
    else:
        spec = importlib.util.spec_from_file_location("flamingo_eval_model_script", args.model_script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model, tokenizer, transform = module.load_model()
    device = args.device or distributed.default_device()
    if device is not None:
        model = model.to(device)
    return EvalModel(model, tokenizer, transform, end_of_chunk=args.end_of_chunk, withhold_images=args.withhold_images)


def read_prompt_templates(path: str | None) -> dict[str, PromptTemplate] | None:
    """``--prompt_templates``'s file -> {task: PromptTemplate}."""
    if path is None:
        return None
    return {task: PromptTemplate(**fields) for task, fields in json.loads(Path(path).read_text("utf-8")).items()}


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    started = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    rank, world = distributed.init_process_group()
    given = vars(args)
    if args.fixtures:
        from flamingo_pytorch.evaluation.fixtures import write_fixtures

        paths = [write_fixtures(args.fixtures) if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(paths, src=0)  # the others wait for rank 0's files
        given = {**given, **fixture_arguments(paths[0])}
    data = task_data(given)
    if not data:
        raise SystemExit("no task to evaluate: give a dataset's files (see --help) or --fixtures DIR")
    results = runner.run(
        load_model(args), data, args.output_dir, shots=args.shots, seeds=args.trial_seeds,
        num_samples=args.num_samples, query_set_size=args.query_set_size, batch_size=args.batch_size,
        num_beams=args.num_beams, rices=args.rices, rices_cache_dir=args.rices_cache_dir,
        prompt_templates=read_prompt_templates(args.prompt_templates), class_balanced=args.class_balanced,
        prompt_ensembling=args.classification_prompt_ensembling,
    )  # fmt: skip
    if world > 1 and started:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print((Path(args.output_dir) / "results.md").read_text(encoding="utf-8"))
        print(json.dumps({"results": str(Path(args.output_dir) / "results.json")}))
    return results
