"""Benchmark 2: one gated cross-attention block as the number of media items t grows.

    python benchmarks/media_items.py [--device cuda] [--reps 5]

dim=512, heads=8, dim_head=64, text (2, 512), t in 1, 4, 16, 32 items of 64 latents each, media
tokens evenly spaced (the first at position 0), immediate-media mode, both gates open. Forward
(no grad) and forward+backward (sum of the output; x and the media need gradients, as inside
Flamingo). Ours cuts each item's text segment into chunks that read only that item; 0.1.2
scores every token against all t * 64 latents. Both project every item's keys and values
(necessary work that grows with t) and run the same feed-forward.
"""

from __future__ import annotations

from common import parse_args, print_table, run_cases, sized, write_json

CONFIG = dict(dim=512, dim_head=64, heads=8, batch=2, seq=512, latents=64)
MEDIA_ITEMS = (1, 4, 16, 32)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], reps=6, rounds=3)
    config = sized(CONFIG, args)
    rows = []
    for phase in ("forward", "train"):
        for t in MEDIA_ITEMS:
            case = {"kind": "block", "phase": phase, "images": t, "name": f"t={t} {phase}", **config}
            impls = ["ours"] if args.no_ref else ["ours", "ref"]
            pair = dict(zip(impls, run_cases([{**case, "impl": impl} for impl in impls], args)))
            for impl, result in pair.items():
                print(f"{impl:4s} t={t:2d} {phase}: {result.get('median_s', result.get('error'))}", flush=True)
            ours, ref = pair["ours"], pair.get("ref", {})
            row = {"name": f"{phase}", "t": t, "impl": "ours vs ref"}
            for key in ("median_s", "peak_mb", "gpu_busy_s", "aten_ops"):
                row[f"ours_{key}"], row[f"ref_{key}"] = ours.get(key), ref.get(key)
            if "median_s" in ours and "median_s" in ref:
                row["speedup"] = ref["median_s"] / ours["median_s"]
                row["leaner"] = ref["peak_mb"] / max(ours["peak_mb"], 1e-9)
            row["runs"] = pair
            rows.append(row)
    columns = [
        ("name", "phase"),
        ("t", "t"),
        ("ours_median_s", "ours s"),
        ("ref_median_s", "0.1.2 s"),
        ("speedup", "x faster"),
        ("ours_peak_mb", "ours MB"),
        ("ref_peak_mb", "0.1.2 MB"),
        ("leaner", "x leaner"),
        ("ours_aten_ops", "ours ops"),
        ("ref_aten_ops", "0.1.2 ops"),
    ]
    if args.device == "cuda":
        columns += [("ours_gpu_busy_s", "ours GPU busy s"), ("ref_gpu_busy_s", "0.1.2 GPU busy s")]
    print_table("One gated cross-attention block vs media items t (ratios of medians)", rows, columns)
    write_json("media_items", args, {"config": config, "rows": rows})


if __name__ == "__main__":
    main()
