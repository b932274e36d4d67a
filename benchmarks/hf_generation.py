"""Cached generation through Flamingo over a transformers Llama: media keys/values projected once
per gated block, against re-projecting every image's keys and values at every step (what
OpenFlamingo and IDEFICS do), and against OpenFlamingo's own ``generate`` on the same weights.

    python benchmarks/hf_generation.py [--layers 4] [--dim 512] [--prompt 512] [--new 32] [--reps 5] [--threads N]

OpenFlamingo 2.0.1's model is built in this process (``openflamingo_generation.py``): a random Llama
(4 layers, width 512, 8 heads, vocabulary 1000), a gated block before every layer, a 6-layer
Perceiver with 64 latents per image, a one-layer open_clip ViT (256 patch tokens per 224 x 224
image). Ours is ``load_openflamingo`` of its ``state_dict`` over an untouched copy of the same Llama
and ViT. Prompts of 512 tokens holding 1, 4 or 8 images, greedy decoding, batch 1, CPU float32. The
time per generated token is (time to generate ``--new`` + 1 tokens - time to generate 1 token) /
``--new``: the prefill (and the images' encoding) cancels out. Each round times the three routes one
after the other (ours, ours re-projecting, OpenFlamingo), so that a change in the machine's load (a
shared machine) hits all alike; the first round warms up, the rest give medians, and each "x" is a
ratio of those medians. ``--threads N`` sets torch's threads (0: torch's default). The greedy tokens
of ours and OpenFlamingo's are compared. Prints a table and writes JSON to
benchmarks/results/hf_generation.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import open_flamingo  # noqa: F401  (fail here, before building anything, when it is missing)
import openflamingo_generation as theirs
import torch
from common import write_rows
from openflamingo_sizes import COUNTS, END_OF_CHUNK, MEDIA, prompts

from flamingo_pytorch import Flamingo
from flamingo_pytorch.fusion import MediaState
from flamingo_pytorch.openflamingo import load_openflamingo


def generate(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> torch.Tensor:
    # eos = <|endofchunk|> and no early stop, as OpenFlamingo's generate with min_new_tokens
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=END_OF_CHUNK)
    return model.generate(text, images, attention_mask=torch.ones_like(text), **kwargs)


def seconds(run: Callable[[int], object], new: int) -> float:
    start = time.perf_counter()
    run(new)
    return time.perf_counter() - start


def per_token(ours: Flamingo, their_model, text: torch.Tensor, images: torch.Tensor, args) -> dict[str, float]:
    """Seconds per generated token: ours with the media keys/values projected once, ours projecting them
    again at every step (``MediaState.keys_values`` without its cache), OpenFlamingo's; the routes alternate."""
    routes = {
        "once_s": lambda new: generate(ours, text, images, new),
        "every_step_s": lambda new: generate(ours, text, images, new),
        "openflamingo_s": lambda new: theirs.generate(their_model, text, images, new),
    }
    runs = {(route, new): [] for route in routes for new in (args.new + 1, 1)}
    try:
        for _ in range(args.reps + 1):  # the first round warms up
            for route, run in routes.items():
                MediaState.keys_values = reproject_every_step if route == "every_step_s" else project_once_original
                for new in (args.new + 1, 1):
                    runs[route, new].append(seconds(run, new))
    finally:
        MediaState.keys_values = project_once_original
    median = {key: statistics.median(times[1:]) for key, times in runs.items()}
    return {route: (median[route, args.new + 1] - median[route, 1]) / args.new for route in routes}


def measure(ours: Flamingo, their_model, inputs: dict, count: int, args: argparse.Namespace) -> dict:
    """One row: the three routes' seconds per token, the ratios of their medians, and the tokens compared."""
    text, images = inputs[f"text_{count}"], inputs[f"images_{count}"]
    with torch.no_grad():
        mine = generate(ours, text, images, args.new)[0, text.shape[1] :]
        other = theirs.generate(their_model, text, images, args.new)[0, text.shape[1] :]
    row = {"images": count, **per_token(ours, their_model, text, images, args)}
    row["speedup"] = row["every_step_s"] / row["once_s"]
    row["openflamingo_speedup"] = row["openflamingo_s"] / row["once_s"]
    row["same_tokens"] = f"{int((mine == other).sum())}/{args.new}"
    print(f"{count} images: {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("dim", 512), ("prompt", 512), ("new", 32), ("reps", 5), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--images", type=int, nargs="+", default=list(COUNTS), choices=COUNTS, help="images a prompt")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "hf_generation.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    their_model, lm, clip = theirs.build(args)
    ours = load_openflamingo(their_model.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    inputs = prompts(args)
    rows = [measure(ours, their_model, inputs, count, args) for count in args.images]
    print("\nms per generated token (greedy, batch 1); ours: media keys/values projected once")
    print("images  ours ms  every step ms  x faster  OpenFlamingo ms  x faster  same tokens")
    for row in rows:
        once, every, other = (1e3 * row[key] for key in ("once_s", "every_step_s", "openflamingo_s"))
        print(
            f"{row['images']:6d}  {once:7.2f}  {every:13.2f}  {row['speedup']:8.2f}  {other:15.2f}  "
            f"{row['openflamingo_speedup']:8.2f}  {row['same_tokens']:>11}"
        )
    write_rows(args.out, args, rows)
    return rows


def reproject_every_step(state: MediaState, block, rows: int):
    """``MediaState.keys_values`` without its cache: every call projects the media again."""
    state.projected.pop(id(block), None)
    return project_once_original(state, block, rows)


project_once_original = MediaState.keys_values

if __name__ == "__main__":
    main()
