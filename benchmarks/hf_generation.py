"""Cached generation through Flamingo over a transformers Llama: media keys/values projected once
per gated block, against re-projecting every image's keys and values at every step (what
OpenFlamingo and IDEFICS do), and against OpenFlamingo's own ``generate`` on the same weights.

    python benchmarks/hf_generation.py [--layers 4] [--dim 512] [--prompt 512] [--new 32] [--reps 3] [--threads N]
    python benchmarks/hf_generation.py --openflamingo-python /tmp/venvof/bin/python   # and OpenFlamingo's generate

A random Llama (4 layers, width 512, 8 heads, vocabulary 1000), a gated block before every layer,
a 6-layer Perceiver with 64 latents per image, a one-layer open_clip ViT (256 patch tokens per
224 x 224 image), prompts of 512 tokens holding 1, 4 or 8 images, greedy decoding, batch 1, CPU
float32. The time per generated token is (time to generate ``--new`` + 1 tokens - time to generate
1 token) / ``--new``: the prefill (and the images' encoding) cancels out. Medians over ``--reps``
runs of each; the runs of the two routes of ours alternate, so that a change in the machine's load
(a shared machine) hits both alike. ``--threads N`` sets torch's threads on both sides (0: torch's
default).

With ``--openflamingo-python`` (a Python with OpenFlamingo and transformers 4.33: see
openflamingo_generation.py) OpenFlamingo builds the model first, in a separate process, times its
own ``generate``, and saves its ``state_dict`` and inputs; ours is then ``load_openflamingo`` of
that checkpoint, timed on the same prompts and images, and its greedy tokens are compared with
OpenFlamingo's. Without it, ours has the same sizes and random weights. Prints a table and writes
JSON to benchmarks/results/hf_generation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from openflamingo_sizes import COUNTS, END_OF_CHUNK, MEDIA, language_model, prompts, vision_encoder

from flamingo_pytorch import Flamingo
from flamingo_pytorch.fusion import MediaState
from flamingo_pytorch.openflamingo import load_openflamingo


def build(args: argparse.Namespace, checkpoint: Path | None) -> Flamingo:
    lm, clip = language_model(args), vision_encoder(args)
    if checkpoint is not None:
        return load_openflamingo(checkpoint, lm, media_token_id=MEDIA, vision_encoder=clip).eval()
    model = Flamingo(lm, media_token_id=MEDIA, vision_encoder=clip, perceiver_num_time_embeds=None).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model


def generate(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> torch.Tensor:
    # eos = <|endofchunk|> and no early stop, as OpenFlamingo's generate with min_new_tokens
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=END_OF_CHUNK)
    return model.generate(text, images, attention_mask=torch.ones_like(text), **kwargs)


def seconds(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    generate(model, text, images, new)
    return time.perf_counter() - start


def per_token(model: Flamingo, text: torch.Tensor, images: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per generated token with the media keys/values projected once and projected again at
    every step (``MediaState.keys_values`` without its cache), the two routes' runs alternating."""
    routes = {"once_s": project_once_original, "every_step_s": reproject_every_step}
    runs = {(route, new): [] for route in routes for new in (args.new + 1, 1)}
    try:
        for _ in range(args.reps + 1):  # the first round warms up
            for route, keys_values in routes.items():
                MediaState.keys_values = keys_values
                for new in (args.new + 1, 1):
                    runs[route, new].append(seconds(model, text, images, new))
    finally:
        MediaState.keys_values = project_once_original
    median = {key: statistics.median(times[1:]) for key, times in runs.items()}
    return {route: (median[route, args.new + 1] - median[route, 1]) / args.new for route in routes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("dim", 512), ("prompt", 512), ("new", 32), ("reps", 3), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--openflamingo-python", default=None, help="a Python with open-flamingo and transformers 4.33")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        theirs = run_openflamingo(args, Path(folder)) if args.openflamingo_python else None
        model = build(args, Path(folder) / "checkpoint.pt" if theirs else None)
        inputs = torch.load(Path(folder) / "inputs.pt", weights_only=True) if theirs else prompts(args)
    rows = [measure(model, inputs, count, args, theirs) for count in COUNTS]
    print("\nms per generated token (greedy, batch 1); media keys/values projected once vs at every step")
    print("images  once ms  every step ms  x faster  OpenFlamingo ms  x faster  same tokens")
    for row in rows:
        once, every = 1e3 * row["once_s"], 1e3 * row["every_step_s"]
        line = f"{row['images']:6d}  {once:7.2f}  {every:13.2f}  {row['speedup']:8.2f}"
        if "openflamingo_s" in row:
            ratio = row["openflamingo_s"] / row["once_s"]
            line += f"  {1e3 * row['openflamingo_s']:15.2f}  {ratio:8.2f}  {row['same_tokens']:>11}"
        print(line)
    out = Path(__file__).resolve().parent / "results" / "hf_generation.json"
    out.parent.mkdir(exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    machine["threads"] = torch.get_num_threads()
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")


def measure(model: Flamingo, inputs: dict, count: int, args: argparse.Namespace, theirs: dict | None) -> dict:
    """One row: ours with media projected once, ours re-projecting at every step, OpenFlamingo's."""
    text, images = inputs[f"text_{count}"], inputs[f"images_{count}"]
    row = {"images": count, **per_token(model, text, images, args)}
    row["speedup"] = row["every_step_s"] / row["once_s"]
    if theirs is not None:
        their = next(r for r in theirs["rows"] if r["images"] == count)
        ours = generate(model, text, images, args.new)[0, text.shape[1] :].tolist()
        row["same_tokens"] = f"{sum(a == b for a, b in zip(ours, their['tokens']))}/{args.new}"
        row["openflamingo_s"], row["openflamingo_torch"] = their["openflamingo_s"], theirs["torch"]
    print(f"{count} images: {row}", flush=True)
    return row


def run_openflamingo(args: argparse.Namespace, folder: Path) -> dict:
    """Run openflamingo_generation.py in OpenFlamingo's own Python: its times, tokens, weights and inputs."""
    script = Path(__file__).resolve().parent / "openflamingo_generation.py"
    sizes = [f"--{name}={getattr(args, name)}" for name in ("layers", "dim", "prompt", "new", "reps", "threads")]
    command = [args.openflamingo_python, str(script), *sizes, f"--save={folder}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def reproject_every_step(state: MediaState, block, rows: int):
    """``MediaState.keys_values`` without its cache: every call projects the media again."""
    state.projected.pop(id(block), None)
    return project_once_original(state, block, rows)


project_once_original = MediaState.keys_values

if __name__ == "__main__":
    main()
