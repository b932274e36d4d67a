"""Training checkpoints (training_state) and trained-weight files (trained_weights), in one process.

A checkpoint loads nothing it does not trust (a pickled payload is refused and never runs), a failed
load changes nothing, a save killed at any instant leaves a complete checkpoint, and the library's
own use of DCP prints no warning. The trained weights have one format, written and read by one pair
of functions, that refuses a model wrapped differently and keeps the model's dtypes.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY, open_gates, tiny_image_encoder
from torch import nn

from flamingo_pytorch import Flamingo, FlamingoPaLM
from flamingo_pytorch.sharding import freeze_language_model

if not torch.distributed.is_available():
    pytest.skip("torch.distributed.checkpoint needs torch.distributed", allow_module_level=True)
pytest.importorskip("safetensors")

from flamingo_pytorch import trained_weights, training_state
from flamingo_pytorch.training_state import (
    CheckpointError,
    TrainingState,
    load_training_state,
    save_training_state,
)

MEDIA = 3


class Payload:
    """Unpickling this creates the folder ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def trained_run(steps: int, **progress) -> TrainingState:
    """FlamingoPaLM with its LM frozen, AdamW and a schedule after ``steps`` steps on random gradients."""
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())
    freeze_language_model(model)
    optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    generator = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        for param in model.flamingo_parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        scheduler.step()
    return TrainingState(model, optimizer, scheduler, progress={"step": steps, "data": [steps, 7], **progress})


def snapshot(state: TrainingState) -> dict:
    return copy.deepcopy(
        {
            "model": dict(state.model.state_dict()),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "progress": state.progress,
        }
    )


def same(a, b) -> bool:
    """Exact equality of nested dicts, lists and tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_checkpoint_round_trips_exactly(tmp_path):
    saved = trained_run(2)
    save_training_state(tmp_path / "ck", saved)
    fresh = trained_run(0)
    load_training_state(tmp_path / "ck", fresh)
    assert same(snapshot(fresh), snapshot(saved))


def test_the_library_prints_no_distributed_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_training_state(tmp_path / "ck", trained_run(1))
        load_training_state(tmp_path / "ck", trained_run(0))
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []


def test_a_pickled_payload_in_the_metadata_never_runs(tmp_path):
    save_training_state(tmp_path / "ck", trained_run(1))
    marker = tmp_path / "ran"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata is not a checkpoint's metadata: .*mkdir is not allowed"):
        load_training_state(tmp_path / "ck", trained_run(0))
    assert not marker.exists()
    import torch.distributed.checkpoint as dcp

    with pytest.raises(AttributeError):  # DCP's own reader runs the payload, then finds no metadata
        dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    assert marker.exists()


def test_a_pickled_payload_in_a_data_file_never_runs(tmp_path):
    marker = tmp_path / "ran"
    save_training_state(tmp_path / "ck", trained_run(1, hook=Payload(marker)))
    assert not marker.exists()
    fresh = trained_run(0, hook=None)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: cannot read train\.progress\.hook: .*GLOBAL .*mkdir"):
        load_training_state(tmp_path / "ck", fresh)
    assert not marker.exists()
    assert same(snapshot(fresh), before)


def test_metadata_cannot_point_outside_the_folder(tmp_path):
    save_training_state(tmp_path / "ck", trained_run(1))
    metadata = training_state.TrustedReader(tmp_path / "ck").read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"points train\..* outside the folder: \.\./elsewhere\.distcp"):
        load_training_state(tmp_path / "ck", trained_run(0))


def damage_truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


def damage_overwrite(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:64] = bytes(64)  # the first item's header: the same length, unreadable
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [damage_truncate, damage_overwrite])
def test_a_failed_load_changes_nothing_and_names_the_file_and_the_key(tmp_path, damage):
    save_training_state(tmp_path / "ck", trained_run(2))
    damage(tmp_path / "ck" / "__0_0.distcp")
    fresh = trained_run(1)
    before = snapshot(fresh)
    with pytest.raises(Exception, match=r"__0_0\.distcp.* train\.") as error:  # an Exception, not a BaseException
        load_training_state(tmp_path / "ck", fresh)
    assert isinstance(error.value, CheckpointError)
    assert same(snapshot(fresh), before)


KILLED_SAVE = """
import os, signal, sys, torch
import torch.distributed.checkpoint as dcp
from flamingo_pytorch.training_state import TrainingState, save_training_state

