"""Generation speed: cached vs uncached vs the published flamingo-pytorch 0.1.2 (repeated full forwards).

    PYTHONPATH=. python benchmarks/generation.py            # about 3-5 minutes on 2 quiet CPU cores
    PYTHONPATH=. python benchmarks/generation.py --quick    # a smoke run with a tiny model

Greedy decoding, batch 1, CPU float32, 2 threads, precomputed image features (256 patches per
image) so that every route does the same work. Prints a table and writes JSON. ``--device cuda``
and ``--dtype bfloat16`` run every route on a GPU and/or with the model's weights in bf16.

The routes:
    cached    FlamingoPaLM.generate: media encoded and projected once, one KV-cached step per token.
    uncached  FlamingoPaLM.generate(use_cache=False): the whole model over the whole sequence per token.
    0.1.2     the published package, which can only re-run its forward per token. It runs in its own
              process (same import name) from ``--ref-path``; install it there with
              ``pip install --no-deps --target /tmp/ref012 flamingo-pytorch==0.1.2``.
The uncached routes are timed over their first ``--uncached-steps`` new tokens only: later tokens
see a longer sequence and cost more, so their tokens/s are upper bounds and the speedups of the
cached route over them are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

MODEL = dict(num_tokens=20000, dim=512, depth=6, dim_head=64, heads=8, ff_mult=4, media_token_id=3, cross_attn_every=3)
PERCEIVER = dict(perceiver_num_latents=64, perceiver_depth=2)
PATCHES = 256
QUICK_MODEL = dict(
    num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, ff_mult=2, media_token_id=3, cross_attn_every=1
)
QUICK_PERCEIVER = dict(perceiver_num_latents=8, perceiver_depth=1)
REF_WORKAROUNDS = [
    "img_encoder=torch.nn.Identity(): img_encoder=None crashes 0.1.2's constructor (None.eval())",
    "features passed as images= (the Identity encoder passes them through): embeds= raises NameError (`video`)",
    "perceiver_resampler.media_pos_emb enlarged to 16 items: 0.1.2 hard-codes 4 and fails on 8 images",
    "forward called keyword-only (images=...), under torch.inference_mode()",
]


def make_prompt(length: int, num_images: int, dim: int, num_tokens: int, media_token_id: int, place: dict):
    """A random prompt of ``length`` tokens with ``num_images`` media tokens spread over it, and features.

    ``place``: the device and dtype of the model, e.g. ``dict(device="cuda", dtype=torch.bfloat16)``.
    """
    generator = torch.Generator().manual_seed(length * 100 + num_images)
    text = torch.randint(4, num_tokens, (1, length), generator=generator)
    text[0, torch.linspace(0, length - 8, num_images).long()] = media_token_id
    embeds = torch.randn(1, num_images, PATCHES, dim, generator=generator)
    return text.to(place["device"]), embeds.to(**place)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run (GPU work included)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def placement(device: str, dtype: str) -> dict:
    """``to()`` arguments from the device and dtype names given on the command line."""
    return dict(device=device, dtype=getattr(torch, dtype))


def build_ours(model_config: dict, perceiver_config: dict, num_time_embeds: int, place: dict):
    from flamingo_pytorch import FlamingoPaLM

    torch.manual_seed(0)
    model = FlamingoPaLM(**model_config, **perceiver_config, perceiver_num_time_embeds=num_time_embeds).eval()
    for block in model.gated_cross_attn:  # open the gates, as after training
        torch.nn.init.constant_(block.attn_gate, 0.5)
        torch.nn.init.constant_(block.ff_gate, 0.5)
    return model.to(**place)


def run_cases(args, model_config: dict, perceiver_config: dict, cases: list) -> tuple[list[dict], dict]:
    """Each case's routes back to back (ours, then 0.1.2 in its process), so they share the machine's load."""
    place = placement(args.device, args.dtype)
    model = build_ours(model_config, perceiver_config, num_time_embeds=16, place=place)
    rows, reference = [], {}
    for length, num_images in cases:
        text, embeds = make_prompt(length, num_images, model_config["dim"], **token_ids(model_config), place=place)
        media = dict(image_embeds=embeds, temperature=0)
        cached = partial(model.generate, text, max_new_tokens=args.new_tokens, **media)
        uncached = partial(model.generate, text, max_new_tokens=args.uncached_steps, use_cache=False, **media)
        prefill = partial(model.prefill, text, image_embeds=embeds, max_new_tokens=args.new_tokens)
        cached_s = timed(cached, args.repeats)
        uncached_s = timed(uncached, 1)
        prefill_s = timed(prefill, args.repeats)
        reference = run_reference(args, model_config, perceiver_config, [(length, num_images)])
        rows.append(
            dict(
                prompt=length,
                images=num_images,
                cached_tokens_per_s=args.new_tokens / cached_s,
                cached_total_s=cached_s,
                cached_prefill_s=prefill_s,
                uncached_tokens_per_s=args.uncached_steps / uncached_s,
                reference_tokens_per_s=reference["rows"][0]["tokens_per_s"] if "rows" in reference else None,
            )
        )
        print(f"  prompt {length}, {num_images} images: cached {cached_s:.2f}s, uncached {uncached_s:.2f}s")
    reference.pop("rows", None)
    return rows, reference


def token_ids(model_config: dict) -> dict:
    return dict(num_tokens=model_config["num_tokens"], media_token_id=model_config["media_token_id"])


def step_time_by_images(args, model_config: dict, perceiver_config: dict, length: int) -> list[dict]:
    """Median time of one cached decoding step after a prompt with 1, 4 and 16 images."""
    place = placement(args.device, args.dtype)
    model = build_ours(model_config, perceiver_config, num_time_embeds=16, place=place)
    rows = []
    for num_images in (1, 4, 16):
        text, embeds = make_prompt(length, num_images, model_config["dim"], **token_ids(model_config), place=place)
        state = model.prefill(text, image_embeds=embeds, max_new_tokens=args.step_tokens * 4)
        step_s = timed(
            lambda state=state: model.generate_from(state, max_new_tokens=args.step_tokens, temperature=0), 3
        )
        rows.append(dict(prompt=length, images=num_images, step_ms=step_s / args.step_tokens * 1e3))
    return rows


def settings(args, model_config: dict, perceiver_config: dict) -> dict:
    """What both implementations run with: the sizes, CPU threads, device and dtype."""
    return dict(
        model=model_config, perceiver=perceiver_config, threads=args.threads, device=args.device, dtype=args.dtype
    )


def run_reference(args, model_config: dict, perceiver_config: dict, cases: list) -> dict:
    """Time 0.1.2 in a separate process, where its flamingo_pytorch shadows ours."""
    if not (Path(args.ref_path) / "flamingo_pytorch").is_dir():
        print(f"  0.1.2 not found under {args.ref_path}: skipped (see the module docstring to install it)")
        return dict(skipped=f"flamingo-pytorch 0.1.2 not found under {args.ref_path}")
    job = dict(settings(args, model_config, perceiver_config), cases=cases, steps=args.uncached_steps)
    env = dict(os.environ, PYTHONPATH=args.ref_path)
    command = [sys.executable, __file__, "--ref-worker", json.dumps(job)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:])
        return dict(skipped=f"0.1.2 worker failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_worker(job: dict) -> None:
    """Inside the 0.1.2 process: greedy decoding by repeated full forwards (all 0.1.2 can do)."""
    import flamingo_pytorch

    torch.set_num_threads(job["threads"])
    from flamingo_pytorch import FlamingoPaLM

    model_config, perceiver_config = dict(job["model"]), job["perceiver"]
    torch.manual_seed(0)
    model = FlamingoPaLM(**model_config, **perceiver_config, img_encoder=torch.nn.Identity()).eval()
    resampler = model.perceiver_resampler
    resampler.media_pos_emb = torch.nn.Parameter(torch.randn(16, 1, model_config["dim"]))
    place = placement(job["device"], job["dtype"])
    model.to(**place)
    media_token_id = model_config["media_token_id"]
    rows = []
    for length, num_images in job["cases"]:
        text, embeds = make_prompt(length, num_images, model_config["dim"], **token_ids(model_config), place=place)

        def decode(text=text, embeds=embeds):
            tokens = text
            with torch.inference_mode():
                for _ in range(job["steps"]):
                    logits = model(tokens, images=embeds)[:, -1]
                    logits[:, media_token_id] = float("-inf")
                    tokens = torch.cat((tokens, logits.argmax(dim=-1, keepdim=True)), dim=1)

        rows.append(dict(prompt=length, images=num_images, tokens_per_s=job["steps"] / timed(decode, 1)))
    print(json.dumps(dict(version_file=flamingo_pytorch.__file__, rows=rows, workarounds=REF_WORKAROUNDS)))


def print_tables(result: dict) -> None:
    steps = result["uncached_steps_timed"]
    where = f"{result['device']} {result['dtype']}, {result['threads']} CPU threads"
    print(f"\nGreedy decoding, {result['new_tokens']} new tokens, batch 1, {where}")
    print(f"(uncached routes: tokens/s over their first {steps} new tokens, an upper bound)\n")
    print("| prompt | images | cached tok/s | uncached tok/s | 0.1.2 tok/s | cached / uncached | cached / 0.1.2 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        ref_speed = row["reference_tokens_per_s"]
        ref_text = f"{ref_speed:.2f}" if ref_speed else "n/a"
        ratio = f"{row['cached_tokens_per_s'] / ref_speed:.0f}x" if ref_speed else "n/a"
        print(
            f"| {row['prompt']} | {row['images']} | {row['cached_tokens_per_s']:.1f} | "
            f"{row['uncached_tokens_per_s']:.2f} | {ref_text} | "
            f"{row['cached_tokens_per_s'] / row['uncached_tokens_per_s']:.0f}x | {ratio} |"
        )
    print("\nCached decoding step as the number of images grows\n")
    print("| prompt | images | ms per step |")
    print("|---:|---:|---:|")
    for row in result["step_time_by_images"]:
        print(f"| {row['prompt']} | {row['images']} | {row['step_ms']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--uncached-steps", type=int, default=8, help="new tokens timed on the uncached routes")
    parser.add_argument("--step-tokens", type=int, default=32, help="decoding steps timed per image count")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many cached runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's weights")
    parser.add_argument("--ref-path", default="/tmp/ref012", help="where flamingo-pytorch 0.1.2 is installed")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/generation[_quick].json)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and short prompts, for a smoke run")
    parser.add_argument("--ref-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ref_worker is not None:
        return reference_worker(json.loads(args.ref_worker))
    torch.set_num_threads(args.threads)
    model_config, perceiver_config = (QUICK_MODEL, QUICK_PERCEIVER) if args.quick else (MODEL, PERCEIVER)
    cases = [(16, 1), (32, 2)] if args.quick else [(128, 1), (128, 8), (512, 1), (512, 8)]
    if args.quick:
        args.new_tokens, args.uncached_steps, args.step_tokens, args.repeats = 8, 2, 4, 1
    print(f"torch {torch.__version__}, {args.threads} threads, {args.device} {args.dtype}; model {model_config}")
    rows, reference = run_cases(args, model_config, perceiver_config, cases)
    result = dict(
        settings(args, model_config, perceiver_config),
        patches_per_image=PATCHES,
        new_tokens=args.new_tokens,
        uncached_steps_timed=args.uncached_steps,
        gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
        torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
        rows=rows,
        reference_0_1_2=reference,
        step_time_by_images=step_time_by_images(args, model_config, perceiver_config, cases[-1][0]),
    )
    print_tables(result)
    for note in result["reference_0_1_2"].get("workarounds", []):
        print(f"0.1.2 workaround: {note}")
    if args.out is None:
        suffix = ("_quick" if args.quick else "") + ("" if args.device == "cpu" else f"_{args.device}")
        args.out = str(Path(__file__).parent / "results" / f"generation{suffix}.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
