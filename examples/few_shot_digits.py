"""Few-shot learning in context on real images: name handwritten digits from one example each.

    python examples/few_shot_digits.py                                   # about 8 minutes on one CPU core
    python examples/few_shot_digits.py --eval-only --checkpoint out_digits/few_shot_digits.safetensors \
        --ways 5 --shots 2

Each prompt gives N digit classes made-up names drawn afresh (see digits_episodes.py), so a frozen
model must pick up the naming from the prompt. The recipe in miniature:
  1b. pretrain a small CNN encoder on the seen digits 0-6 with a supervised- plus instance-contrastive
      loss; freeze it;
  1.  pretrain the PaLM on the text-only task (a symbol token where each image would be), with a
      slow one-cycle warm-up, stopped on text-only validation accuracy; freeze it;
  2.  train only the Perceiver Resampler and gated blocks (``flamingo_parameters()``) on image
      episodes, every other step naming single images rather than digits, keeping the latest state
      best on validation episodes (held-out images of the seen classes).
Then exact match over fixed episodes with held-out images of digits 0-6 and with digits 7-9, which
no stage ever saw, beside controls and a nearest-neighbour matcher on the same frozen features.
Results and what limits them: docs/few_shot_digits.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's modules sit next to this file

from digits_encoder import ContrastiveHead, DigitsEncoder, augment, encoder_loss
from digits_episodes import (
    NOVEL_CLASSES,
    TRANSFORMS,
    Episodes,
    ImagePool,
    instance_pool,
    load_pools,
    make_tokenizer,
    next_token_labels,
    prompt_of,
    sample_episodes,
    with_transforms,
)
from digits_eval import evaluate_setting, format_table, save_figure
from train_shapes import progress, warmup_cosine
from word_tokenizer import WordTokenizer

from flamingo_pytorch import FlamingoPaLM

MODEL = dict(dim=128, depth=4, dim_head=32, heads=4, ff_mult=2, cross_attn_every=1, perceiver_num_latents=4)
MODEL.update(perceiver_depth=1, perceiver_num_time_embeds=64, media_dim=64)
EMBED_STD = 0.2  # the PaLM's default 0.02 leaves the copy circuit unformed after 800 steps; 0.2 forms it by ~400
GATE_START = 1.0  # tanh-gates opened part-way: from zero, stage 2 stayed at chance for 1,000 steps (measured)
TRAIN_WAYS, TRAIN_SHOTS = (2, 5), (1, 1)  # each training batch draws its N and K from these ranges
VAL_SEED, VAL_EPISODES = 12345, 300
CHECKPOINT, FIGURE, RESULTS = "few_shot_digits.safetensors", "few_shot_digits.png", "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out_digits"), help="folder for checkpoint, figure, results")
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--lm-steps", type=int, default=1500, help="at most; stops at 99%% text-only val accuracy")
    parser.add_argument("--flamingo-steps", type=int, default=4000)
    parser.add_argument("--flamingo-lr", type=float, default=3e-3, help="stage 2's peak learning rate")
    parser.add_argument(
        "--extra-classes", action="store_true", help="also train on turned and inverted digits, as 35 classes more"
    )
    parser.add_argument("--ways", type=int, help="evaluate this N (default: 5-way seen, 3-way novel)")
    parser.add_argument("--shots", type=int, help="evaluate this K (default 1)")
    parser.add_argument("--episodes", type=int, default=1000, help="evaluation episodes per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint instead of training")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint written by this script")
    args = parser.parse_args(argv)
    for name in ("encoder_steps", "lm_steps", "flamingo_steps", "episodes", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.ways is not None and args.ways < 2) or (args.shots is not None and args.shots < 1):
        parser.error(f"--ways must be >= 2 and --shots >= 1, got {args.ways} and {args.shots}")
    if (args.ways or 5) * (args.shots or 1) + 1 > MODEL["perceiver_num_time_embeds"]:
        parser.error(f"--ways x --shots + 1 must be at most {MODEL['perceiver_num_time_embeds']} images")
    if args.flamingo_lr <= 0:
        parser.error(f"--flamingo-lr must be > 0, got {args.flamingo_lr}")
    if args.eval_only and args.checkpoint is None:
        parser.error("--eval-only needs --checkpoint PATH")
    return args


def build_model(tokenizer: WordTokenizer, encoder: nn.Module) -> FlamingoPaLM:
    """FlamingoPaLM over the frozen ``encoder``. The time embeddings are zero and frozen: an image's
    place in the prompt is told by the text around it, and so any N x K up to 63 works. The token
    embeddings start at std ``EMBED_STD``: larger than PaLM's default, so that token identities stand
    out and the text-only stage learns to copy by matching within a few hundred steps."""
    model = FlamingoPaLM(**MODEL, num_tokens=len(tokenizer), media_token_id=tokenizer.image_id, img_encoder=encoder)
    with torch.no_grad():
        nn.init.normal_(model.palm.token_emb.weight, std=EMBED_STD)
        model.perceiver_resampler.time_embeds.zero_()
    model.perceiver_resampler.time_embeds.requires_grad_(False)
    return model


def random_episodes(pool: ImagePool, count: int, generator: torch.Generator, tokenizer: WordTokenizer) -> Episodes:
    """Training episodes with N and K drawn from ``TRAIN_WAYS`` and ``TRAIN_SHOTS``."""
    ways = int(torch.randint(TRAIN_WAYS[0], TRAIN_WAYS[1] + 1, (1,), generator=generator))
    shots = int(torch.randint(TRAIN_SHOTS[0], TRAIN_SHOTS[1] + 1, (1,), generator=generator))
    return sample_episodes(pool, count, ways, shots, generator, tokenizer)


def run_steps(description, parameters, loss_fn, steps, schedule_fn, lr, check=None, every=100) -> tuple[list, list]:
    """AdamW on ``parameters`` for up to ``steps``; ``check()`` -> (validation score, stop?) every
    ``every`` steps. -> (losses, [(step, score)])."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = schedule_fn(optimizer)
    losses, checks = [], []
    bar = progress(steps, description, enabled=True)
    for step in bar:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if check is not None and ((step + 1) % every == 0 or step + 1 == steps):
            value, stop = check(step + 1)
            checks.append((step + 1, value))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{value:.3f}", refresh=False)
            if stop:
                break
    optimizer.zero_grad(set_to_none=True)
    return losses, checks


