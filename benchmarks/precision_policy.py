"""What Flamingo's trained weights should be over a bfloat16 language model: float32 or bfloat16.

    python benchmarks/precision_policy.py [--steps 300] [--lrs 1e-4 3e-4 1e-3] [--threads 1]

A small task that only the media path can solve: a frozen random Llama (bfloat16, width 64,
2 layers, weights drawn with std 0.2 so that its frozen head can make confident predictions)
reads one image embedding per sample, a noisy copy of one of 16 class prototypes, and must name
its class in the token after ``<image>``. Flamingo trains with AdamW (weight decay 0.01)
under three policies, from the same initial weights and the same batches:

    float32 master   what trains in float32, computing in bfloat16 under autocast (the default)
    bf16 weights     what trains cast to bfloat16: weights, gradients and Adam's state in bfloat16
    float32 LM       the whole model in float32 (the reference the other two approximate)

Reported per policy and learning rate: the loss and the accuracy over the last 20 steps (the class
token's cross-entropy; log 16 = 2.77 is chance), the median step time, and the bytes of trained state
(weights + gradients + Adam's two moments). Prints a table and writes
benchmarks/results/precision_policy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from flamingo_pytorch import Flamingo

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB, WIDTH, CLASSES, MEDIA, FIRST_CLASS = 64, 64, 16, 3, 10
BATCH, PATCHES, NOISE = 16, 4, 0.5
POLICIES = ("float32 master", "bf16 weights", "float32 LM")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build(policy: str) -> Flamingo:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.2,
    )
    lm = transformers.LlamaForCausalLM(config)
    if policy != "float32 LM":
        lm.to(torch.bfloat16)
    sizes = dict(cross_attn_every=1, dim_head=16, heads=4, perceiver_depth=1, perceiver_num_latents=4)
    model = Flamingo(lm, media_token_id=MEDIA, perceiver_num_time_embeds=1, **sizes).train()
    if policy == "bf16 weights":
        model.perceiver_resampler.to(torch.bfloat16)
        model.gated_cross_attn.to(torch.bfloat16)
    return model


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, image_embeds, labels) per step, the same for every policy."""
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(CLASSES, PATCHES, WIDTH, generator=generator)
    out = []
    for _ in range(steps):
        label = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        embeds = prototypes[label] + NOISE * torch.randn(BATCH, PATCHES, WIDTH, generator=generator)
        text = torch.tensor([[1, MEDIA, 5, 0]]).repeat(BATCH, 1)  # <bos> <image> "class:" <answer>
        text[:, 3] = FIRST_CLASS + label
        labels = torch.full_like(text, -100)
        labels[:, 3] = text[:, 3]  # the loss reads only the answer
        out.append((text, embeds[:, None], labels))
    return out


def trained_state_bytes(model: Flamingo, optimizer: torch.optim.Optimizer) -> int:
    params = list(model.flamingo_parameters())
    state = [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.ndim]
    grads = [p.grad for p in params if p.grad is not None]
    return sum(t.numel() * t.element_size() for t in [*params, *grads, *state])


def run(lr: float, data: list) -> list[dict]:
    """Train one model per policy on ``data``, their steps interleaved (a load burst on a shared
    machine then slows every policy alike)."""
    models = [build(policy) for policy in POLICIES]
    optimizers = [torch.optim.AdamW(m.flamingo_parameters(), lr=lr, weight_decay=0.01) for m in models]
    losses, times, hits = [[] for _ in POLICIES], [[] for _ in POLICIES], [[] for _ in POLICIES]
    for text, embeds, labels in data:
        for model, optimizer, loss_log, time_log, hit_log in zip(models, optimizers, losses, times, hits):
            start = time.perf_counter()
            out = model(text, image_embeds=embeds, labels=labels)
            loss = out.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            time_log.append(time.perf_counter() - start)
            loss_log.append(loss.item())
            hit_log.append((out.logits[:, 2].argmax(dim=-1) == text[:, 3]).float().mean().item())
    return [
        {
            "policy": policy,
            "lr": lr,
            "final_loss": statistics.mean(loss_log[-20:]),
            "final_accuracy": statistics.mean(hit_log[-20:]),
            "step_ms": 1e3 * statistics.median(time_log[5:]),
            "trained_state_bytes": trained_state_bytes(model, optimizer),
            "losses": loss_log,
        }
        for policy, model, optimizer, loss_log, time_log, hit_log in zip(
            POLICIES, models, optimizers, losses, times, hits
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "precision_policy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(args.steps)
    rows = [row for lr in args.lrs for row in run(lr, data)]
    print(f"{args.steps} steps, batch {BATCH}, {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"chance: log {CLASSES} = {math.log(CLASSES):.2f}")
    print(f"{'policy':<16}{'lr':>8}{'loss (last 20)':>16}{'accuracy':>10}{'step ms':>10}{'trained state KiB':>19}")
    for row in rows:
        print(
            f"{row['policy']:<16}{row['lr']:>8.0e}{row['final_loss']:>16.3f}{row['final_accuracy']:>10.2f}"
            f"{row['step_ms']:>10.1f}"
            f"{row['trained_state_bytes'] / 1024:>19.0f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "steps": args.steps}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
