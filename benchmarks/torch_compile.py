"""Benchmark 4: what ``torch.compile`` buys on this machine.

    python benchmarks/torch_compile.py [--device cuda] [--reps 5]

The model and inputs of benchmark 1 in flamingo mode, forward (no grad) and forward+backward,
eager against compiled. Each PaLM layer, gated block and the resampler is compiled with
``module.compile()`` (default mode); the freezing and input checks stay eager. The first
``--warmup`` steps (compilation included, reported as ``warmup s``) are not timed. 0.1.2,
eager, is the last column for scale.
"""

from __future__ import annotations

from common import parse_args, print_table, ratio, run_cases, sized, write_json
from training_step import CONFIG


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], reps=4, rounds=2, warmup=2)
    config = sized(CONFIG, args)
    rows = []
    for phase in ("forward", "train"):
        row = {"name": f"flamingo {phase}"}
        variants = [("eager", "ours", False), ("compiled", "ours", True), ("ref", "ref", False)]
        variants = variants[:2] if args.no_ref else variants
        case = {"kind": "model", **config, "mode": "flamingo", "phase": phase, "name": row["name"]}
        results = run_cases([{**case, "impl": impl, "compile": compiled} for _, impl, compiled in variants], args)
        for (key, _, _), result in zip(variants, results):
            row[f"{key}_s"], row[f"{key}_mb"] = result.get("median_s"), result.get("peak_mb")
            row[f"{key}_warmup_s"] = result.get("warmup_s")
            row.setdefault("runs", {})[key] = result
            print(f"{key:8s} {phase}: {result.get('median_s', result.get('error'))}", flush=True)
        row["compile_speedup"] = ratio(row.get("eager_s"), row.get("compiled_s"))
        row["compiled_vs_ref"] = ratio(row.get("ref_s"), row.get("compiled_s"))
        rows.append(row)
    columns = [
        ("name", "case"),
        ("eager_s", "eager s"),
        ("compiled_s", "compiled s"),
        ("compile_speedup", "compile x"),
        ("compiled_warmup_s", "warmup s"),
        ("eager_mb", "eager MB"),
        ("compiled_mb", "compiled MB"),
        ("ref_s", "0.1.2 s"),
        ("compiled_vs_ref", "x vs 0.1.2"),
    ]
    print_table("torch.compile on ours (ratios of medians)", rows, columns)
    write_json("torch_compile", args, {"config": config, "rows": rows})


if __name__ == "__main__":
    main()
