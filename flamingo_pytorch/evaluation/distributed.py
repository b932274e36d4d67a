"""Evaluating on several processes (``torchrun``) with the single-process run's draws and results.

A trial's test examples are visited in batches (``demonstrations.evaluation_order``), and each
batch's demonstrations are drawn from generators that run query after query across the whole
trial. So every rank walks through every batch, drawing every batch's demonstrations exactly as a
single process would, but runs the model only on its own batches (batch ``k`` on rank
``k % world_size``); the batches keep the single-process composition, hence the same padding and
the same model outputs. The ranks' outputs are then gathered (``all_gather_object``) and rank 0
replays the trial with them, which scores it with the unchanged single-process code.

(OpenFlamingo's own multi-GPU evaluation gives each rank a ``DistributedSampler`` shard and seeds
each rank's demonstration draws with ``seed + rank``, so its draws change with the number of GPUs;
here they do not.)
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from flamingo_pytorch.evaluation.demonstrations import evaluation_order


def environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without them."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def init_process_group() -> tuple[int, int]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1 -> (rank, world).

    On CUDA each process takes ``cuda:LOCAL_RANK``."""
    rank, world, local_rank = environment()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend)
    return rank, world


def default_device() -> str | None:
    """``cuda:LOCAL_RANK`` under torchrun on a CUDA machine, else None (leave the model where it is)."""
    _, world, local_rank = environment()
    return f"cuda:{local_rank}" if world > 1 and torch.cuda.is_available() else None


def number_of_batches(num_test: int, num_samples: int, seed: int, batch_size: int) -> int:
    """How many model calls a trial makes (the evaluated examples, ``batch_size`` at a time)."""
    return math.ceil(len(evaluation_order(num_test, num_samples, seed)[0]) / batch_size)


def rank_zero_first(build, rank: int, world: int, *, wait: bool = True):
    """``build()`` on rank 0, then (``wait``) on the other ranks once rank 0 is done: what rank 0
    writes (a RICES feature cache) is then read by the others instead of written by all at once."""
    if world > 1 and wait and rank != 0:
        torch.distributed.barrier()
    built = build()
    if world > 1 and wait and rank == 0:
        torch.distributed.barrier()
    return built


class TrialDone(Exception):
    """Raised by ``ShardedModel`` after a trial's last batch: the rank's share is done, no scoring."""


class ShardedModel:
    """Runs the model on this rank's batches only (``k % world == rank``); records their outputs.

    Other batches get placeholder outputs that nothing reads: after the trial's last batch the
    model raises ``TrialDone``, so the trial stops before scoring. Other attributes are the model's.
    """

    def __init__(self, model, rank: int, world: int, num_batches: int):
        self.model, self.rank, self.world, self.num_batches = model, rank, world, num_batches
        self.calls, self.outputs = 0, {}  # batch index -> (prompts, outputs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def step(self, method: str, texts, images, *args, **kwargs):
        index, self.calls = self.calls, self.calls + 1
        if index % self.world == self.rank:
            self.outputs[index] = (list(texts), getattr(self.model, method)(texts, images, *args, **kwargs))
        if self.calls == self.num_batches:
            raise TrialDone
        if method == "generate":
            return [""] * len(texts)
        return torch.zeros(len(texts), len(args[0] if args else kwargs["class_names"]))  # (b, C)

    def generate(self, texts, images, **kwargs):
        return self.step("generate", texts, images, **kwargs)

    def class_log_likelihoods(self, texts, images, class_names):
        return self.step("class_log_likelihoods", texts, images, class_names)


class ReplayModel:
    """Answers a trial's batches, in order, with outputs computed before (checking the prompts match)."""

    def __init__(self, model, outputs: dict):
        self.model, self.outputs, self.calls = model, outputs, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def replay(self, texts):
        prompts, outputs = self.outputs[self.calls]
        if list(texts) != prompts:
            raise RuntimeError(f"batch {self.calls}: the ranks built different prompts (different data or seeds?)")
        self.calls += 1
        return outputs

    def generate(self, texts, images, **kwargs):
        return self.replay(texts)

    def class_log_likelihoods(self, texts, images, class_names):
        return self.replay(texts)


def gather_outputs(outputs: dict, world: int) -> dict:
    """Every rank's {batch index: (prompts, outputs)} merged, on every rank (CPU tensors)."""
    local = {k: (p, o.cpu() if isinstance(o, torch.Tensor) else o) for k, (p, o) in outputs.items()}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    return {index: value for part in gathered for index, value in part.items()}


def run_sharded(trial, model, rank: int, world: int, num_batches: int):
    """Run ``trial(model)`` (one trial: returns (score, predictions)) split over the ranks.

    -> the trial's (score, predictions) on rank 0, None on the other ranks."""
    sharded = ShardedModel(model, rank, world, num_batches)
    with contextlib.suppress(TrialDone):  # this rank's batches are done
        trial(sharded)
    outputs = gather_outputs(sharded.outputs, world)
    if rank != 0:
        return None
    return trial(ReplayModel(model, outputs))
