"""Benchmark 3: a flamingo-mode training step as the text grows, ours against 0.1.2.

    python benchmarks/sequence_length.py [--device cuda] [--reps 3]

The model of benchmark 1 (dim=512, depth=6, heads=8, dim_head=64, num_tokens=20000,
cross_attn_every=3, 4 images of 256 patches), batch 1, forward+backward at n = 256, 1024, 2048;
ours also with activation checkpointing. Growth columns divide by the n=256 value: attention
with full score matrices grows as n^2, everything else as n.
"""

from __future__ import annotations

from common import parse_args, print_table, ratio, run_cases, sized, write_json
from training_step import CONFIG

LENGTHS = (256, 1024, 2048)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], reps=3, rounds=3)
    config = sized({**CONFIG, "batch": 1}, args)  # --seq is ignored: the lengths are the sweep
    variants = [("ours", False), ("ours", True)] + ([] if args.no_ref else [("ref", False)])
    rows = []
    for n in LENGTHS:
        row = {"n": n}
        case = {"kind": "model", **config, "mode": "flamingo", "phase": "train", "seq": n, "name": f"n={n}"}
        results = run_cases([{**case, "impl": impl, "checkpoint": ckpt} for impl, ckpt in variants], args)
        for (impl, checkpoint), result in zip(variants, results):
            key = impl + ("_ckpt" if checkpoint else "")
            row[f"{key}_s"], row[f"{key}_mb"] = result.get("median_s"), result.get("peak_mb")
            row.setdefault("runs", {})[key] = result
            print(f"{key:9s} n={n}: {result.get('median_s', result.get('error'))}", flush=True)
        row["speedup"] = ratio(row.get("ref_s"), row.get("ours_s"))
        row["memory_saving"] = None if row.get("ref_mb") is None else 1 - row["ours_mb"] / row["ref_mb"]
        rows.append(row)
    first = rows[0]
    for row in rows:
        for key in ("ours_s", "ref_s", "ours_mb", "ref_mb"):
            row[f"{key}_growth"] = ratio(row.get(key), first.get(key))
    columns = [
        ("n", "n"),
        ("ours_s", "ours s"),
        ("ref_s", "0.1.2 s"),
        ("speedup", "x faster"),
        ("ours_mb", "ours MB"),
        ("ref_mb", "0.1.2 MB"),
        ("memory_saving", "mem saved"),
        ("ours_ckpt_s", "ckpt s"),
        ("ours_ckpt_mb", "ckpt MB"),
        ("ours_s_growth", "ours s growth"),
        ("ref_s_growth", "0.1.2 s growth"),
        ("ours_mb_growth", "ours MB growth"),
        ("ref_mb_growth", "0.1.2 MB growth"),
    ]
    print_table("Flamingo-mode forward+backward vs text length n (batch 1; ratios of medians)", rows, columns)
    write_json("sequence_length", args, {"config": config, "rows": rows})


if __name__ == "__main__":
    main()
