"""Distributed checkpoints of a Flamingo training run, and their export to one safetensors file.

``save_training_state`` writes, with ``torch.distributed.checkpoint`` (DCP), what a run needs to go
on exactly where it stopped: the trained parameters (not the frozen language model and encoder,
which the run rebuilds from their own checkpoints), the optimizer state, the learning-rate
schedule, the step and the data position. Each rank writes its own shards, in parallel.
``load_training_state`` reads them back into a freshly built (and sharded) model and optimizer.
Works the same for an FSDP2-sharded, a DDP (pass the model inside the DDP wrapper) or a
single-process model: parameters and optimizer state are keyed by the unsharded parameter names.

``export_trained`` gathers the trained parameters into one safetensors file that loads into a
single-process model (``load_trained``, or ``Flamingo.load_trained``): the keys are the model's
own state-dict keys (``perceiver_resampler...``, ``gated_cross_attn...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor


class TrainingState(Stateful):
    """Model (trained part), optimizer, schedule and progress, as one DCP ``Stateful``.

    Args:
        model: the model being trained (FSDP2-sharded or not; not a DDP wrapper but the model in it);
            its frozen parameters are left out.
        optimizer: the optimizer over ``model.flamingo_parameters()``.
        scheduler: the learning-rate scheduler, or None.
        progress: plain values to save with it (the step, the data position...), updated in place on
            load. DCP loads the keys the target asks for: to load, pass a dict with the same keys
            (any values, e.g. the defaults of a fresh run). DCP keeps one value per key across ranks:
            give a value that differs between ranks (a data position) a key of its own per rank.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        progress: dict[str, Any] | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.progress = {} if progress is None else progress

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": trained_parameters(self.model),  # DTensor shards under FSDP2: each rank saves its own
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "progress": dict(self.progress),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # DCP has already loaded the parameters in place, into the tensors ``state_dict`` returned.
        set_optimizer_state_dict(self.model, self.optimizer, state_dict["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        self.progress.clear()
        self.progress.update(state_dict["progress"])


def trained_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, by name (``named_parameters``); sharded ones stay sharded.

    (Not ``get_model_state_dict``: the fusion layers of ``Flamingo`` rename the language model's
    state-dict keys, while the trained parameters' names are the same in both.)
    """
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(path: str | Path, state: TrainingState) -> None:
    """Write ``state`` to the folder ``path`` (every rank calls this; each writes its shards)."""
    dcp.save({"train": state}, checkpoint_id=str(path))


def load_training_state(path: str | Path, state: TrainingState) -> None:
    """Read the folder ``path`` into ``state``'s model, optimizer, scheduler and progress (every rank calls this).

    Build the model, shard it and create the optimizer as for the saved run first.
    """
    if not Path(path, ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata file)")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [key for key in trained_parameters(state.model) if f"train.model.{key}" not in saved]
    if missing:
        raise ValueError(f"{path} lacks trained parameters of this model: {missing[:5]}")
    # Optimizer state may be missing for parameters that never had a gradient (e.g. the video frame
    # embeddings in an image-only run): the fresh optimizer's zero state stands for them.
    dcp.load({"train": state}, checkpoint_id=str(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))


def gather_trained(model: nn.Module, *, rank0_only: bool = False) -> dict[str, Tensor]:
    """The whole (unsharded) trained parameters, detached, on CPU (every rank calls this: sharded
    parameters are all-gathered one at a time). With ``rank0_only`` the other ranks get an empty dict."""
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    gathered = {}
    for name, param in trained_parameters(model).items():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        if keep:
            gathered[name] = value.detach().cpu().clone()
    return gathered


def export_trained(model: nn.Module, path: str | Path) -> None:
    """Gather the trained parameters and write them, from rank 0, to one safetensors file (every rank calls this)."""
    try:
        from safetensors.torch import save_file
    except ModuleNotFoundError as error:
        raise ImportError('export_trained needs safetensors: pip install "flamingo-pytorch[examples]"') from error
    tensors = gather_trained(model, rank0_only=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    if dist.is_initialized():
        dist.barrier()


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Load ``export_trained``'s file into a single-process model built the same way.

    Raises:
        ValueError: the file's keys are not exactly the model's trained parameters, or a shape differs.
    """
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    trained = {id(p) for p in model.flamingo_parameters()}
    expected = {name: p for name, p in model.named_parameters() if id(p) in trained}
    missing, unexpected = sorted(expected.keys() - loaded.keys()), sorted(loaded.keys() - expected.keys())
    misshaped = sorted(k for k in loaded.keys() & expected.keys() if loaded[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}, mis-shaped {misshaped}")
    model.load_state_dict(loaded, strict=False)