def pretrain_encoder(encoder: DigitsEncoder, pool: ImagePool, steps: int, generator: torch.Generator) -> list[float]:
    """Stage 1b: contrastive pretraining on the training images of the seen classes."""
    head = ContrastiveHead(encoder)

    def loss_fn():
        index = torch.randint(len(pool.labels), (128,), generator=generator)
        return encoder_loss(head, pool.images[index], pool.labels[index], generator)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))

    losses, _ = run_steps("1b image encoder", list(head.parameters()), loss_fn, steps, schedule, 3e-3)
    encoder.eval()
    return losses


@torch.no_grad()
def answer_accuracy(model: FlamingoPaLM, episodes: Episodes, images: bool) -> float:
    """Share of episodes whose most likely next token after the prompt is the answer."""
    logits = model(prompt_of(episodes) if images else episodes.symbols[:, :-2], episodes.images if images else None)
    return (logits[:, -1].argmax(dim=-1) == episodes.answer).float().mean().item()


def pretrain_language_model(model, pool, steps, generator, tokenizer) -> tuple[list, list]:
    """Stage 1: the PaLM on the symbol version of the task; one-cycle schedule with a slow warm-up
    (without it the loss sits at ln N); stops once 99% of validation episodes are answered."""
    val = sample_episodes(pool, VAL_EPISODES, 5, 1, torch.Generator().manual_seed(VAL_SEED), tokenizer)
    model.set_flamingo_mode(False)

    def loss_fn():
        episodes = random_episodes(pool, 64, generator, tokenizer)
        return model(episodes.symbols, labels=next_token_labels(episodes.symbols, episodes.loss_mask))

    def schedule(optimizer):
        warm = min(0.3, 200 / steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=warm)

    def check(step):
        accuracy = answer_accuracy(model, val, images=False)
        return accuracy, accuracy >= 0.99

    return run_steps("1  language model", list(model.palm.parameters()), loss_fn, steps, schedule, 1e-3, check)


