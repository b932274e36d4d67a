"""FSDP2 over 2 gloo processes against one process: FlamingoPaLM and Flamingo over a tiny transformers Llama.

One spawn of two CPU processes runs every distributed check and saves what each rank saw; the tests
then compare. Float32 throughout (``param_dtype=None``), so sharding may only change the order of
floating-point sums: losses and gradients must agree with one process on the whole batch to within
the float32 error of those sums (``GRAD_TOL``), and the weights AdamW moved to within what that
error can do to Adam's update (``adam_tolerance``). Resuming from a distributed checkpoint must be
exact. A Flamingo over a bfloat16 language model shards and trains too (``bf16_lm_steps``).
"""

from __future__ import annotations

import copy
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, fsdp2_available, open_gates, tiny_image_encoder

from flamingo_pytorch import Flamingo, FlamingoPaLM

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)
if not fsdp2_available():
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch 2.6", allow_module_level=True)
transformers = pytest.importorskip("transformers", reason="pip install -e '.[hf]'")
pytest.importorskip("safetensors")

from torch.distributed.fsdp import FSDPModule  # noqa: E402

from flamingo_pytorch.sharding import shard_flamingo  # noqa: E402
from flamingo_pytorch.training_state import (  # noqa: E402
    TrainingState,
    export_trained,
    load_trained,
    load_training_state,
    save_training_state,
)

RTOL, ATOL = 1e-5, 1e-6  # the same weights in another process: only the order of a few sums may differ
WORLD, ROWS, LENGTH, ITEMS, STEPS, SAVED_AT = 2, 2, 12, 2, 4, 2  # ROWS per rank; the reference sees both ranks'
LR, ADAM_EPS = 1e-2, 1e-8  # AdamW's learning rate here and its default eps
# Float32 error of a gradient: each element is a sum over the batch's tokens and, for the scalar gates,
# over the width too: up to K = WORLD * ROWS * LENGTH * 32 = 1,536 products. Summed in another order
# (each rank's half, then the reduce-scatter), the rounding errors add up like a random walk,
# ~ sqrt(K) * eps32 relative to the scale of the terms, here the tensor's largest gradient; a factor 4
# covers the few layers the error passes through on its way back. (Measured on an AMD EPYC at 1 and 2
# threads: up to 34 eps32 * scale, against 4 * sqrt(1536) = 157.)
GRAD_TOL = 4 * (WORLD * ROWS * LENGTH * 32) ** 0.5 * torch.finfo(torch.float32).eps


def adam_tolerance(history: list[torch.Tensor], lr: float) -> torch.Tensor:
    """How far AdamW may move one weight tensor differently, element by element, when each step's
    gradient g_t carries an error of up to delta_t = GRAD_TOL * max|g_t| (``history``: the reference's
    gradients, step by step).

    Adam steps by lr * m/sqrt(v), the gradient's running mean over its running RMS, so an error delta
    in g moves the step by about lr * delta / RMS: negligible where the element's gradients are large,
    but up to the whole step where they sit at the rounding noise (its direction is then noise; Adam
    amplifies it, which is why a fixed atol on the weights fails on some machines). Over t <= 4 steps
    with beta2 = 0.999, v_hat weighs each past g_i^2 about equally, so sqrt(v_hat) >= max_i |g_i| / sqrt(t)
    and |m_hat| <= max_i |g_i|: the step's error is at most lr * 2 delta_t / (max_{i<=t} |g_i| / sqrt(t) + eps)
    (eps: AdamW's 1e-8 in the denominator), and never more than the step's own bound lr * 2 sqrt(t)
    (its direction reversed). Summed over the steps; the caller adds each step's rounding of the weight.
    """
    bound, largest = torch.zeros_like(history[0]), torch.zeros_like(history[0])
    for t, grad in enumerate(history, start=1):
        largest = torch.maximum(largest, grad.abs())
        delta = GRAD_TOL * grad.abs().max()
        step_error = 2 * delta / (largest / t**0.5 + ADAM_EPS)
        bound += lr * step_error.clamp(max=2 * t**0.5)
    return bound


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_palm() -> FlamingoPaLM:
    torch.manual_seed(0)
    model = FlamingoPaLM(**TINY, img_encoder=tiny_image_encoder())
    open_gates(model, 0.5)  # at 0 only the gates would get gradients
    return model


