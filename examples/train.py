"""Train Flamingo at scale: FSDP2, DDP or one device; shards or synthetic data; resumable.

    python examples/train.py --config run.json                          # one device
    torchrun --nproc_per_node=8 examples/train.py --config run.json     # FSDP2 over 8 GPUs (nccl)
    torchrun --nproc_per_node=2 examples/train.py --config run.json --strategy ddp

A JSON config holds any of the flags below (same names, ``-`` written ``_``); flags override it.
The model is a ``FlamingoPaLM`` (``--model palm``, sizes from ``palm``, its encoder a frozen patch
embedding or a timm/open_clip model) or ``Flamingo`` over a transformers LM (``--model hf --lm PATH``).
Data come from webdataset shards (``--shards``, read by ``flamingo_pytorch.data.DocumentLoader``)
or are random tokens and images (``--synthetic``, for speed and memory runs). Every ``--save-every``
steps all ranks write a distributed checkpoint (trained weights, optimizer, schedule, step, data
position) to ``OUT/checkpoints/step-N``; a run started again with the same ``--out`` resumes from
the last one and continues exactly as if it had not stopped. The end writes ``OUT/trained.safetensors``
(the trained weights only, for a single-process model) and the log ``OUT/log.jsonl`` / ``log.csv``.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flamingo_pytorch import Flamingo, FlamingoPaLM
from flamingo_pytorch.sharding import freeze_language_model, set_activation_checkpointing, shard_flamingo
from flamingo_pytorch.training_run import TrainingLog, find_checkpoint, json_object, parse_with_config
from flamingo_pytorch.training_state import TrainingState, export_trained, load_training_state, save_training_state

PALM = dict(num_tokens=32000, dim=1024, depth=12, dim_head=64, heads=16, cross_attn_every=4, perceiver_num_latents=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--config", type=Path, help="a JSON file of flag values (flags given here override it)")
    add("--model", choices=("palm", "hf"), default="palm")
    add("--palm", type=json_object, default={}, help="FlamingoPaLM keyword arguments, JSON (over the defaults)")
    add("--lm", help="--model hf: a transformers causal LM (path or hub name, from_pretrained)")
    add("--tokenizer", default="shapes", help="'shapes' (the demo's word tokenizer) or a transformers tokenizer")
    add(
        "--vision",
        default="patch:4",
        help="'patch:SIZE' (frozen random patch embedding), 'timm:NAME', 'open_clip:NAME'",
    )
    add("--flamingo", type=json_object, default={}, help="--model hf: Flamingo keyword arguments, JSON")
    add("--shards", help="webdataset shards, a brace pattern such as 'data/shard-{000000..000099}.tar'")
    add("--synthetic", action="store_true", help="random tokens and images instead of --shards")
    add("--image-size", type=int, default=32, help="--synthetic: image side")
    add("--batch-size", type=int, default=8, help="rows per rank and micro-step")
    add("--max-tokens", type=int, default=128)
    add("--max-images", type=int, default=4)
    add("--num-workers", type=int, default=0)
    add("--shuffle-buffer", type=int, default=1000, help="samples each loader worker shuffles among (0: in order)")
    add("--pack", action="store_true", help="fill each row with consecutive documents while they fit")
    add("--strategy", choices=("auto", "fsdp", "ddp", "single"), default="auto", help="auto: fsdp under torchrun")
    add("--bf16", action="store_true", help="bfloat16 compute (fp32 weights, optimizer state and reductions)")
    add("--checkpoint-activations", action="store_true", help="recompute each layer in backward")
    add("--steps", type=int, default=1000, help="optimizer steps")
    add("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    add("--lr", type=float, default=1e-4)
    add("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at lr * this")
    add("--warmup", type=int, default=100, help="linear warm-up steps")
    add("--weight-decay", type=float, default=0.1)
    add("--grad-clip", type=float, default=1.0, help="0: no clipping")
    add("--save-every", type=int, default=500, help="steps between distributed checkpoints (and at the end)")
    add("--out", type=Path, default=Path("runs/flamingo"))
    add("--seed", type=int, default=0)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")
    add("--wandb", help="also log to this wandb project (needs wandb)")
    args = parse_with_config(parser, argv)  # the config's keys meet the flags' checks; unknown keys are refused
    if (args.shards is None) == (not args.synthetic):
        parser.error("give --shards or --synthetic (exactly one)")
    if args.model == "hf" and args.lm is None:
        parser.error("--model hf needs --lm")
    for name in ("steps", "grad_accum", "batch_size", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def start(args: argparse.Namespace) -> tuple[int, int, torch.device, str]:
    """Join the process group under torchrun (nccl on GPUs, gloo on CPU) -> (rank, world, device, strategy)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    strategy = args.strategy if args.strategy != "auto" else ("fsdp" if world > 1 else "single")
    if strategy != "single" and world == 1 and not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
    return rank, world, device, strategy


