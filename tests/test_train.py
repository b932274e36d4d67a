"""examples/train.py: its config checks, its run folder, and end to end (FSDP2 over 2 gloo processes).

End to end, one spawn: the run trains 4 steps (a checkpoint every 2), then the last checkpoint is
deleted and the same processes start the run again, which must resume from step 2, repeat steps 3
and 4 exactly, and leave each step once in the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import fsdp2_available

if not dist.is_available():
    pytest.skip("the training entry point needs torch.distributed", allow_module_level=True)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402

from flamingo_pytorch import FlamingoPaLM  # noqa: E402
from flamingo_pytorch.training_run import TrainingLog, find_checkpoint  # noqa: E402
from flamingo_pytorch.training_state import load_trained  # noqa: E402

PALM = dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, ff_mult=2, cross_attn_every=1)
PALM.update(perceiver_num_latents=4, perceiver_depth=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def argv(folder: Path) -> list[str]:
    config = {
        "palm": PALM,
        "vision": "patch:8",
        "shards": str(folder / "shards" / "shard-{000000..000003}.tar"),
        "batch_size": 2,
        "max_tokens": 32,
        "max_images": 4,
        "steps": 4,
        "warmup": 1,
        "lr": 1e-2,
        "save_every": 2,
    }
    (folder / "run.json").write_text(json.dumps(config))
    return ["--config", str(folder / "run.json"), "--out", str(folder / "run"), "--device", "cpu"]


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    folder = Path(folder)
    args = train.parse_args(argv(folder))
    try:
        first = train.train(args)
        if rank == 0:
            shutil.rmtree(folder / "run" / "checkpoints" / "step-4")
        dist.barrier()
        resumed = train.train(args)
        torch.save({"first": first, "resumed": resumed}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# about 5 s on 2 CPU cores: two runs in two spawned processes
@pytest.mark.skipif(not fsdp2_available(), reason="FSDP2 (torch.distributed.fsdp.fully_shard) needs torch 2.6")
def test_train_from_shards_with_fsdp2_resumes_exactly_and_exports(tmp_path):
    pytest.importorskip("webdataset")
    pytest.importorskip("safetensors")
    import write_shards

    write_shards.main([str(tmp_path / "shards"), "--count", "32", "--images", "4", "--per-shard", "8"])
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert len(rank["first"]) == 4 and rank["first"] == ranks[0]["first"]  # the loss is the mean over ranks
        assert rank["resumed"] == rank["first"][2:]  # steps 3 and 4 again, exactly
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4]  # steps 3 and 4 of the first run were cut
    assert [record["loss"] for record in log] == ranks[0]["first"][:2] + ranks[0]["resumed"]
    table = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert table[0].startswith("step,loss,lr") and [row.split(",")[0] for row in table[1:]] == ["1", "2", "3", "4"]
    model = FlamingoPaLM(
        **PALM, media_token_id=1, perceiver_num_time_embeds=4, img_encoder=train.make_vision_encoder("patch:8", 32)[0]
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    load_trained(model, tmp_path / "run" / "trained.safetensors")
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all(name.startswith(("perceiver_resampler.", "gated_cross_attn.")) for name in moved)


def config_error(tmp_path: Path, capsys, config: str, *flags: str) -> str:
    """train.py's argument error (stderr) for this config file text."""
    (tmp_path / "run.json").write_text(config)
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--config", str(tmp_path / "run.json"), *flags])
    assert exit.value.code == 2  # argparse's usage error, not a traceback
    return capsys.readouterr().err


def test_a_config_is_checked_like_the_flags(tmp_path, capsys):
    path = str(tmp_path / "run.json")
    error = config_error(tmp_path, capsys, '{"synthetic": true, "batch_szie": 4, "stpes": 2}')
    assert f"--config {path}: unknown keys batch_szie (did you mean batch_size?), stpes (did you mean steps?)" in error
    error = config_error(tmp_path, capsys, '{\n  "synthetic": true,\n  "steps": 10,\n}')
    assert f"--config {path}: invalid JSON at line 4, column 1" in error
    error = config_error(tmp_path, capsys, '[{"synthetic": true}]')
    assert f"--config {path} must hold a JSON object of flags" in error and "not a list" in error
    error = config_error(tmp_path, capsys, '{"synthetic": true, "model": "gpt"}')
    assert re.search(r"argument --model: invalid choice: 'gpt' \(choose from '?palm'?, '?hf'?\)", error)
    assert "invalid int value: '1.5'" in config_error(tmp_path, capsys, '{"synthetic": true, "steps": 1.5}')
    assert 'bf16 must be true or false, got "yes"' in config_error(
        tmp_path, capsys, '{"synthetic": true, "bf16": "yes"}'
    )
    error = config_error(tmp_path, capsys, '{"synthetic": true}', "--palm", "[1]")
    assert "argument --palm: expected a JSON object {...}, got a list" in error
    (tmp_path / "run.json").write_text('{"synthetic": true, "steps": 5, "palm": {"dim": 64}, "bf16": true}')
    args = train.parse_args(["--config", path, "--steps", "7"])
    assert (args.steps, args.palm, args.bf16, args.synthetic) == (7, {"dim": 64}, True, True)  # flags win


def test_a_model_name_that_cannot_be_loaded_says_what_it_had_to_be():
    def hub(name):  # what transformers raises for a name that is neither a folder nor reachable on the hub
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.\nCheck your connection")

    with pytest.raises(SystemExit, match=r"--lm 'gpt': not a local folder, and no model of that name could be loaded"):
        train.pretrained(hub, "gpt", "--lm")


def test_the_run_folder_names_its_checkpoints_and_cuts_the_log_back(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in ("step-2", "step-4.partial", "step-6"):
        (folder / name).mkdir(parents=True)
    (folder / "step-2" / ".metadata").touch()  # complete; step-6 has no metadata: a save that did not finish
    resume, unfinished = find_checkpoint(folder)
    assert resume == folder / "step-2" and [p.name for p in unfinished] == ["step-4.partial", "step-6"]
    ignoring = "(ignoring step-4.partial, step-6: a checkpoint save that did not finish)"
    message = train.start_message("single", 1, torch.device("cpu"), resume, unfinished)
    assert message == f"single on 1 x cpu, resuming from {folder / 'step-2'} {ignoring}"
    (folder / "step-8.old").mkdir()
    (folder / "step-8.old" / ".metadata").touch()  # killed between the renames of a save over step-8
    assert find_checkpoint(folder)[0] == folder / "step-8"
    assert train.start_message("single", 1, torch.device("cpu"), None, unfinished).endswith(f"from scratch {ignoring}")
    log = TrainingLog(tmp_path, enabled=True)
    for step in range(1, 5):
        log.write({"step": step, "loss": 1.0 / step})
    log.keep_until(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,1.0", "2,0.5"]
