"""Train a small Flamingo on generated shapes and show that it reads the images.

    python examples/train_shapes.py                                 # 1 to 2 minutes on 2 CPU cores
    torchrun --nproc_per_node=2 examples/train_shapes.py            # the same, DistributedDataParallel
    python examples/train_shapes.py --eval-only --checkpoint out/flamingo_shapes.safetensors
    python examples/train_shapes.py --lm llama                      # a transformers Llama as the language model

The paper's recipe in miniature (see shapes_dataset.py for the task):
  1b. pretrain the image encoder to name each image's attributes, then freeze it;
  1.  pretrain the PaLM decoder on the question/answer text alone (image tokens, no images);
  2.  train only the Perceiver Resampler and the gated cross-attention blocks on few-shot
      sequences of 4 images, the language model and image encoder frozen.
Then exact-match accuracy on held-out images: with the images, with each slot shown the previous
slot's image, with blank images, and with text alone.

Under torchrun every rank draws its own data; only the parameters that train in a stage are
handed to DistributedDataParallel, so no ``find_unused_parameters`` is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules sit next to this file

from shapes_dataset import ANSWER_OFFSET, Batch, make_batch, make_labelled_images, make_tokenizer
from shapes_encoder import AttributeClassifier, ShapesEncoder, attribute_loss
from shapes_eval import answer_slots, evaluate, format_table
from shapes_hf import ShapesFlamingo, build_llama
from shapes_plots import save_figure
from word_tokenizer import WordTokenizer

from flamingo_pytorch import FlamingoPaLM

MODEL = dict(
    dim=64,
    depth=4,
    dim_head=16,
    heads=4,
    ff_mult=2,
    cross_attn_every=2,
    perceiver_num_latents=8,
    perceiver_depth=1,
)
NUM_IMAGES = 4  # images per training sequence, few-shot style
BATCH_SIZE = 32  # sequences (or single images, for the encoder) per rank and step
EVAL_SEED, EVAL_SEQUENCES = 2**31 - 1, 512  # the held-out set: the same for every run
CHECKPOINT, FIGURE, RESULTS = "flamingo_shapes.safetensors", "flamingo_shapes.png", "results.json"


@dataclass
class Runtime:
    """Where this process runs: its rank among ``world_size`` processes, device, precision."""

    rank: int
    world_size: int
    device: torch.device
    amp: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="encoder and Flamingo steps (the LM gets half)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the checkpoint, figure and results")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--lm",
        choices=("palm", "llama"),
        default="palm",
        help="the language model: the package's PaLM, or a transformers Llama",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint instead of training")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint written by this script")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.eval_only and args.checkpoint is None:
        parser.error("--eval-only needs --checkpoint PATH")
    return args


def start_runtime(args: argparse.Namespace) -> Runtime:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The matrices are tiny: more threads barely help, and they stall badly on a busy machine.
        torch.set_num_threads(1)
    return Runtime(rank, world_size, device, args.amp)


def progress(steps: int, description: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("the demo's progress bar needs tqdm: pip install tqdm") from error
    return tqdm(range(steps), desc=description, disable=not enabled, dynamic_ncols=True)


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over 5% of the steps, then cosine decay to 10%."""
    warmup = max(1, steps // 20)
    return lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(step / steps, 1.0)))


