"""The harness on several processes: the same demonstrations, predictions and results as one process.

The quick test splits a trial over two simulated ranks with a model whose answers depend on the
whole prompt (so a batch run with other demonstrations, or in another place, would answer
differently) and merges the ranks' outputs as ``all_gather_object`` would. The slow one runs
``python -m flamingo_pytorch.evaluate --tiny --fixtures`` on 2 gloo processes and compares every
file written with a single process's.
"""

from __future__ import annotations

import json
import os
import socket
import zlib
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flamingo_pytorch.evaluation import distributed, runner
from flamingo_pytorch.evaluation.fixtures import write_hateful_memes, write_vqa_split

ARGS = ["--tiny", "--shots", "0", "2", "--num_samples", "5", "--batch_size", "2", "--num_beams", "1"]
ARGS += ["--trial_seeds", "1", "2"]


class PromptHashModel:
    """Answers that are a checksum of each prompt; counts the prompts it was asked."""

    def __init__(self):
        self.asked = 0

    def generate(self, texts, images, **kwargs):
        self.asked += len(texts)
        return [f"answer {zlib.crc32(text.encode()) % 97}" for text in texts]

    def class_log_likelihoods(self, texts, images, class_names):
        self.asked += len(texts)
        codes = torch.tensor([zlib.crc32(text.encode()) for text in texts], dtype=torch.float64)  # (b,)
        return torch.sin(codes[:, None] + torch.arange(len(class_names)))  # (b, C)


def sharded_trial(trial, world: int, calls: int) -> tuple[tuple, list[int]]:
    """``distributed.run_sharded`` with the gather done in memory: (rank 0's outcome, prompts per rank)."""
    ranks = [distributed.ShardedModel(PromptHashModel(), rank, world, num_batches=calls) for rank in range(world)]
    for sharded in ranks:
        with pytest.raises(distributed.TrialDone):
            trial(sharded)
    merged = {index: value for sharded in ranks for index, value in sharded.outputs.items()}
    return trial(distributed.ReplayModel(PromptHashModel(), merged)), [sharded.model.asked for sharded in ranks]


@pytest.mark.parametrize(("task", "ensembling"), [("vqav2", False), ("hateful_memes", False), ("hateful_memes", True)])
def test_a_trial_split_over_ranks_equals_the_single_process_trial(tmp_path, task, ensembling):
    """With prompt ensembling (2 shots: 2 passes per batch, the demonstrations shuffled before each),
    every rank draws every pass's shuffles, and the ranks share the 6 model calls."""
    if task == "vqav2":
        files = write_vqa_split(tmp_path, task, "train", 12, seed=2)
        files.update(write_vqa_split(tmp_path, task, "test", 6, seed=3))
        data = runner.vqa_data({key.removeprefix("vqav2_"): path for key, path in files.items()}, task)
    else:
        files = write_hateful_memes(tmp_path, train=12, test=6)
        names = ("train_jsonl", "test_jsonl", "image_dir")
        data = runner.hateful_memes_data(*(files[f"hateful_memes_{name}"] for name in names))
    settings = dict(num_samples=5, query_set_size=8, batch_size=2, progress=False)
    settings.update({"prompt_ensembling": True} if ensembling else {})
    trial = dict(task=task, data=data, shots=2, seed=7, settings=settings, demonstrations=None, class_balanced=False)
    assert distributed.number_of_batches(len(data.test), 5, 7, 2) == 3  # 5 examples, 2 at a time
    calls = runner.model_calls(data, 2, 7, settings)
    assert calls == (6 if ensembling else 3)
    expected = runner.fresh_trial(PromptHashModel(), **trial)

    def run(model):
        return runner.fresh_trial(model, **trial)

    outcome, asked = sharded_trial(run, world=2, calls=calls)
    assert outcome == expected  # same score, same predictions in the same order
    # once per batch: batches 0 and 2 (2 + 1 examples) on rank 0, batch 1 on rank 1; with 2 passes per
    # batch the 6 calls (2, 2, 2, 2, 1, 1 examples) alternate between the ranks
    assert asked == ([5, 5] if ensembling else [3, 2])


def test_replaying_outputs_for_other_prompts_is_refused():
    replay = distributed.ReplayModel(PromptHashModel(), {0: (["<image>Output:"], ["a caption"])})
    with pytest.raises(RuntimeError, match="different prompts"):
        replay.generate(["<image>Question:"], [[None]])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str, extra: list[str]) -> None:
    from flamingo_pytorch.evaluation.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extra = [argument.replace("{world}", str(world)) for argument in extra]
    results = main([*ARGS, *extra, "--fixtures", f"{root}/data", "--output_dir", f"{root}/out_{world}"])
    Path(root, f"returned_{world}_{rank}.json").write_text(json.dumps(results, indent=1))


def written(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("demonstrations", ["random", "rices", "random-ensembling"])
def test_two_gloo_processes_write_what_one_process_writes(tmp_path, demonstrations):
    """With RICES, both ranks share one feature cache: rank 0 writes it, rank 1 reads it. With
    classification prompt ensembling, the ranks share every pass of every batch."""
    pytest.importorskip("pycocoevalcap")
    pytest.importorskip("tqdm")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    extra = ["--rices", "--rices_cache_dir", f"{tmp_path}/rices_{{world}}"] if demonstrations == "rices" else []
    extra += ["--classification_prompt_ensembling"] if demonstrations == "random-ensembling" else []
    mp.spawn(worker, args=(1, free_port(), str(tmp_path), extra), nprocs=1)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), extra), nprocs=2)
    single, split = written(tmp_path / "out_1"), written(tmp_path / "out_2")
    assert len(single) == 2 + 2 * 2 * len(runner.TASKS)  # results.json, results.md, shots x seeds x tasks
    assert split == single  # results.json, results.md and every prediction file, byte for byte
    assert Path(tmp_path, "returned_2_1.json").read_text() == "{}"  # rank 1 returns nothing
    assert Path(tmp_path, "returned_2_0.json").read_text() == single["results.json"]
    if demonstrations == "rices":
        assert len(list(Path(tmp_path, "rices_2").glob("*.pt"))) == len(runner.TASKS)
