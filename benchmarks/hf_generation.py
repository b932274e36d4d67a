"""Cached generation through Flamingo over a transformers Llama: media keys/values projected once
per gated block, against re-projecting every image's keys and values at every step (what
OpenFlamingo and IDEFICS do).

    python benchmarks/hf_generation.py [--layers 4] [--dim 512] [--prompt 512] [--new 32] [--reps 3]
    python benchmarks/hf_generation.py --openflamingo-python /tmp/venvof/bin/python   # and OpenFlamingo's generate

A random Llama (4 layers, width 512, 8 heads, vocabulary 1000), a gated block before every layer,
64 latents per image, prompts of 512 tokens holding 1 or 8 images, greedy decoding, batch 1, CPU
float32. The time per generated token is (time to generate ``--new`` + 1 tokens - time to generate
1 token) / ``--new``: the prefill cancels out. Medians over ``--reps`` runs of each. With
``--openflamingo-python`` (a Python with OpenFlamingo and transformers 4.33: see
openflamingo_generation.py) OpenFlamingo's own ``generate`` on a model of the same size runs in a
separate process after ours. Prints a table and writes JSON to benchmarks/results/hf_generation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flamingo_pytorch import Flamingo
from flamingo_pytorch.fusion import MediaState

MEDIA = 3


def build(args: argparse.Namespace) -> Flamingo:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=args.dim,
        intermediate_size=4 * args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = Flamingo(LlamaForCausalLM(config), media_token_id=MEDIA, cross_attn_every=1, perceiver_depth=2).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def seconds(model: Flamingo, text: torch.Tensor, features: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    model.generate(text, image_embeds=features, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def per_token(model: Flamingo, text: torch.Tensor, features: torch.Tensor, args: argparse.Namespace) -> float:
    seconds(model, text, features, 2)  # warm-up
    long = statistics.median(seconds(model, text, features, args.new + 1) for _ in range(args.reps))
    short = statistics.median(seconds(model, text, features, 1) for _ in range(args.reps))
    return (long - short) / args.new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("dim", 512), ("prompt", 512), ("new", 32), ("reps", 3), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--openflamingo-python", default=None, help="a Python with open-flamingo and transformers 4.33")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    project_once = MediaState.keys_values
    rows = []
    for images in (1, 8):
        text = torch.randint(4, 1000, (1, args.prompt))
        text[0, torch.linspace(0, args.prompt // 2, images + 1)[:-1].long()] = MEDIA  # images in the first half
        features = torch.randn(1, images, 256, args.dim)
        row = {"images": images, "once_s": per_token(model, text, features, args)}
        MediaState.keys_values = reproject_every_step
        try:
            row["every_step_s"] = per_token(model, text, features, args)
        finally:
            MediaState.keys_values = project_once
        row["speedup"] = row["every_step_s"] / row["once_s"]
        rows.append(row)
        print(f"{images} images: {row}", flush=True)
    if args.openflamingo_python:
        add_openflamingo(rows, args)
    print("\nms per generated token (greedy, batch 1); media keys/values projected once vs at every step")
    print("images  once ms  every step ms  x faster  OpenFlamingo ms  x faster")
    for row in rows:
        once, every = 1e3 * row["once_s"], 1e3 * row["every_step_s"]
        line = f"{row['images']:6d}  {once:7.2f}  {every:13.2f}  {row['speedup']:8.2f}"
        if "openflamingo_s" in row:
            line += f"  {1e3 * row['openflamingo_s']:15.2f}  {row['openflamingo_s'] / row['once_s']:8.2f}"
        print(line)
    out = Path(__file__).resolve().parent / "results" / "hf_generation.json"
    out.parent.mkdir(exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")


def add_openflamingo(rows: list[dict], args: argparse.Namespace) -> None:
    """Run openflamingo_generation.py in OpenFlamingo's own Python and add its times to ``rows``."""
    script = Path(__file__).resolve().parent / "openflamingo_generation.py"
    sizes = [f"--{name}={getattr(args, name)}" for name in ("layers", "dim", "prompt", "new", "reps")]
    done = subprocess.run([args.openflamingo_python, str(script), *sizes], capture_output=True, text=True, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    for row, their in zip(rows, theirs["rows"]):
        row["openflamingo_s"] = their["openflamingo_s"]
        row["openflamingo_torch"] = theirs["torch"]


def reproject_every_step(state: MediaState, block, rows: int):
    """``MediaState.keys_values`` without its cache: every call projects the media again."""
    state.projected.pop(id(block), None)
    return project_once_original(state, block, rows)


project_once_original = MediaState.keys_values

if __name__ == "__main__":
    main()
