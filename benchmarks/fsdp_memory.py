"""Memory per rank of Flamingo training under FSDP2 and under DDP, 2 processes on the CPU (gloo).

    python benchmarks/fsdp_memory.py                  # about 2 minutes on 2 CPU cores
    python benchmarks/fsdp_memory.py --dim 512 --depth 4

FlamingoPaLM (a 32k vocabulary, dim 1024, 8 layers: about 150M frozen language-model parameters;
gated blocks before layers 0 and 4 and a 2-layer resampler: about 50M trained ones), batch 1 x 256
tokens with 4 items of 64 precomputed features, float32, AdamW over ``flamingo_parameters()``.
For each strategy, two fresh processes train 3 steps and report per rank:

- model state, counted exactly: the parameters each rank holds (its shards under FSDP2, everything
  under DDP), their gradients and the optimizer state;
- resident memory (RSS) after setup and its peak during the steps (sampled every 2 ms; glibc is
  run with ``MALLOC_MMAP_THRESHOLD_`` so that freed tensors leave the resident set). Under FSDP2 the
  model is built on the meta device, sharded, then materialised: no rank ever holds the whole model.

Prints a table and writes benchmarks/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flamingo_pytorch import FlamingoPaLM  # noqa: E402
from flamingo_pytorch.sharding import shard_flamingo  # noqa: E402

MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size in a thread while active."""

    def __enter__(self):
        self.peak, self.running = rss(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def build(args: argparse.Namespace, strategy: str) -> FlamingoPaLM:
    config = dict(num_tokens=32000, dim=args.dim, depth=args.depth, dim_head=64, heads=args.dim // 64)
    config.update(cross_attn_every=4, perceiver_depth=2, perceiver_num_latents=64, perceiver_num_time_embeds=4)
    torch.manual_seed(0)
    if strategy == "ddp":
        model = FlamingoPaLM(**config)
        model.set_flamingo_mode(True)
        return DistributedDataParallel(model)
    with torch.device("meta"):
        model = FlamingoPaLM(**config)
    shard_flamingo(model, param_dtype=None)
    model.to_empty(device="cpu")
    with torch.no_grad():  # fresh weights (a real run loads its checkpoint here), gates open
        for param in model.parameters():
            param.normal_(std=0.02) if param.ndim > 1 else param.fill_(0.5)
    return model


def worker(rank: int, port: int, args: argparse.Namespace, strategy: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        start = rss()
        net = build(args, strategy)
        model = net.module if strategy == "ddp" else net
        optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(rank)
        text = torch.randint(4, 32000, (1, args.seq), generator=generator)
        text[:, :: args.seq // 4] = model.media_token_id
        features = torch.randn(1, 4, 64, args.dim, generator=generator)
        labels = torch.cat((text[:, 1:], torch.full_like(text[:, :1], -100)), dim=1)
        setup = rss()
        with PeakRss() as peak:
            for _ in range(3):
                net(text, image_embeds=features, labels=labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)  # keep the gradients, to count them
        params = sum(local_bytes(p) for p in model.parameters())
        grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        result = dict(
            strategy=strategy,
            rank=rank,
            param_mib=params / MIB,
            grad_mib=grads / MIB,
            optimizer_mib=states / MIB,
            model_state_mib=(params + grads + states) / MIB,
            rss_setup_mib=(setup - start) / MIB,
            rss_peak_mib=(peak.peak - start) / MIB,
        )
        Path(out, f"{strategy}{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_memory.json")
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the spawned processes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for strategy in ("ddp", "fsdp"):
            mp.spawn(worker, args=(free_port(), args, strategy, folder), nprocs=2, join=True)
            rows += [json.loads(Path(folder, f"{strategy}{r}.json").read_text()) for r in range(2)]
    columns = ["strategy", "rank", "param_mib", "grad_mib", "optimizer_mib", "model_state_mib"]
    columns += ["rss_setup_mib", "rss_peak_mib"]
    print("| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.0f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    machine = dict(
        cpu=platform.processor() or platform.machine(), torch=torch.__version__, python=platform.python_version()
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