def train_stage(
    description: str,
    module: nn.Module,
    parameters: list[nn.Parameter],
    loss_fn: Callable[..., Tensor],
    next_batch: Callable[[], tuple[Tensor, ...]],
    steps: int,
    lr: float,
    runtime: Runtime,
) -> list[float]:
    """Train ``parameters`` (exactly those of ``module`` that require grad) for ``steps``; -> losses.

    Under torchrun the module is wrapped in DistributedDataParallel here, so freeze what must not
    train before calling: DDP syncs the gradients of the parameters that require grad at wrapping time.
    """
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    if trainable != {id(p) for p in parameters}:
        raise ValueError(f"{description}: the parameters to train must be exactly those that require grad")
    net = module
    if runtime.world_size > 1:
        net = DistributedDataParallel(module, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    losses = []
    bar = progress(steps, description, enabled=runtime.rank == 0)
    for _ in bar:
        batch = [x.to(runtime.device) for x in next_batch()]
        with runtime.autocast():
            loss = loss_fn(net, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on weights a later stage freezes
    return losses


def next_token_loss(logits: Tensor, text: Tensor) -> Tensor:
    """Cross-entropy of logits (b, n, v) at positions 0..n-2 against text (b, n) at 1..n-1."""
    return F.cross_entropy(rearrange(logits[:, :-1].float(), "b n v -> (b n) v"), text[:, 1:].flatten())


def build_model(config: dict, encoder: nn.Module) -> FlamingoPaLM:
    """FlamingoPaLM from the demo's config; it freezes ``encoder`` and keeps it in eval mode."""
    return FlamingoPaLM(**config, img_encoder=encoder)


def model_config(tokenizer: WordTokenizer) -> dict:
    """FlamingoPaLM's keyword arguments for the shapes task."""
    return dict(
        MODEL, num_tokens=len(tokenizer), media_token_id=tokenizer.image_id, perceiver_num_time_embeds=NUM_IMAGES
    )


def train(args: argparse.Namespace, runtime: Runtime) -> tuple[FlamingoPaLM, dict, dict[str, list[float]]]:
    """The three stages; -> the trained model, its config and the loss curves."""
    tokenizer = make_tokenizer()
    config = model_config(tokenizer)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    data = torch.Generator().manual_seed(1000 * args.seed + runtime.rank)  # different data on every rank
    encoder = ShapesEncoder(dim=config["dim"]).to(runtime.device)
    losses = {"encoder": pretrain_encoder(encoder, args.steps, data, runtime)}
    if args.lm == "llama":
        config["lm"] = "llama"
        llama = build_llama(config).to(runtime.device)
        losses["lm"] = pretrain_llama(llama, max(1, args.steps // 2), tokenizer, data, runtime)
        model = ShapesFlamingo(llama, encoder, config).to(runtime.device)  # freezes the Llama and the encoder
    else:
        model = build_model(config, encoder).to(runtime.device)  # freezes the encoder
        losses["lm"] = pretrain_language_model(model, max(1, args.steps // 2), tokenizer, data, runtime)
    losses["flamingo"] = train_flamingo(model, args.steps, tokenizer, data, runtime)
    return model, config, losses


def pretrain_encoder(encoder: ShapesEncoder, steps: int, data: torch.Generator, runtime: Runtime) -> list[float]:
    """Stage 1b: the encoder and a throwaway attribute head, on single labelled images."""
    classifier = AttributeClassifier(encoder).to(runtime.device)
    return train_stage(
        "1b image encoder",
        classifier,
        list(classifier.parameters()),
        attribute_loss,
        lambda: make_labelled_images(BATCH_SIZE, data),
        steps,
        6e-3,
        runtime,
    )


def pretrain_language_model(
    model: FlamingoPaLM, steps: int, tokenizer: WordTokenizer, data: torch.Generator, runtime: Runtime
) -> list[float]:
    """Stage 1: the PaLM decoder on the question/answer text alone, image tokens included.

    Only ``model.palm`` goes to DDP: the resampler and gated blocks take no part in a text-only
    pass, and DDP would wait for their gradients.
    """
    model.set_flamingo_mode(False)
    return train_stage(
        "1  language model",
        model.palm,
        list(model.palm.parameters()),
        lambda palm, text: next_token_loss(palm(text), text),
        lambda: (make_batch(BATCH_SIZE, NUM_IMAGES, tokenizer, data).text,),
        steps,
        3e-3,
        runtime,
    )


def pretrain_llama(
    llama: nn.Module, steps: int, tokenizer: WordTokenizer, data: torch.Generator, runtime: Runtime
) -> list[float]:
    """Stage 1 with ``--lm llama``: the plain Llama on the question/answer text alone."""
    return train_stage(
        "1  language model (Llama)",
        llama,
        list(llama.parameters()),
        lambda lm, text: next_token_loss(lm(input_ids=text).logits, text),
        lambda: (make_batch(BATCH_SIZE, NUM_IMAGES, tokenizer, data).text,),
        steps,
        3e-3,
        runtime,
    )


def train_flamingo(
    model: FlamingoPaLM, steps: int, tokenizer: WordTokenizer, data: torch.Generator, runtime: Runtime
) -> list[float]:
    """Stage 2: few-shot image/text sequences; only the resampler and gated blocks train.

    The language model is frozen *before* DDP wraps the model, so DDP registers exactly
    ``flamingo_parameters()`` (it syncs the parameters that require grad when it is built).
    """
    model.set_flamingo_mode(True)

    def next_batch() -> tuple[Tensor, Tensor]:
        batch = make_batch(BATCH_SIZE, NUM_IMAGES, tokenizer, data)
        return batch.text, batch.images

    return train_stage(
        "2  flamingo",
        model,
        list(model.flamingo_parameters()),
        lambda net, text, images: next_token_loss(net(text, images), text),
        next_batch,
        steps,
        2e-3,
        runtime,
    )


def held_out_set() -> list[Batch]:
    """The held-out sequences, drawn from their own seed: the same images in every run."""
    tokenizer, generator = make_tokenizer(), torch.Generator().manual_seed(EVAL_SEED)
    return [make_batch(128, NUM_IMAGES, tokenizer, generator) for _ in range(EVAL_SEQUENCES // 128)]


def save_checkpoint(path: Path, model: FlamingoPaLM, config: dict, losses: dict) -> None:
    try:
        from safetensors.torch import save_model
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("saving the checkpoint needs safetensors: pip install safetensors") from error
    metadata = {"config": json.dumps(config), "losses": json.dumps(losses)}
    save_model(model, str(path), metadata=metadata)  # handles the tied embedding / output weights


def load_checkpoint(path: Path, device: torch.device) -> tuple[FlamingoPaLM, dict, dict]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_model
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("loading the checkpoint needs safetensors: pip install safetensors") from error
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    config = json.loads(metadata["config"])
    if config.get("lm") == "llama":
        model = ShapesFlamingo(build_llama(config), ShapesEncoder(dim=config["dim"]), config)
    else:
        model = build_model(config, ShapesEncoder(dim=config["dim"]))
    load_model(model, str(path), device=str(device))
    return model.to(device), config, json.loads(metadata["losses"])


def report(model: FlamingoPaLM, losses: dict, args: argparse.Namespace, runtime: Runtime) -> dict:
    """Evaluate on the held-out set, print the table, write the figure and results.json."""
    batches = held_out_set()
    results = evaluate(model, batches, amp=runtime.amp)
    print(format_table(results))
    first = batches[0]
    first = Batch(first.text.to(runtime.device), first.images.to(runtime.device), first.questions)
    with torch.no_grad(), runtime.autocast():
        _, answers = answer_slots(model, first, "images")  # (b, t, 2)
    shown = slice(0, 4)  # the 4 slots of the first 4 sequences
    truths = first.text[shown].view(4, NUM_IMAGES, -1)[..., ANSWER_OFFSET]  # (4, t): the answer tokens
    save_figure(
        args.out / FIGURE,
        losses,
        first.images[shown].flatten(0, 1).cpu(),
        first.questions[shown].flatten(),
        answers[shown, :, 0].flatten().cpu(),
        truths.flatten().cpu(),
        make_tokenizer(),
    )
    (args.out / RESULTS).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / FIGURE} and {args.out / RESULTS}")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; -> the accuracy table as {setting: {question: accuracy}} (empty on ranks > 0)."""
    args = parse_args(argv)
    runtime = start_runtime(args)
    try:
        if args.eval_only:
            model, _, losses = load_checkpoint(args.checkpoint, runtime.device)
        else:
            model, config, losses = train(args, runtime)
        results = {}
        if runtime.rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            if not args.eval_only:
                save_checkpoint(args.out / CHECKPOINT, model, config, losses)
                print(f"saved {args.out / CHECKPOINT}")
            results = report(model, losses, args, runtime)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's evaluation
        return results
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
