"""Model-FLOP utilisation of a bf16 FSDP2 Flamingo training step (for GPUs; runs on the CPU too, slowly).

    torchrun --nproc_per_node=1 benchmarks/fsdp_mfu.py                       # ~1B LM, 8 x 2048 tokens, 5 images
    torchrun --nproc_per_node=8 benchmarks/fsdp_mfu.py --checkpoint-activations
    torchrun --nproc_per_node=2 benchmarks/fsdp_mfu.py --tiny --device cpu  # a smoke run of the script

The model: FlamingoPaLM with a 1.0B-parameter PaLM (vocabulary 32,000, width 2048, 16 layers, 16
heads of 128, SwiGLU x4) frozen, a gated block before every 4th layer and a 2-layer Perceiver
Resampler over ViT-L-sized features (5 images x 256 patches x 1024 per sample, given as
``image_embeds``: the frozen vision encoder's forward is not part of the step). Per rank: a batch of
``--batch`` x ``--seq`` tokens; bf16 compute, fp32 weights, optimizer and reductions (FSDP2's
``MixedPrecisionPolicy``); AdamW over ``flamingo_parameters()``.

Model FLOPs of a step (what MFU divides by the time and the peak; recomputation is not counted):

    F = sum over linear layers of 2 * rows * d_in * d_out * (1 + g_input + g_weight)
        + sum over attention calls of 4 * rows_q * keys * d_inner * (1 + 2 g)

where rows is the number of vectors through the layer, g_weight = 1 for a trained weight (its
weight gradient costs a second matmul), g_input = 1 when a gradient flows to the layer's input
(true for every layer of the frozen LM: the first gated block sits before layer 0), and attention
counts the full n x n scores (PaLM's convention, not halved for the causal mask). Per text token
this is the familiar 6N for trained and 4N for frozen-but-backpropagated weights, plus 12 L n d for
self-attention. The script counts F exactly by forward hooks on one un-checkpointed step at batch 1
(every term is linear in the batch) and also prints ``torch.utils.flop_counter``'s count of the
same step as a cross-check (it counts what runs, including the small recomputations the model always
does: the feed-forward activations and the chunked loss's logits; on the CPU it misses SDPA's kernel).
Peak bf16 dense FLOP/s: H100/H200 SXM 989e12, A100 312e12 (``--peak``).

Writes benchmarks/results/fsdp_mfu.json (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flamingo_pytorch import FlamingoPaLM  # noqa: E402
from flamingo_pytorch.sharding import shard_flamingo  # noqa: E402

PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
ONE_B = dict(num_tokens=32000, dim=2048, depth=16, dim_head=128, heads=16, ff_mult=4, cross_attn_every=4)
TINY = dict(num_tokens=512, dim=64, depth=4, dim_head=16, heads=4, ff_mult=4, cross_attn_every=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--media-dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--compile", action="store_true", help="module.compile() each sharded layer")
    parser.add_argument("--peak", type=float, default=None, help="peak bf16 FLOP/s per device (default: by name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch, to check the script")
    parser.add_argument("--count-only", action="store_true", help="print the model FLOPs (meta device) and stop")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_mfu.json")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq, args.patches, args.media_dim, args.steps = 2, 64, 16, 32, 2
    return args


def build(args: argparse.Namespace, device: torch.device) -> FlamingoPaLM:
    config = TINY if args.tiny else ONE_B
    torch.manual_seed(0)
    with torch.device(device):
        model = FlamingoPaLM(
            **config,
            media_dim=args.media_dim,
            perceiver_depth=2,
            perceiver_num_latents=64,
            perceiver_num_time_embeds=args.images,
        )
    with torch.no_grad():  # open the gates: at 0 the blocks' other weights get no gradient
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)
    return model


def make_batch(args: argparse.Namespace, batch: int, device: torch.device, media_token_id: int) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randint(4, 500, (batch, args.seq), generator=generator)
    text[:, :: args.seq // args.images][:, : args.images] = media_token_id
    features = torch.randn(batch, args.images, args.patches, args.media_dim, generator=generator)
    labels = torch.cat((text[:, 1:], torch.full_like(text[:, :1], -100)), dim=1)
    return {"text": text.to(device), "image_embeds": features.to(device), "labels": labels.to(device)}


def step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model(batch["text"], image_embeds=batch["image_embeds"], labels=batch["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class ModelFlops:
    """Counts the formula's FLOPs of one forward+backward with hooks on every Linear and on SDPA."""

    def __init__(self, model: nn.Module):
        self.total, self.handles = 0, []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self.linear))

    def linear(self, module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        rows = inputs[0].numel() // module.in_features
        passes = 1 + int(inputs[0].requires_grad) + int(module.weight.requires_grad)
        self.total += 2 * rows * module.in_features * module.out_features * passes

    def attention(self, q: torch.Tensor, k: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows_q, keys, width = q.shape[:-2].numel() * q.shape[-2], k.shape[-2], q.shape[-1]
        self.total += 4 * rows_q * keys * width * (3 if q.requires_grad else 1)
        return self.sdpa(q, k, *args, **kwargs)

    def __enter__(self):
        self.sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, self.attention
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.sdpa
        for handle in self.handles:
            handle.remove()


def count_flops(args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """(formula FLOPs, flop_counter FLOPs) of one step at batch 1, unsharded, un-checkpointed, bf16 autocast."""
    model = build(args, device)
    model.set_flamingo_mode(True)
    batch = make_batch(args, 1, device, model.media_token_id)
    with FlopCounterMode(display=False) as counter:
        with ModelFlops(model) as formula, torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch["text"], image_embeds=batch["image_embeds"], labels=batch["labels"])
        loss.backward()  # the formula counted the forward, with its backward multipliers, and no recomputation
    del model
    return formula.total, counter.get_total_flops()


def count_on_meta(args: argparse.Namespace) -> int:
    """The formula's FLOPs per sample from shapes alone (meta device: no memory, no time). The logits of
    all n tokens stand in for the loss over the n - 1 labelled ones (labels cannot be checked on meta)."""
    model = build(args, torch.device("meta"))
    model.set_flamingo_mode(True)
    batch = make_batch(args, 1, torch.device("meta"), model.media_token_id)
    with ModelFlops(model) as formula:
        model(batch["text"], image_embeds=batch["image_embeds"])
    return formula.total


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak is not None:
        return args.peak
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def main() -> None:
    args = parse_args()
    if args.count_only:
        formula = count_on_meta(args)
        per_step = formula * args.batch
        print(f"model FLOPs per sample {formula:.4e} ({formula / args.seq:.4e} per token), per step {per_step:.4e}")
        print(f"a step at 40% of 989e12 FLOP/s takes {per_step / (0.4 * 989e12):.3f} s")
        return
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        formula, counted = count_flops(args, device)  # per sample
        model = shard_flamingo(
            build(args, device), param_dtype=torch.bfloat16, checkpoint_activations=args.checkpoint_activations
        )
        if args.compile:
            for layer in model.palm.layers:
                layer.compile()
        optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=1e-5)
        batch = make_batch(args, args.batch, device, model.media_token_id)
        for _ in range(3):
            step(model, optimizer, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(model, optimizer, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        peak = peak_flops(args, device)
        achieved = formula * args.batch / seconds  # per device
        result = dict(
            world=world,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            batch=args.batch,
            seq=args.seq,
            images=args.images,
            checkpoint_activations=args.checkpoint_activations,
            trained_params=sum(p.numel() for p in model.flamingo_parameters()),
            total_params=sum(p.numel() for p in model.parameters()),
            formula_flops_per_sample=formula,
            flop_counter_flops_per_sample=counted,
            step_seconds=seconds,
            tokens_per_s_per_device=args.batch * args.seq / seconds,
            achieved_tflops_per_device=achieved / 1e12,
            mfu=achieved / peak if peak else None,
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
        if rank == 0:
            print(json.dumps(result, indent=2))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