def build_llama() -> Flamingo:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    sizes = dict(cross_attn_every=2, dim_head=8, heads=2, perceiver_depth=1, perceiver_num_latents=4)
    model = Flamingo(transformers.LlamaForCausalLM(config), media_token_id=3, perceiver_num_time_embeds=4, **sizes)
    open_gates(model, 0.5)
    return model


def batch(step: int, rows: slice) -> dict[str, torch.Tensor]:
    """The step's global batch of WORLD * ROWS rows, cut to ``rows``: text with 2 media items, images and features."""
    generator = torch.Generator().manual_seed(step)
    text = torch.randint(4, 64, (WORLD * ROWS, LENGTH), generator=generator)
    text[:, [1, 6]] = TINY["media_token_id"]
    images = torch.randn(WORLD * ROWS, ITEMS, 3, 8, 8, generator=generator)
    features = torch.randn(WORLD * ROWS, ITEMS, 4, 32, generator=generator)
    return {"text": text[rows], "images": images[rows], "features": features[rows]}


def loss_of(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(model, FlamingoPaLM):
        labels = torch.cat((data["text"][:, 1:], torch.full_like(data["text"][:, :1], -100)), dim=1)
        return model(data["text"], data["images"], labels=labels)
    return model(data["text"], image_embeds=data["features"], labels=data["text"]).loss


def train(
    model, optimizer, steps: range, rows: slice, grads: dict | None = None, history: dict | None = None
) -> list[float]:
    """Train on ``steps``; ``grads``: the gradients of step 0, ``history``: every step's, by name."""
    losses = []
    for step in steps:
        loss = loss_of(model, batch(step, rows))
        loss.backward()
        if grads is not None and step == 0:
            grads.update({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        if history is not None:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    history.setdefault(n, []).append(full(p.grad))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (all-gathered), or a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def sharded_run(build, rank: int, folder: Path) -> dict:
    """Train STEPS steps sharded, saving at SAVED_AT; resume a fresh model from there; export the result."""
    model = shard_flamingo(build(), param_dtype=None)
    tied = tied_pair(model)
    units = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
    optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=LR)
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    grads = {}
    losses = train(model, optimizer, range(SAVED_AT), rows, grads)
    save_training_state(folder / "checkpoint", TrainingState(model, optimizer, progress={"step": SAVED_AT}))
    losses += train(model, optimizer, range(SAVED_AT, STEPS), rows)
    result = {
        "losses": losses,
        "grads": grads,
        "params": {n: full(p) for n, p in model.named_parameters()},
        "trained": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "with_state": sorted(n for n, p in model.named_parameters() if p in optimizer.state),
        "frozen_grads": [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None],
        "tied": tied and tied_pair(model),
        "units": units,
        "logits": logits_of(model, batch(STEPS, slice(None))),
    }
    export_trained(model, folder / "trained.safetensors")

    resumed = shard_flamingo(build(), param_dtype=None)
    optimizer = torch.optim.AdamW(resumed.flamingo_parameters(), lr=LR)
    progress = {"step": 0}
    load_training_state(folder / "checkpoint", TrainingState(resumed, optimizer, progress=progress))
    result["resumed_losses"] = train(resumed, optimizer, range(progress["step"], STEPS), rows)
    return result


def tied_pair(model) -> bool:
    """Whether the input embedding and the output projection are still one parameter."""
    if isinstance(model, FlamingoPaLM):
        return model.palm.to_logits.weight is model.palm.token_emb.weight
    return model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight


def logits_of(model, data: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, FlamingoPaLM):
            return full(model(data["text"], data["images"]))
        return full(model(data["text"], image_embeds=data["features"]).logits)


def bf16_step(rank: int) -> dict:
    """One step of FlamingoPaLM under the default policy: bfloat16 compute, float32 weights and gradients."""
    model = shard_flamingo(build_palm())
    data = batch(0, slice(rank * ROWS, (rank + 1) * ROWS))
    loss = loss_of(model, data)
    loss.backward()
    result = {
        "loss": loss.item(),
        "weights": {p.dtype for p in model.parameters()},  # the sharded parameters, after backward
        "grads": {p.grad.dtype for p in model.parameters() if p.grad is not None},
    }
    return {**result, "logits": logits_of(model, data).dtype}


def bf16_lm_steps(rank: int) -> dict:
    """Flamingo over a bfloat16 Llama, sharded computing in bfloat16 (the default) and in the parameters'
    own dtypes (None: the LM's bfloat16, float32 for what trains, which computes in bfloat16 under autocast)."""
    result = {}
    for policy in (torch.bfloat16, None):
        model = build_llama()
        model.lm.to(torch.bfloat16)
        model = shard_flamingo(model, param_dtype=policy)
        optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=LR)
        loss = loss_of(model, batch(0, slice(rank * ROWS, (rank + 1) * ROWS)))
        loss.backward()
        optimizer.step()
        result[str(policy)] = {
            "loss": loss.item(),
            "trained": {p.dtype for p in model.flamingo_parameters()},
            "grads": {p.grad.dtype for p in model.flamingo_parameters() if p.grad is not None},
            "lm": {p.dtype for p in model.lm.parameters()},
            "moved": sum(len(state) > 0 for state in optimizer.state.values()),
        }
    return result


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, build in (("palm", build_palm), ("llama", build_llama)):
            (Path(folder) / name).mkdir(exist_ok=True)
            results[name] = sharded_run(build, rank, Path(folder) / name)
        results["bf16"] = bf16_step(rank)
        results["bf16_lm"] = bf16_lm_steps(rank)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)], folder


