"""examples/train.py end to end: shapes shards -> FSDP2 over 2 gloo processes -> checkpoints, log, export; resuming.

One spawn: the run trains 4 steps (a checkpoint every 2), then the last checkpoint is deleted and the
same processes start the run again, which must resume from step 2 and repeat steps 3 and 4 exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import fsdp2_available

pytest.importorskip("webdataset")
if not fsdp2_available():
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch 2.6", allow_module_level=True)
pytest.importorskip("safetensors")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train  # noqa: E402
import write_shards  # noqa: E402

from flamingo_pytorch import FlamingoPaLM  # noqa: E402
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
def test_train_from_shards_with_fsdp2_resumes_exactly_and_exports(tmp_path):
    write_shards.main([str(tmp_path / "shards"), "--count", "32", "--images", "4", "--per-shard", "8"])
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert len(rank["first"]) == 4 and rank["first"] == ranks[0]["first"]  # the loss is the mean over ranks
        assert rank["resumed"] == rank["first"][2:]  # steps 3 and 4 again, exactly
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4, 3, 4]
    assert [record["loss"] for record in log] == ranks[0]["first"] + ranks[0]["resumed"]
    assert (tmp_path / "run" / "log.csv").read_text().splitlines()[0].startswith("step,loss,lr")
    model = FlamingoPaLM(
        **PALM, media_token_id=1, perceiver_num_time_embeds=4, img_encoder=train.make_vision_encoder("patch:8", 32)[0]
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    load_trained(model, tmp_path / "run" / "trained.safetensors")
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all(name.startswith(("perceiver_resampler.", "gated_cross_attn.")) for name in moved)