write_data = dcp.FileSystemWriter.write_data
def write_and_die(self, plan, planner):
    write_data(self, plan, planner).wait()  # the data files are written, the metadata is not
    os.kill(os.getpid(), signal.SIGKILL)
dcp.FileSystemWriter.write_data = write_and_die
model = torch.nn.Linear(4, 4)
optimizer = torch.optim.AdamW(model.parameters())
save_training_state(sys.argv[1], TrainingState(model, optimizer, progress={"step": 2}))
"""


def linear_state(model: nn.Module, step: int) -> TrainingState:
    return TrainingState(model, torch.optim.AdamW(model.parameters()), progress={"step": step})


def test_a_save_killed_while_writing_keeps_the_old_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    save_training_state(tmp_path / "ck", linear_state(model, 1))
    code = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ck")]).returncode
    assert code == -9  # SIGKILL
    assert (tmp_path / "ck.partial").is_dir()  # the interrupted save
    fresh = linear_state(nn.Linear(4, 4), 0)
    load_training_state(tmp_path / "ck", fresh)
    assert fresh.progress["step"] == 1 and torch.equal(fresh.model.weight, model.weight)
    save_training_state(tmp_path / "ck", linear_state(model, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the next save cleans up


def test_a_save_killed_between_its_renames_leaves_the_old_checkpoint_found(tmp_path, monkeypatch):
    save_training_state(tmp_path / "ck", trained_run(1))
    replace, calls = os.replace, []

    def replace_then_die(source, target):
        calls.append(source)
        if len(calls) == 2:  # the old checkpoint is at ck.old, the new one complete at ck.partial
            raise KeyboardInterrupt("killed")
        replace(source, target)

    monkeypatch.setattr(training_state.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(tmp_path / "ck", trained_run(2))
    monkeypatch.undo()
    assert not (tmp_path / "ck").exists()
    fresh = trained_run(0)
    with pytest.warns(UserWarning, match=r"ck is missing .* loading .*ck\.old"):
        load_training_state(tmp_path / "ck", fresh)
    assert fresh.progress["step"] == 1
    with pytest.raises(FileNotFoundError, match=r"not a complete distributed checkpoint .*ck2\.partial"):
        (tmp_path / "ck2.partial").mkdir()
        load_training_state(tmp_path / "ck2", fresh)


# Trained weights: one format.


def llama_flamingo(**options) -> Flamingo:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    sizes = dict(dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4, perceiver_num_time_embeds=4)
    model = Flamingo(transformers.LlamaForCausalLM(config), media_token_id=MEDIA, **{**sizes, **options}).eval()
    return model


def perturbed(model: nn.Module) -> nn.Module:
    open_gates(model, 0.5)
    with torch.no_grad():
        for param in model.flamingo_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def test_both_writers_and_readers_are_one_format(tmp_path):
    model = perturbed(llama_flamingo(train_token_ids=[MEDIA, 5]))
    training_state.export_trained(model, tmp_path / "exported.safetensors")
    model.save_trained(str(tmp_path / "saved.safetensors"))
    for path in ("exported.safetensors", "saved.safetensors"):
        for load in (training_state.load_trained, lambda m, p: m.load_trained(str(p))):
            fresh = llama_flamingo(train_token_ids=[MEDIA, 5])
            load(fresh, tmp_path / path)
            assert same(fresh.trained_state_dict(), model.trained_state_dict())
            assert same(fresh.state_dict(), model.state_dict())  # the LM was the same (seed 0): all of it


def test_a_model_wrapped_differently_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "trained.safetensors"
    trained_weights.save_trained(perturbed(llama_flamingo(cross_attn_every=2)), path)  # blocks at layers 0, 2
    other = llama_flamingo(cross_attn_every=3)  # blocks at 0, 3: the same key names
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"cross_attn_layers is \[0, 2\] in the file but \[0, 3\] in this model"):
        trained_weights.load_trained(other, path)
    with pytest.raises(ValueError, match=r"train_token_ids is \[\] in the file but \[5\] .*missing keys"):
        trained_weights.load_trained(llama_flamingo(cross_attn_every=2, train_token_ids=[5]), path)
    with pytest.raises(ValueError, match=r"heads is 2 in the file but 4 .*dim_head is 8 in the file but 4"):
        trained_weights.load_trained(llama_flamingo(cross_attn_every=2, heads=4, dim_head=4), path)
    assert same(other.state_dict(), before)


def test_loading_keeps_the_models_dtypes_and_saving_keeps_the_parameters(tmp_path):
    model = perturbed(llama_flamingo(train_token_ids=[MEDIA]))
    trained_weights.save_trained(model, tmp_path / "float32.safetensors")
    low = llama_flamingo(train_token_ids=[MEDIA]).to(torch.bfloat16)
    trained_weights.load_trained(low, tmp_path / "float32.safetensors")
    for name, value in trained_weights.trained_tensors(low).items():
        expected = trained_weights.trained_tensors(model)[name]
        assert value.dtype == (torch.bfloat16 if expected.is_floating_point() else expected.dtype)
        assert torch.equal(value, expected.to(value.dtype))  # rounded once, as .to(bfloat16) rounds
    trained_weights.save_trained(low, tmp_path / "bfloat16.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bfloat16.safetensors"), framework="pt") as file:
        assert file.get_tensor("gated_cross_attn.0.attn.to_q.weight").dtype == torch.bfloat16


def test_lora_weights_on_the_language_model_are_part_of_what_trains(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = llama_flamingo()
    peft.inject_adapter_in_model(lora, model.lm)
    names = [n for n in trained_weights.trained_tensors(model) if "lora_" in n]
    assert len(names) == 2 * 4  # A and B on the q projection of each of the 4 layers
    trained_weights.save_trained(model, tmp_path / "lora.safetensors")
    fresh = llama_flamingo()
    peft.inject_adapter_in_model(lora, fresh.lm)  # another random init of the adapters
    trained_weights.load_trained(fresh, tmp_path / "lora.safetensors")
    assert same(fresh.state_dict(), model.state_dict())


def test_flamingo_palm_saves_its_flamingo_parameters_only(tmp_path):
    torch.manual_seed(0)
    model = perturbed(FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder()))
    trained_weights.save_trained(model, tmp_path / "palm.safetensors")
    trained = {n for n, _ in model.named_parameters() if n.startswith(("perceiver_resampler.", "gated_cross_attn."))}
    assert set(trained_weights.trained_tensors(model)) == trained
    torch.manual_seed(1)
    fresh = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())
    palm = copy.deepcopy(fresh.palm.state_dict())
    trained_weights.load_trained(fresh, tmp_path / "palm.safetensors")
    assert same(dict(fresh.perceiver_resampler.state_dict()), dict(model.perceiver_resampler.state_dict()))
    assert same(dict(fresh.gated_cross_attn.state_dict()), dict(model.gated_cross_attn.state_dict()))
    assert same(dict(fresh.palm.state_dict()), palm)  # the language model is not in the file


def test_a_file_without_a_layout_loads_with_a_warning(tmp_path):
    from safetensors.torch import save_file

    model = perturbed(llama_flamingo())
    named = dict(model.named_parameters())
    save_file({n: p.detach() for n, p in named.items() if p.requires_grad}, str(tmp_path / "old.safetensors"))
    fresh = llama_flamingo()
    with pytest.warns(UserWarning, match="records no layout"):
        trained_weights.load_trained(fresh, tmp_path / "old.safetensors")
    assert same(fresh.state_dict(), model.state_dict())
