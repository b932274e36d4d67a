"""Where one decoding step of Flamingo over a transformers Llama spends its time, above the Llama's own step.

    python benchmarks/decode_step.py [--images 8] [--threads 1] [--rounds 8] [--steps 150]

The model and prompt of ``hf_generation.py`` (a random 4-layer, width-512 Llama, a gated block before
every layer with its gates opened, 64 latents per image, a 512-token prompt holding ``--images``
images), prefilled once; then one new token's forward through the language model with its key/value
cache, the cache cut back after each step. Five variants of that step, their timings alternating
round by round (so that load on a shared machine falls on all alike), medians over rounds of the
median step of each round:

    plain Llama        no media: the fusion layers pass straight through to the Llama's layers (same cache)
    media state        the forward pre-hook and the fusion layers run, every gated block returns x
    block matmuls      each block runs only its four matmuls (to_q, to_out, the feed-forward's two)
    no cross-attention each block runs all but the attention itself (norms, GELU, gates)
    ours               the gated blocks as they are

Each variant replaces ``GatedCrossAttentionBlock.forward_projected`` for its rounds. Prints a table
and writes JSON to benchmarks/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hf_generation import build
from openflamingo_sizes import prompts
from transformers import DynamicCache

from flamingo_pytorch.cross_attention import GatedCrossAttentionBlock


def media_state(block, x, k, v, index, time_mask, layout=None):
    return x


def block_matmuls(block, x, k, v, index, time_mask, layout=None):
    attended = block.attn.to_out(block.attn.to_q(x))
    return block.ff[3](block.ff[1](x + attended))


def no_cross_attention(block, x, k, v, index, time_mask, layout=None):
    attended = block.attn.to_out(block.attn.to_q(block.attn.norm(x)))
    return block.gated_ff(x + block.attn_gate.tanh() * attended)


OURS = GatedCrossAttentionBlock.forward_projected
VARIANTS = {  # name: (with the media, the gated block's forward_projected)
    "plain Llama": (False, OURS),
    "media state": (True, media_state),
    "block matmuls": (True, block_matmuls),
    "no cross-attention": (True, no_cross_attention),
    "ours": (True, OURS),
}


def step_timer(model, text: torch.Tensor, images: torch.Tensor):
    """A function timing one step (seconds) with or without the media, after prefilling the prompt once
    (which also projects the media keys and values, kept for every step as in ``generate``)."""
    media, state = model.encode_media(text, images, None, None), model.state
    cache, mask = DynamicCache(config=model.lm.config), torch.ones(1, text.shape[1] + 1, dtype=torch.long)
    new_token, position = torch.tensor([[17]]), torch.tensor([text.shape[1]])
    with model.media(media, None):
        model.lm(input_ids=text, attention_mask=mask[:, :-1], cache=cache, use_cache=True)
        counts, projected = state.counts, dict(state.projected)

    def step(with_media: bool) -> float:
        state.clear()
        if with_media:  # the state as the prompt left it
            state.media, state.counts, state.projected = media, counts, projected
        start = time.perf_counter()
        model.lm(input_ids=new_token, attention_mask=mask, cache=cache, use_cache=True, cache_position=position)
        seconds = time.perf_counter() - start
        state.clear()
        cache.crop(-1)  # back to the prompt
        return seconds

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("images", 8), ("threads", 1), ("rounds", 8), ("steps", 150), ("layers", 4), ("dim", 512)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.prompt = 512
    model = build(args, None)
    inputs = prompts(args)
    step = step_timer(model, inputs[f"text_{args.images}"], inputs[f"images_{args.images}"])
    medians = {name: [] for name in VARIANTS}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, (with_media, forward) in VARIANTS.items():
                GatedCrossAttentionBlock.forward_projected = forward
                try:
                    medians[name].append(statistics.median(step(with_media) for _ in range(args.steps)))
                finally:
                    GatedCrossAttentionBlock.forward_projected = OURS
    ms = {name: 1e3 * statistics.median(times[1:]) for name, times in medians.items()}
    print(f"\none decoding step at {args.images} images, {torch.get_num_threads()} threads (ms)")
    print("variant              ms      + ms")
    previous = None
    for name, value in ms.items():
        added = "" if previous is None else f"{value - previous:+8.2f}"
        print(f"{name:18s}  {value:6.2f}  {added}")
        previous = value
    out = Path(__file__).resolve().parent / "results" / "decode_step.json"
    out.parent.mkdir(exist_ok=True)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "ms": ms}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