@contextmanager
def one_thread():
    """Tiny matrices: a second torch thread only waits (seconds per step on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def reference(build) -> tuple[torch.nn.Module, dict, list[float], dict]:
    """One process, the whole batch of every step: the model, step 0's gradients, the losses, every step's gradients."""
    model = build()
    if isinstance(model, FlamingoPaLM):
        model.set_flamingo_mode(True)
    optimizer = torch.optim.AdamW(model.flamingo_parameters(), lr=LR)
    grads, history = {}, {}
    losses = train(model, optimizer, range(STEPS), slice(None), grads, history)
    return model, grads, losses, history


@pytest.mark.parametrize("name, build", [("palm", build_palm), ("llama", build_llama)])
def test_fsdp2_losses_gradients_and_weights_equal_one_process(runs, name, build):
    ranks, _ = runs
    model, grads, losses, history = reference(build)
    mean_losses = [sum(r[name]["losses"][i] for r in ranks) / WORLD for i in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(losses), rtol=GRAD_TOL, atol=0)
    for rank in ranks:
        assert rank[name]["grads"].keys() == grads.keys()
        for key, value in grads.items():  # each gradient to the float32 error of its sums, at its own scale
            torch.testing.assert_close(rank[name]["grads"][key], value, rtol=0, atol=GRAD_TOL * value.abs().max())
        for key, value in model.named_parameters():
            got, want = rank[name]["params"][key], value.detach()
            if key not in history:  # frozen (or no gradient): never moved, bit for bit
                assert torch.equal(got, want), key
                continue
            tolerance = adam_tolerance(history[key], LR) + STEPS * torch.finfo(torch.float32).eps * want.abs()
            worst = ((got - want).abs() - tolerance).max()
            assert worst <= 0, f"{key}: beyond the Adam tolerance by {worst.item():.3g}"


@pytest.mark.parametrize("name, build", [("palm", build_palm), ("llama", build_llama)])
def test_only_flamingo_parameters_train_and_hold_optimizer_state(runs, name, build):
    ranks, _ = runs
    model = build()
    trained = {id(p) for p in model.flamingo_parameters()}
    expected = sorted(n for n, p in model.named_parameters() if id(p) in trained)
    assert 0 < len(expected) < len(list(model.parameters()))
    for rank in ranks:
        assert rank[name]["trained"] == expected
        # Optimizer state for exactly the parameters that had gradients, all of them trained ones (the
        # video frame embeddings of FlamingoPaLM have none in an image-only run): none for the frozen shards.
        assert rank[name]["with_state"] == sorted(rank[name]["grads"])
        assert set(rank[name]["with_state"]) <= set(expected) and len(rank[name]["with_state"]) >= len(expected) - 1
        assert rank[name]["frozen_grads"] == []
        frozen = {n: p for n, p in model.named_parameters() if id(p) not in trained}
        for key, value in frozen.items():  # the language model (and encoder) did not move
            torch.testing.assert_close(rank[name]["params"][key], value.detach(), rtol=0, atol=0, msg=key)


UNITS = {  # "" is the root: embeddings, final norm, output projection
    "palm": [
        *("", "gated_cross_attn.0", "gated_cross_attn.1", "img_encoder"),
        *(f"palm.layers.{i}" for i in range(4)),
        "perceiver_resampler",
    ],
    "llama": [
        *("", "gated_cross_attn.0.attn", "gated_cross_attn.0.ff", "gated_cross_attn.1.attn", "gated_cross_attn.1.ff"),
        *(f"lm.model.layers.{i}" for i in range(3)),
        "perceiver_resampler",
    ],
}


@pytest.mark.parametrize("name", ["palm", "llama"])
def test_one_unit_per_layer_gated_block_and_resampler(runs, name):
    ranks, _ = runs
    assert ranks[0][name]["units"] == UNITS[name]


def test_bf16_compute_keeps_float32_weights_and_gradients(runs):
    ranks, _ = runs
    for rank in ranks:
        bf16 = rank["bf16"]
        assert bf16["logits"] == torch.bfloat16  # the units computed in bfloat16
        assert bf16["weights"] == {torch.float32} and bf16["grads"] == {torch.float32}
        assert abs(bf16["loss"] - rank["palm"]["losses"][0]) < 0.05  # the float32 run's first loss
        assert bf16["loss"] != rank["palm"]["losses"][0]


def test_a_bf16_language_model_shards_and_trains_with_float32_master_weights(runs):
    ranks, _ = runs
    for rank in ranks:
        for policy, step in rank["bf16_lm"].items():
            assert step["trained"] == {torch.float32} and step["grads"] == {torch.float32}, policy
            assert step["lm"] == {torch.bfloat16} and step["moved"] > 0, policy
            # The float32 run's first loss, to bf16's rounding: unit roundoff 2^-9 over the ~30 rounded
            # operations of 3 layers, relative to the loss (see tests/test_precision.py).
            assert abs(step["loss"] - rank["llama"]["losses"][0]) <= 64 * 2.0**-9 * rank["llama"]["losses"][0]


@pytest.mark.parametrize("name", ["palm", "llama"])
def test_the_tied_embedding_stays_one_parameter(runs, name):
    ranks, _ = runs
    assert all(rank[name]["tied"] for rank in ranks)


@pytest.mark.parametrize("name", ["palm", "llama"])
def test_resuming_from_a_distributed_checkpoint_equals_not_stopping(runs, name):
    ranks, _ = runs
    for rank in ranks:
        assert rank[name]["resumed_losses"] == rank[name]["losses"][SAVED_AT:]  # exactly
    assert ranks[0][name]["losses"] != ranks[1][name]["losses"]  # the ranks saw different rows


@pytest.mark.parametrize("name, build", [("palm", build_palm), ("llama", build_llama)])
@one_thread()
def test_exported_weights_load_into_one_process(runs, name, build):
    ranks, folder = runs
    model = build().eval()
    before = copy.deepcopy(dict(model.named_parameters()))
    load_trained(model, folder / name / "trained.safetensors")
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    torch.testing.assert_close(
        logits_of(model, batch(STEPS, slice(None))), ranks[0][name]["logits"], rtol=RTOL, atol=ATOL
    )
    with pytest.raises(ValueError, match="missing keys"):
        load_trained(build_palm() if name == "llama" else build_llama(), folder / name / "trained.safetensors")
