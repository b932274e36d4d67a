"""The demo's training under DistributedDataParallel: 2 CPU processes, gloo.

Each rank draws different data, so the ranks stay identical only if their gradients are averaged.
Stage 2 freezes the language model before wrapping the model in DDP, so DDP registers only the
resampler and gated cross-attention parameters. Had it registered the frozen LM too, DDP (without
``find_unused_parameters``) would wait for LM gradients that never come and raise on the second
step; the three steps below would fail, as the last check shows for the opposite order.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

pytest.importorskip("tqdm")  # the demo's progress bar
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_shapes  # noqa: E402
from shapes_dataset import make_batch, make_tokenizer  # noqa: E402
from shapes_encoder import ShapesEncoder  # noqa: E402

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snapshot(named) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in named}


def wrap_before_freezing(model, tokenizer, data) -> str:
    """The order train_flamingo avoids: DDP built while the LM still requires grad. -> DDP's error."""
    model.set_flamingo_mode(False)
    net = DistributedDataParallel(model)
    try:
        for _ in range(2):
            batch = make_batch(2, 4, tokenizer, data)
            train_shapes.next_token_loss(net(batch.text, batch.images), batch.text).backward()
    except RuntimeError as error:
        return str(error)
    finally:
        model.zero_grad(set_to_none=True)
    return ""


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    train_shapes.BATCH_SIZE = 4  # the demo's 32 sequences per step would only make the 2 ranks slower
    args = train_shapes.parse_args(["--device", "cpu", "--seed", "0"])
    runtime = train_shapes.start_runtime(args)  # joins the gloo process group
    try:
        tokenizer = make_tokenizer()
        config = train_shapes.model_config(tokenizer)
        torch.manual_seed(0)
        model = train_shapes.build_model(config, ShapesEncoder(dim=config["dim"]))
        data = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        trainable = {id(p) for p in model.flamingo_parameters()}
        lm_losses = train_shapes.pretrain_language_model(model, STEPS, tokenizer, data, runtime)
        lm = snapshot(model.palm.named_parameters())

        def frozen():
            return snapshot((n, p) for n, p in model.named_parameters() if id(p) not in trainable)

        def flamingo():
            return snapshot((n, p) for n, p in model.named_parameters() if id(p) in trainable)

        start_frozen, start_flamingo = frozen(), flamingo()
        losses = train_shapes.train_flamingo(model, STEPS, tokenizer, data, runtime)
        result = {
            "lm_losses": lm_losses,
            "lm": lm,
            "losses": losses,
            "start_frozen": start_frozen,
            "start_flamingo": start_flamingo,
            "frozen": frozen(),
            "flamingo": flamingo(),
            "frozen_grads": [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in trainable],
        }
        result["wrong_order_error"] = wrap_before_freezing(model, tokenizer, data)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_hold_identical_trainable_parameters_and_the_lm_stays_frozen(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Stage 1, DDP over model.palm alone: different data, the same language model on both ranks.
    assert ranks[0]["lm_losses"] != ranks[1]["lm_losses"]
    for name, value in ranks[0]["lm"].items():
        torch.testing.assert_close(ranks[1]["lm"][name], value, rtol=0, atol=0, msg=name)
    # Stage 2, DDP over the model with the language model frozen first.
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks trained on different data...
    for name, value in ranks[0]["flamingo"].items():  # ...yet hold the same trainable weights
        torch.testing.assert_close(ranks[1]["flamingo"][name], value, rtol=0, atol=0, msg=name)
    moved = [n for n, v in ranks[0]["flamingo"].items() if not torch.equal(v, ranks[0]["start_flamingo"][n])]
    assert any(n.endswith("attn_gate") for n in moved)  # training happened: the gates opened
    for rank in ranks:
        assert "Expected to have finished reduction" in rank["wrong_order_error"]  # why we freeze first
        assert rank["frozen_grads"] == []
        assert rank["frozen"].keys() == rank["start_frozen"].keys() and len(rank["frozen"]) > 0
        for name, value in rank["frozen"].items():  # the language model and image encoder did not move
            torch.testing.assert_close(value, rank["start_frozen"][name], rtol=0, atol=0, msg=name)
