"""Distributed checkpoints of a Flamingo training run: saved whole or not at all, loaded safely or not at all.

``save_training_state`` writes, with ``torch.distributed.checkpoint`` (DCP), what a run needs to go
on exactly where it stopped: the trained parameters (not the frozen language model and encoder,
which the run rebuilds from their own checkpoints), the optimizer state, the learning-rate
schedule, the step and the data position. Each rank writes its own shards, in parallel, into the
sibling folder ``PATH.partial``; rank 0 renames it to ``PATH`` once every rank is done (an older
checkpoint at ``PATH`` is moved to ``PATH.old`` first and removed last), so a process killed at any
instant leaves a complete checkpoint at ``PATH`` or, between the two renames, at ``PATH.old``.

``load_training_state`` reads them back into a freshly built (and sharded) model and optimizer.
It trusts nothing in the folder: the ``.metadata`` file (a pickle, by DCP's design) is read by an
unpickler that builds only DCP's metadata classes, torch sizes, dtypes and paths, and every
non-tensor value (optimizer settings, schedule, progress) by ``torch.load(weights_only=True)``;
anything else is refused with a ``CheckpointError``. It checks the keys, shapes and data files
first, loads into copies, and changes the model, optimizer, scheduler and progress only once
everything has been read. Works the same for an FSDP2-sharded, a DDP (pass the model inside the DDP
wrapper) or a single-process model: parameters and optimizer state are keyed by parameter names.

``export_trained`` / ``load_trained`` write and read what trains as one safetensors file
(``flamingo_pytorch.trained_weights``, also behind ``Flamingo.save_trained`` / ``load_trained``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from flamingo_pytorch.trained_weights import gather_trained, load_trained
from flamingo_pytorch.trained_weights import save_trained as export_trained

__all__ = [
    "CheckpointError",
    "TrainingState",
    "export_trained",
    "gather_trained",
    "load_trained",
    "load_training_state",
    "save_training_state",
]


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded: an unsafe pickle, a missing or damaged file, another model."""


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
        """Take ``state_dict`` (loaded into copies by ``load_training_state``) into the model and the rest."""
        set_optimizer_state_dict(self.model, self.optimizer, state_dict["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        params = trained_parameters(self.model)
        with torch.no_grad():
            for name, value in state_dict["model"].items():
                if value is not params[name]:
                    params[name].copy_(value)
        self.progress.clear()
        self.progress.update(state_dict["progress"])


def trained_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, by name (``named_parameters``); sharded ones stay sharded.

    (Not ``get_model_state_dict``: the fusion layers of ``Flamingo`` rename the language model's
    state-dict keys, while the trained parameters' names are the same in both.)
    """
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(path: str | Path, state: TrainingState) -> None:
    """Write ``state`` to the folder ``path``, whole or not at all (every rank calls this; each writes its shards)."""
    path, distributed = Path(path), dist.is_initialized()
    partial, rank0 = sibling(path, "partial"), not distributed or dist.get_rank() == 0
    if rank0 and partial.exists():
        shutil.rmtree(partial)  # left by a save that was killed
    barrier()
    with single_process_is_meant():
        dcp.save({"train": state}, storage_writer=dcp.FileSystemWriter(partial), no_dist=not distributed)
    barrier()
    if rank0:
        publish(partial, path)
    barrier()


def publish(partial: Path, path: Path) -> None:
    """Rename the complete ``partial`` to ``path``. At every instant ``path``, or ``path.old`` between
    the two renames, is a complete checkpoint if one was there before."""
    old = sibling(path, "old")
    if is_complete(path):
        if old.exists():
            shutil.rmtree(old)  # an older copy of what path holds
        os.replace(path, old)
    elif path.exists():
        shutil.rmtree(path)  # not a checkpoint (an interrupted save of older code): old, if any, stays
    os.replace(partial, path)
    if old.exists():
        shutil.rmtree(old)


def load_training_state(path: str | Path, state: TrainingState) -> None:
    """Read the folder ``path`` into ``state``'s model, optimizer, scheduler and progress (every rank calls this).

    Build the model, shard it and create the optimizer as for the saved run first. If ``path`` is
    missing because a save over it was killed between its two renames, the previous checkpoint,
    ``path.old``, is read (with a warning).

    Raises:
        FileNotFoundError: neither ``path`` nor ``path.old`` is a complete checkpoint.
        CheckpointError: an unsafe pickle, a missing or truncated data file, a value that cannot be
            read (naming the file and the key), or a checkpoint of another model. The model,
            optimizer, scheduler and progress are then as they were.
    """
    found = complete_checkpoint(path)
    if found is None:
        interrupted = sibling(Path(path), "partial")
        note = f" ({interrupted} is a save that did not finish)" if interrupted.exists() else ""
        raise FileNotFoundError(f"{path} is not a complete distributed checkpoint (no .metadata file){note}")
    if found != Path(path):
        warnings.warn(f"{path} is missing (a save over it was interrupted): loading {found}", stacklevel=2)
    reader = TrustedReader(found)
    had_state = bool(state.optimizer.state)
    try:
        target = copy_tree(state.state_dict())  # load into copies: the model stays as it is until all is read
        check_checkpoint(found, reader.read_metadata(), target)
        planner = TrustedLoadPlanner(allow_partial_load=True)  # optimizer state of parameters never updated
        try:
            with single_process_is_meant():
                dcp.load({"train": target}, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
        except dcp.CheckpointException as error:  # derives from BaseException: turn it into the first failure
            raise CheckpointError(first_failure(error, found)) from None
        state.load_state_dict(target)
    except BaseException:
        if not had_state:
            state.optimizer.state.clear()  # state_dict() gave a fresh optimizer zero state: take it back
        raise


def complete_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a complete checkpoint, else ``path.old`` if an interrupted save left that, else None."""
    path = Path(path)
    return next((folder for folder in (path, sibling(path, "old")) if is_complete(folder)), None)


def is_complete(folder: Path) -> bool:
    return (folder / ".metadata").is_file()  # DCP writes it last, once every rank's data is written


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.{suffix}")


@contextmanager
def single_process_is_meant():
    """Without a process group, DCP warns that it assumes one process, even when told so (``no_dist=True``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def copy_tree(tree: Any) -> Any:
    """Dicts and lists copied, tensors cloned (DTensors stay DTensors), other values as they are."""
    if isinstance(tree, dict):
        return {key: copy_tree(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [copy_tree(value) for value in tree]
    return tree.detach().clone() if isinstance(tree, Tensor) else tree


def flatten(tree: Any, prefix: str) -> dict[str, Any]:
    """DCP's keys for a nested state dict: dict keys and list positions joined by dots."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {key: value for name, child in items for key, value in flatten(child, f"{prefix}.{name}").items()}


def check_checkpoint(folder: Path, metadata: Metadata, target: dict[str, Any]) -> None:
    """Before reading anything: every trained parameter saved with its shape, every data file whole."""
    saved, wanted = metadata.state_dict_metadata, flatten(target, "train")
    missing = [key for key in wanted if key.startswith("train.model.") and key not in saved]
    if missing:
        raise CheckpointError(f"{folder} lacks trained parameters of this model: {missing[:5]}")
    for key, value in wanted.items():
        meta = saved.get(key)
        if isinstance(value, Tensor) and meta is not None and tuple(getattr(meta, "size", ())) != tuple(value.shape):
            raise CheckpointError(f"{folder}: {key} has shape {tuple(meta.size)} there but {tuple(value.shape)} here")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn not in wanted:
            continue
        file = folder / info.relative_path
        if file.name != info.relative_path:
            raise CheckpointError(f"{folder}/.metadata points {index.fqn} outside the folder: {info.relative_path}")
        if file.name not in sizes:
            sizes[file.name] = file.stat().st_size if file.is_file() else -1
        if sizes[file.name] < info.offset + info.length:
            state = "is missing" if sizes[file.name] < 0 else f"is truncated ({sizes[file.name]} bytes)"
            raise CheckpointError(f"{file} {state}: {index.fqn} needs bytes up to {info.offset + info.length}")


def first_failure(error: BaseException, folder: Path) -> str:
    failures = getattr(error, "failures", {})
    for _, (failure, *_) in sorted(failures.items()):
        return str(failure) if isinstance(failure, CheckpointError) else f"{folder}: {failure!r}"
    return f"{folder}: {error}"


# DCP's .metadata is a pickle of these (and only these) globals.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # how a torch.layout pickles
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP's metadata classes, torch sizes, dtypes and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class TrustedReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata unpickled safely, and errors that name the file and the key."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path, ".metadata")
        try:
            with open(path, "rb") as file:
                metadata = MetadataUnpickler(file).load()
        except Exception as error:
            raise CheckpointError(f"{path} is not a checkpoint's metadata: {error}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not a checkpoint's metadata: it holds a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for item in plan.items:  # one item at a time, so that an error can name it
            file = Path(self.path, self.storage_data[item.storage_index].relative_path)
            try:
                super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
            except Exception as error:
                raise CheckpointError(f"{file}: cannot read {item.dest_index.fqn}: {error}") from None
        future = torch.futures.Future()
        future.set_result(None)
        return future


class TrustedLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's load planner with every non-tensor value read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)  # refuses any global but plain containers and tensors
        except pickle.UnpicklingError as error:
            lines = str(error).splitlines()
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise pickle.UnpicklingError(f"it holds more than plain values and tensors ({reason.strip()})") from None
        safe = io.BytesIO()
        torch.save(plain, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)
