"""OpenFlamingo's own ``generate``: time per generated token, and the weights and tokens ``hf_generation.py`` checks.

Runs in OpenFlamingo's environment, not ours (its ``generate`` needs transformers 4.33):

    python -m venv /tmp/venvof
    /tmp/venvof/bin/pip install torch==2.4.1 transformers==4.33.3 "numpy<2" einops einops-exts open_clip_torch==2.23.0
    /tmp/venvof/bin/pip install --no-deps open-flamingo==2.0.1
    python benchmarks/hf_generation.py --openflamingo-python /tmp/venvof/bin/python

``hf_generation.py`` starts this script as a separate process and reads its JSON from stdout. The
model: a random Llama (``--layers``, width ``--dim``), a gated block before every layer (OpenFlamingo's
``cross_attn_every_n_layers=1``) with its gates opened to tanh(0.5), its Perceiver (depth 6, 64
latents), and a one-layer open_clip ViT giving 256 patch tokens of width ``--dim`` per 224 x 224
image; greedy decoding of a ``--prompt``-token prompt holding 1, 4 or 8 images, batch 1, float32.
With ``--save DIR`` it writes the model's whole ``state_dict`` (``DIR/checkpoint.pt``, the file
``load_openflamingo`` reads) and the prompts and images (``DIR/inputs.pt``), and reports the tokens
it generated, so that our side runs the same weights on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from openflamingo_sizes import COUNTS, END_OF_CHUNK, MEDIA, language_model, prompts, vision_encoder


def build(args: argparse.Namespace) -> Flamingo:
    lm, clip = language_model(args), vision_encoder(args)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    clip.visual.output_tokens = True  # patch tokens, as OpenFlamingo's factory sets it
    model = Flamingo(clip, lm, END_OF_CHUNK, MEDIA, vis_dim=args.dim, cross_attn_every_n_layers=1).eval()
    with torch.no_grad():
        for layer in lm.gated_cross_attn_layers:
            layer.attn_gate.fill_(0.5)
            layer.ff_gate.fill_(0.5)
    return model


def seconds(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    generated(model, text, images, new)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 4), ("dim", 512), ("prompt", 512), ("new", 32), ("reps", 3), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--save", type=Path, default=None, help="write checkpoint.pt and inputs.pt here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    rows, inputs = [], prompts(args)
    for count in COUNTS:
        text, images = inputs[f"text_{count}"], inputs[f"images_{count}"][:, :, None]  # (b, t, frames, c, H, W)
        tokens = generated(model, text, images, args.new)
        seconds(model, text, images, 2)  # warm-up
        long = statistics.median(seconds(model, text, images, args.new + 1) for _ in range(args.reps))
        short = statistics.median(seconds(model, text, images, 1) for _ in range(args.reps))
        rows.append({"images": count, "openflamingo_s": (long - short) / args.new, "tokens": tokens})
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save / "checkpoint.pt")
        torch.save(inputs, args.save / "inputs.pt")
    print(json.dumps({"torch": torch.__version__, "rows": rows}))


def generated(model: Flamingo, text: torch.Tensor, images: torch.Tensor, new: int) -> list[int]:
    """The new tokens of a greedy ``generate`` that never stops early."""
    out = model.generate(
        vision_x=images,
        lang_x=text,
        attention_mask=torch.ones_like(text),
        max_new_tokens=new,
        min_new_tokens=new,
        num_beams=1,
        pad_token_id=0,
        suppress_tokens=[MEDIA],  # as ours never generates <image>
    )
    return out[0, text.shape[1] :].tolist()


if __name__ == "__main__":
    main()