def make_tokenizer(args: argparse.Namespace):
    if args.tokenizer == "shapes":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from shapes_dataset import make_tokenizer as shapes_tokenizer

        return shapes_tokenizer()
    from transformers import AutoTokenizer

    return pretrained(AutoTokenizer.from_pretrained, args.tokenizer, "--tokenizer")


def pretrained(load, name: str, flag: str):
    """``load(name)``, a transformers ``from_pretrained``, or an error saying what ``name`` had to be."""
    try:
        return load(name)
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SystemExit(
            f"{flag} {name!r}: not a local folder, and no model of that name could be loaded from the "
            f"Hugging Face hub ({reason})"
        ) from None


def make_vision_encoder(spec: str, dim: int) -> tuple[nn.Module, int]:
    """'patch:SIZE', 'timm:NAME' or 'open_clip:NAME[:PRETRAINED]' -> (encoder, feature width e)."""
    kind, _, name = spec.partition(":")
    if kind == "patch":
        size = int(name or 4)
        return nn.Sequential(nn.Conv2d(3, dim, size, stride=size), Rearrange("B e h w -> B (h w) e")), dim
    if kind == "timm":
        import timm

        encoder = timm.create_model(name, pretrained=True, num_classes=0)
        return encoder, encoder.num_features
    if kind == "open_clip":
        import open_clip

        model_name, _, pretrained = name.partition(":")
        clip = open_clip.create_model(model_name, pretrained=pretrained or None)
        return clip.visual, clip.visual.transformer.width
    raise ValueError(f"--vision must be patch:SIZE, timm:NAME or open_clip:NAME, got {spec!r}")


def build_model(args: argparse.Namespace, tokenizer) -> nn.Module:
    """The model on CPU, frozen where Flamingo freezes, the same weights on every rank (seeded)."""
    torch.manual_seed(args.seed)
    if args.model == "palm":
        config = {**PALM, **args.palm, "media_token_id": image_token_id(tokenizer)}
        config.setdefault("perceiver_num_time_embeds", args.max_images)
        config["num_tokens"] = max(config["num_tokens"], len(tokenizer))
        encoder, width = make_vision_encoder(args.vision, config["dim"])
        return FlamingoPaLM(**config, img_encoder=encoder, media_dim=width)
    from transformers import AutoModelForCausalLM

    from flamingo_pytorch.tokens import add_flamingo_tokens

    lm = pretrained(lambda name: AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), args.lm, "--lm")
    image_id, end_id = add_flamingo_tokens(tokenizer, lm)
    encoder, width = make_vision_encoder(args.vision, lm.get_input_embeddings().embedding_dim)
    options = {"perceiver_num_time_embeds": args.max_images, "train_token_ids": (image_id, end_id), **args.flamingo}
    return Flamingo(lm, media_token_id=image_id, vision_encoder=encoder, media_dim=width, **options)


def image_token_id(tokenizer) -> int:
    return tokenizer.image_id if hasattr(tokenizer, "image_id") else tokenizer.convert_tokens_to_ids("<image>")


def wrap(model: nn.Module, args: argparse.Namespace, device: torch.device, strategy: str) -> nn.Module:
    """Shard (FSDP2), replicate (DDP) or keep the model; -> the module to call."""
    model.to(device)
    if strategy == "fsdp":
        dtype = torch.bfloat16 if args.bf16 else None
        return shard_flamingo(model, param_dtype=dtype, checkpoint_activations=args.checkpoint_activations)
    freeze_language_model(model)
    set_activation_checkpointing(model, args.checkpoint_activations)
    if strategy == "ddp":  # frozen first: DDP syncs the parameters that require grad when it is built
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


