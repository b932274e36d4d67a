"""Benchmark 1: a FlamingoPaLM training step, ours against flamingo-pytorch 0.1.2.

    python benchmarks/training_step.py [--device cuda] [--reps 5]

Forward (inference, no grad) and forward+backward (cross-entropy on next tokens), text-only and
flamingo mode, at dim=512, depth=6, heads=8, dim_head=64, num_tokens=20000, cross_attn_every=3,
text (2, 512), 4 images of 256 patches (precomputed embeddings), 64 latents, resampler depth 2.
Also ours with activation checkpointing, and this machine's measured matmul rate.

FLOPs (matmuls only, 2 per multiply-add; N = b n tokens, f = 4 d, H = h k):
    PaLM layer   2N d (H + 2k + 2f) + 2N H d + 2N f d + 2 b h n^2 k   (causal attention: n^2/2 per matmul)
    logits       2N d V
    resampler    per layer, B = b t items, P = p + m:  2B m d H + 4B P d H + 4B h m P k + 2B m H d + 4B m d f
    gated block  2N d H + 4B m d H + 4N m H + 2N H d + 4N d f       (each token reads its item's m latents)
    backward     2x forward for trained weights (input and weight gradients); 1x for frozen weights
                 (input gradients only: the frozen LM in flamingo mode); 2x for attention score matmuls.
The same count is used for ours and 0.1.2 (0.1.2's dense cross-attention does t times more score work).
"""

from __future__ import annotations

import math

from common import parse_args, print_table, ratio, run_cases, run_worker, sized, write_json

CONFIG = dict(
    num_tokens=20000,
    dim=512,
    depth=6,
    dim_head=64,
    heads=8,
    cross_attn_every=3,
    batch=2,
    seq=512,
    images=4,
    patches=256,
    latents=64,
    perceiver_depth=2,
)
MATMUL_SHAPES = [(2048, 2048, 2048), (1024, 512, 4736)]  # square, and a PaLM layer's input projections together


def model_flops(cfg: dict, mode: str, phase: str) -> float:
    """Matmul FLOPs of one forward (phase "forward") or forward+backward ("train"); see the module docstring."""
    b, n, d, k, h, vocab = cfg["batch"], cfg["seq"], cfg["dim"], cfg["dim_head"], cfg["heads"], cfg["num_tokens"]
    tokens, f, inner = b * n, 4 * d, h * k
    attention = 2 * b * h * n * n * k
    layer_weights = 2 * tokens * d * (inner + 2 * k + 2 * f) + 2 * tokens * inner * d + 2 * tokens * f * d
    lm_weights = cfg["depth"] * layer_weights + 2 * tokens * d * vocab
    lm_attention = cfg["depth"] * attention
    forward = lm_weights + lm_attention
    if mode == "text":
        return forward if phase == "forward" else 3 * forward
    items, m = b * cfg["images"], cfg["latents"]
    kv_len = cfg["patches"] + m
    resampler = cfg["perceiver_depth"] * (
        2 * items * m * d * inner
        + 4 * items * kv_len * d * inner
        + 4 * items * h * m * kv_len * k
        + 2 * items * m * inner * d
        + 4 * items * m * d * f
    )
    block = 2 * tokens * d * inner + 4 * items * m * d * inner + 4 * tokens * m * inner + 2 * tokens * inner * d
    blocks = math.ceil(cfg["depth"] / cfg["cross_attn_every"]) * (block + 4 * tokens * d * f)
    trained = resampler + blocks
    forward += trained
    if phase == "forward":
        return forward
    return forward + 2 * trained + lm_weights + 2 * lm_attention


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], reps=6, rounds=3)
    matmul = {"kind": "matmul", "impl": "ours", "shapes": MATMUL_SHAPES, "reps": 10, "warmup": 1}
    rate = run_worker({**matmul, "device": args.device, "autocast": args.autocast}, args, {})
    peak_rate = rate.get("best_gflops")
    config = sized(CONFIG, args)
    rows = []
    for mode in ("text", "flamingo"):
        for phase in ("forward", "train"):
            case = {"kind": "model", **config, "name": f"{mode} {phase}", "mode": mode, "phase": phase}
            group = [{**case, "impl": "ours"}] + ([] if args.no_ref else [{**case, "impl": "ref"}])
            if phase == "train":  # the loss from labels= (chunked cross-entropy), then checkpointing too
                base = {**case, "impl": "ours", "baseline": case["name"]}
                group.append({**base, "fused_loss": True, "name": f"{mode} train, labels="})
            if (mode, phase) == ("flamingo", "train"):
                group.append({**base, "checkpoint": True, "name": "flamingo train, checkpointing"})
                group.append({**base, "checkpoint": True, "fused_loss": True, "name": "... + labels="})
            for row in run_cases(group, args):
                if "median_s" in row:
                    row["gflop"] = model_flops(config, mode, phase) / 1e9
                    row["gflops"] = row["gflop"] / row["median_s"]
                    row["of_matmul_rate"] = ratio(row["gflops"], peak_rate)
                rows.append(row)
                print(f"{row['impl']:4s} {row['name']}: {row.get('median_s', row.get('error'))}", flush=True)
    by_name = {(r["name"], r["impl"]): r for r in rows}
    for row in rows:
        baseline_name = row.get("baseline", row["name"])
        ref = by_name.get((baseline_name, "ref"), {})
        if row["impl"] == "ours" and "median_s" in ref and "median_s" in row:
            row["speedup_vs_ref"] = ref["median_s"] / row["median_s"]
            row["memory_saving_vs_ref"] = 1 - row["peak_mb"] / ref["peak_mb"]
    print(f"\nmeasured matmul rate: {rate.get('gflops')} GFLOP/s (best {peak_rate})")
    columns = [
        ("name", "case"),
        ("impl", "impl"),
        ("median_s", "median s"),
        ("min_s", "min s"),
        ("peak_mb", "peak MB"),
        ("speedup_vs_ref", "x faster"),
        ("memory_saving_vs_ref", "mem saved"),
        ("gflops", "GFLOP/s"),
        ("of_matmul_rate", "of matmul"),
        ("aten_ops", "aten ops"),
    ]
    if args.device == "cuda":
        columns += [("gpu_busy_s", "GPU busy s"), ("kernels", "kernels")]
    print_table("Training step (ours vs flamingo-pytorch 0.1.2; ratios of medians)", rows, columns)
    write_json("training_step", args, {"config": config, "matmul": rate, "rows": rows})


if __name__ == "__main__":
    main()
