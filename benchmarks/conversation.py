"""A chat, turn by turn: our conversation (``prefill`` / ``extend`` / ``generate_from``, each turn running
only its own tokens and images) against generating each reply from scratch over the whole conversation
so far (``Flamingo.generate``, and OpenFlamingo's own ``generate``, which has no other way), on the same
weights.

    python benchmarks/conversation.py [--layers 4] [--dim 512] [--turns 6] [--turn 48] [--reply 16] [--reps 3]

The model is ``hf_generation.py``'s (``openflamingo_generation.py``): OpenFlamingo 2.0.1's Flamingo over
a random Llama (``--layers`` layers, width ``--dim``), a gated block before every layer, a 6-layer
Perceiver, a one-layer open_clip ViT (256 patches per 224 x 224 image); ours is ``load_openflamingo`` of
its ``state_dict``. Each turn is ``--turn`` random tokens opening with an ``<image>`` and one new image,
then a greedy reply of ``--reply`` tokens; batch 1, CPU float32. Within a turn the three routes run one
after the other, so that a change in a shared machine's load hits all alike; the conversation is run
``--reps`` + 1 times (the first warms up), and each "x" is a ratio of per-turn medians. The replies of
the three routes are compared token for token. Prints a table and writes JSON to
benchmarks/results/conversation.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import open_flamingo  # noqa: F401  (fail here, before building anything, when it is missing)
import openflamingo_generation as theirs
import torch
from common import write_rows
from openflamingo_sizes import MEDIA

from flamingo_pytorch import Flamingo
from flamingo_pytorch.openflamingo import load_openflamingo

ROUTES = ("conversation_s", "regenerate_s", "openflamingo_s")


def turns(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each turn's text (1, --turn), an <image> first, and its image (1, 1, 3, 224, 224); seed 1."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(args.turns):
        text = torch.randint(5, 1000, (1, args.turn), generator=generator)
        text[0, 0] = MEDIA
        out.append((text, torch.randn(1, 1, 3, 224, 224, generator=generator)))
    return out


def regenerate(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> torch.Tensor:
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    return model.generate(text, images, attention_mask=torch.ones_like(text), **kwargs)[:, text.shape[1] :]


def run_once(ours: Flamingo, their_model, chat: list, args: argparse.Namespace) -> tuple[list[dict], list[bool]]:
    """One whole conversation: per turn, each route's seconds; and whether all three replies agree."""
    seconds, agree, state = [], [], None
    history, images = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3, 224, 224)
    for text, image in chat:
        start = time.perf_counter()
        state = ours.prefill(text, image) if state is None else ours.extend(state, text, image)
        reply = ours.generate_from(state, max_new_tokens=args.reply, temperature=0)
        times = {"conversation_s": time.perf_counter() - start}
        history, images = torch.cat((history, text), dim=1), torch.cat((images, image), dim=1)
        start = time.perf_counter()
        again = regenerate(ours, history, images, args.reply)
        times["regenerate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            other = theirs.generate(their_model, history, images, args.reply)[:, history.shape[1] :]
        times["openflamingo_s"] = time.perf_counter() - start
        seconds.append(times)
        agree.append(torch.equal(reply, again) and torch.equal(reply, other))
        history = torch.cat((history, reply), dim=1)
    return seconds, agree


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = (("layers", 4), ("dim", 512), ("turns", 6), ("turn", 48), ("reply", 16), ("reps", 3), ("threads", 0))
    for name, default in defaults:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "conversation.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    their_model, lm, clip = theirs.build(args)
    ours = load_openflamingo(their_model.state_dict(), lm, media_token_id=MEDIA, vision_encoder=clip)
    chat = turns(args)
    runs = [run_once(ours, their_model, chat, args) for _ in range(args.reps + 1)][1:]  # the first warms up
    rows = []
    for k in range(args.turns):
        row = {"turn": k + 1, "images": k + 1, "context_tokens": (k + 1) * args.turn + k * args.reply}
        row.update({route: statistics.median(run[0][k][route] for run in runs) for route in ROUTES})
        row["vs_regenerate"] = row["regenerate_s"] / row["conversation_s"]
        row["vs_openflamingo"] = row["openflamingo_s"] / row["conversation_s"]
        row["same_replies"] = all(run[1][k] for run in runs)
        rows.append(row)
    print(f"\nseconds per turn (its tokens and image in, a {args.reply}-token greedy reply out; batch 1)")
    print("turn  images  context  conversation  regenerate  x faster  OpenFlamingo  x faster  same replies")
    for row in rows:
        print(
            f"{row['turn']:4d}  {row['images']:6d}  {row['context_tokens']:7d}  {row['conversation_s']:12.3f}  "
            f"{row['regenerate_s']:10.3f}  {row['vs_regenerate']:8.2f}  {row['openflamingo_s']:12.3f}  "
            f"{row['vs_openflamingo']:8.2f}  {row['same_replies']!s:>12}"
        )
    write_rows(args.out, args, rows)
    return rows


if __name__ == "__main__":
    main()