class SyntheticBatches:
    """Random rows with ``--max-images`` images each; batch i of rank r depends only on (seed, r, i)."""

    def __init__(self, args: argparse.Namespace, media_token_id: int, num_tokens: int, rank: int):
        self.args, self.media_token_id, self.num_tokens, self.rank, self.batches = (
            args,
            media_token_id,
            num_tokens,
            rank,
            0,
        )

    def __iter__(self):
        while True:
            a = self.args
            generator = torch.Generator().manual_seed((a.seed * 65_537 + self.rank) * 2**32 + self.batches)
            ids = torch.randint(0, self.num_tokens, (a.batch_size, a.max_tokens), generator=generator)
            ids[ids == self.media_token_id] = (self.media_token_id + 1) % self.num_tokens
            ids[:, :: max(1, a.max_tokens // a.max_images)][:, : a.max_images] = self.media_token_id
            size = (a.batch_size, a.max_images, 3, a.image_size, a.image_size)
            self.batches += 1
            yield {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.masked_fill(ids == self.media_token_id, -100),
                "images": torch.randn(size, generator=generator),
                "time_mask": torch.ones(size[:2], dtype=torch.bool),
            }

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


def make_data(args: argparse.Namespace, tokenizer, model: nn.Module, rank: int):
    if args.synthetic:
        num_tokens = model.palm.token_emb.num_embeddings if args.model == "palm" else len(tokenizer)
        return SyntheticBatches(args, image_token_id(tokenizer), num_tokens, rank)
    from flamingo_pytorch.data import DocumentLoader

    return DocumentLoader(
        args.shards,
        tokenizer,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        max_images=args.max_images,
        num_workers=args.num_workers,
        seed=args.seed,
        shuffle_buffer=args.shuffle_buffer,
        pack=args.pack,
        drop_last=True,
    )


def batches_forever(data):
    """The loader's batches, epoch after epoch (a resumed loader continues its epoch first)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data yielded no batch: too few samples for one batch per rank")


def loss_of(net: nn.Module, model: nn.Module, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if isinstance(model, FlamingoPaLM):  # its labels are the next tokens, aligned: shift by one
        labels = torch.cat((batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)), dim=1)
        return net(batch["input_ids"], batch["images"], time_mask=batch["time_mask"], labels=labels)
    return net(
        batch["input_ids"],
        batch["images"],
        time_mask=batch["time_mask"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss


def warmup_cosine(args: argparse.Namespace):
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def start_message(strategy: str, world: int, device: torch.device, resume: Path | None, unfinished: list[Path]) -> str:
    """What the run starts from: its last complete checkpoint or nothing, and any save that did not finish."""
    where = f"resuming from {resume}" if resume is not None else "from scratch"
    if unfinished:
        where += f" (ignoring {', '.join(path.name for path in unfinished)}: a checkpoint save that did not finish)"
    return f"{strategy} on {world} x {device}, {where}"


def progress_bar(first: int, steps: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return range(first, steps)
    return tqdm(range(first, steps), initial=first, total=steps, disable=not enabled, dynamic_ncols=True)


def train(args: argparse.Namespace) -> list[float]:
    """Run (or resume) training; -> the losses of the steps this call ran (mean over ranks)."""
    rank, world, device, strategy = start(args)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small CPU runs: more threads barely help and stall on a busy machine
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(args)
    model = build_model(args, tokenizer)
    net = wrap(model, args, device, strategy)
    decay = [p for p in model.flamingo_parameters() if p.ndim >= 2]
    no_decay = [p for p in model.flamingo_parameters() if p.ndim < 2]  # gates, norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args))
    data = make_data(args, tokenizer, model, rank)
    position = f"data_rank{rank}"  # each rank reads its own shards: its own key (DCP keeps one value per key)
    state = TrainingState(model, optimizer, scheduler, progress={"step": 0, position: data.state_dict()})
    resume, unfinished = find_checkpoint(args.out / "checkpoints")
    if resume is not None:
        load_training_state(resume, state)
        data.load_state_dict(state.progress[position])
    first, config = int(state.progress["step"]), {k: str(v) for k, v in vars(args).items()}
    log = TrainingLog(args.out, enabled=rank == 0, tensorboard=args.tensorboard, wandb=args.wandb, config=config)
    log.keep_until(first)  # a run killed after its last checkpoint logged steps that it now runs again
    if rank == 0:
        print(start_message(strategy, world, device, resume, unfinished))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 and strategy != "fsdp" else nullcontext()
    batches, losses = batches_forever(data), []
    bar = progress_bar(first, args.steps, enabled=rank == 0)
    for step in bar:
        started, total = time.perf_counter(), torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            if strategy == "fsdp":
                net.set_requires_gradient_sync(last)
            with autocast, net.no_sync() if strategy == "ddp" and not last else nullcontext():
                loss = loss_of(net, model, next(batches), device) / args.grad_accum
            loss.backward()
            total += loss.detach()
        norm = nn.utils.clip_grad_norm_(model.flamingo_parameters(), args.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if dist.is_initialized():
            dist.all_reduce(total)  # the sum over ranks (gloo has no average)
            total = total / dist.get_world_size()
        losses.append(total.item())
        seconds = time.perf_counter() - started
        tokens = world * args.grad_accum * args.batch_size * args.max_tokens
        record = dict(step=step + 1, loss=losses[-1], lr=scheduler.get_last_lr()[0], grad_norm=float(norm))
        log.write({**record, "seconds": seconds, "tokens_per_s": tokens / seconds})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            state.progress.update({"step": step + 1, position: data.state_dict()})
            save_training_state(args.out / "checkpoints" / f"step-{step + 1}", state)
    export_trained(model, args.out / "trained.safetensors")
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