def train_flamingo(model, pool, val_pool, steps, generator, tokenizer, lr=3e-3, batch=32) -> tuple[list, list]:
    """Stage 2: image episodes; only ``flamingo_parameters()`` train. The gates start at
    ``GATE_START`` and the images are augmented as in stage 1b (against memorising the training
    images). Every other step names single images instead of digits (``instance_pool``), so that
    stage 2 cannot settle on one code per seen digit. Keeps the latest of the states that answer
    most validation episodes (held-out images of the seen digits, 5-way 1-shot): validation
    saturates long before the last step, and among tied states the latest has trained longest."""
    val = sample_episodes(val_pool, VAL_EPISODES, 5, 1, torch.Generator().manual_seed(VAL_SEED), tokenizer)
    model.set_flamingo_mode(True)
    with torch.no_grad():
        for block in model.gated_cross_attn:
            block.attn_gate.fill_(GATE_START), block.ff_gate.fill_(GATE_START)
    parameters = [p for p in model.flamingo_parameters() if p.requires_grad]
    best = {"score": -1.0, "state": None}

    sources = itertools.cycle((pool, instance_pool(pool)))  # digits, then single images, in turn

    def loss_fn():
        episodes = random_episodes(next(sources), batch, generator, tokenizer)
        images = augment(episodes.images.flatten(0, 1), generator).view_as(episodes.images)  # (E, t, 1, 8, 8)
        with torch.no_grad():
            features = model.encode_pixels("images", images)  # (E, t, p, e)
        return model(episodes.text, image_embeds=features, labels=next_token_labels(episodes.text, episodes.loss_mask))

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))

    def check(step):
        accuracy = answer_accuracy(model, val, images=True)
        if accuracy >= best["score"]:
            best.update(score=accuracy, state={k: v.clone() for k, v in model.state_dict().items()})
        return accuracy, False

    result = run_steps("2  flamingo", parameters, loss_fn, steps, schedule, lr, check)
    model.load_state_dict(best["state"])
    return result


def train(args: argparse.Namespace, pools: dict[str, ImagePool], tokenizer: WordTokenizer) -> tuple[FlamingoPaLM, dict]:
    """The three stages; -> the trained model and what training recorded."""
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    transforms = TRANSFORMS if args.extra_classes else TRANSFORMS[:1]
    train_pool = with_transforms(pools["train"], transforms)
    started = time.perf_counter()
    encoder = DigitsEncoder(dim=MODEL["media_dim"])
    log = {"encoder": pretrain_encoder(encoder, train_pool, args.encoder_steps, generator)}
    model = build_model(tokenizer, encoder)  # freezes the encoder
    log["lm"], log["lm_val"] = pretrain_language_model(model, train_pool, args.lm_steps, generator, tokenizer)
    flamingo = train_flamingo(
        model, train_pool, pools["val"], args.flamingo_steps, generator, tokenizer, lr=args.flamingo_lr
    )
    log["flamingo"], log["flamingo_val"] = flamingo
    log.update(train_seconds=time.perf_counter() - started, training_classes=len(train_pool.classes()))
    return model, log


def save_checkpoint(path: Path, model: FlamingoPaLM, log: dict) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path), metadata={"log": json.dumps(log)})


def load_checkpoint(path: Path, tokenizer: WordTokenizer) -> tuple[FlamingoPaLM, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), framework="pt") as file:
        log = json.loads(file.metadata()["log"])
    model = build_model(tokenizer, DigitsEncoder(dim=MODEL["media_dim"]))
    load_model(model, str(path))
    return model, log


def report(model: FlamingoPaLM, pools: dict, args: argparse.Namespace, tokenizer: WordTokenizer, log: dict) -> dict:
    """Evaluate, print the table, write the figure and results.json."""
    model.eval()
    everything = ImagePool(
        torch.cat((pools["test"].images, pools["novel"].images)),
        torch.cat((pools["test"].labels, pools["novel"].labels)),
    )
    if args.ways is None and args.shots is None:
        plan = [("seen", 5, 1), ("novel", 3, 1)]
    else:
        plan = [("seen", args.ways or 5, args.shots or 1), ("novel", min(args.ways or 3, 3), args.shots or 1)]
    rows, shown = [], []
    for split, ways, shots in plan:
        pool = pools["test" if split == "seen" else "novel"]
        row, episodes, answers = evaluate_setting(model, pool, everything, ways, shots, args.episodes, tokenizer)
        rows.append({"split": split, **row})
        few = slice(0, 3)
        shown.append((f"{split} {ways}-way", Episodes(*(x[few] for x in vars(episodes).values())), answers[few]))
    print(format_table(rows))
    save_figure(args.out / FIGURE, shown, tokenizer)
    results = {
        "rows": rows,
        "seed": args.seed,
        "novel_classes": list(NOVEL_CLASSES),
        "training": {k: v for k, v in log.items() if k not in ("encoder", "lm", "flamingo")},
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    (args.out / RESULTS).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / FIGURE} and {args.out / RESULTS}")
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; -> the results written to results.json."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, pools = make_tokenizer(), load_pools()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_only:
        model, log = load_checkpoint(args.checkpoint, tokenizer)
    else:
        model, log = train(args, pools, tokenizer)
        save_checkpoint(args.out / CHECKPOINT, model, log)
        print(f"saved {args.out / CHECKPOINT} after {log['train_seconds']:.0f} s of training")
    return report(model, pools, args, tokenizer, log)


if __name__ == "__main__":
    main()
