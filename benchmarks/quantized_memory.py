"""Peak memory and training-step time of Flamingo over a Llama-3.2-1B-shaped language model, frozen in
float32, bfloat16, int8 weight-only (torchao) or 4-bit NF4 (bitsandbytes, CUDA).

    python benchmarks/quantized_memory.py                      # CPU: float32, bf16, int8
    python benchmarks/quantized_memory.py --per-layer          # 2- and 4-layer models: per-layer figures
    python benchmarks/quantized_memory.py --device cuda        # GPU: bf16, int8, nf4
    python benchmarks/quantized_memory.py --count-8b           # parameter counts for Llama-3.1-8B (no weights)
    python benchmarks/quantized_memory.py --tiny               # a seconds-long check of the script

The language model: ``LlamaConfig`` with Llama-3.2-1B's values (width 2048, 16 layers, 32 heads, 8
key/value heads, MLP 8192, vocabulary 128256, tied embeddings, rope theta 500000, llama3 rope
scaling), random weights. Flamingo: a gated block before every 4th decoder layer (0, 4, 8, 12),
blocks and resampler with 8 heads of 64, feed-forward x4, a 6-layer Perceiver Resampler with 64
latents, media width 1024, the ``<image>`` and ``<|endofchunk|>`` rows trained. One sample of 512
tokens with 2 images, each 256 precomputed features of width 1024 (a ViT-L's), ``labels=`` the
text. A training step: forward, backward, AdamW over what trains (float32 master weights).

``int8``: the LM in bfloat16, its decoder layers' linear layers int8 weight-only (the head, tied to
the embedding, stays bfloat16). ``nf4``: the LM loaded in
bfloat16 with its decoder layers' linear layers in NF4 (the head stays bfloat16, as transformers
leaves it), through ``from_pretrained`` on a local copy. ``--checkpointing`` recomputes each
decoder layer in backward (``activation_checkpointing_enable``). ``--per-layer`` runs 2- and 4-layer
models with one gated block and a 4-layer model with two: the differences are two decoder layers
and one gated block (its weights, gradients, AdamW state and activations).

Each configuration runs in its own process. Memory: on the CPU the child's peak resident set size
(``ru_maxrss``; glibc runs with ``MALLOC_MMAP_THRESHOLD_`` so freed tensors leave it) and its
resident set after the model is built, both above the level before building; on CUDA
``max_memory_allocated`` and ``memory_allocated``. Time: the median of ``--steps`` steps after
``--warmup``. Prints a table and writes benchmarks/results/quantized_memory[_per_layer][_checkpointing]
[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

MIB = 2**20
MEDIA, END_OF_CHUNK = 128256, 128257  # the two added tokens
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256 + 2,  # + <image> and <|endofchunk|>
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    max_position_embeddings=131072,
)
LLAMA_8B = {**LLAMA_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
LLAMA_8B["tie_word_embeddings"] = False
FLAMINGO = dict(dim_head=64, heads=8, ff_mult=4, perceiver_depth=6, perceiver_num_latents=64, media_dim=1024)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
TINY_FLAMINGO = dict(dim_head=8, heads=2, ff_mult=2, perceiver_depth=1, perceiver_num_latents=4, media_dim=32)


def llama_config(base: dict, layers: int | None = None, tiny: bool = False):
    from transformers import LlamaConfig

    values = {**base, **(TINY if tiny else {})}
    if layers is not None:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values)


def build_lm(case: dict):
    """The frozen language model of ``case``: random weights in its dtype, quantized as asked."""
    from transformers import AutoModelForCausalLM

    config = llama_config(LLAMA_1B, case["layers"], case["tiny"])
    dtype = torch.float32 if case["precision"] == "float32" else torch.bfloat16
    if case["precision"] == "nf4":
        return load_nf4(AutoModelForCausalLM.from_config(config, dtype=dtype), case["device"])
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype).to(case["device"])
    if case["precision"] == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(lm, Int8WeightOnlyConfig(), filter_fn=decoder_linear)  # the tied head stays bf16 with the embedding
    return lm


def decoder_linear(module: torch.nn.Module, name: str) -> bool:
    """Quantize the decoder layers' linear layers, not the head (tied to the input embedding here)."""
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


def load_nf4(lm, device: str):
    """``lm`` saved to a temporary folder and loaded back in NF4 (bitsandbytes), bfloat16 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with tempfile.TemporaryDirectory() as folder:
        lm.save_pretrained(folder)
        del lm
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
        )


def build_flamingo(lm, case: dict, token_ids: tuple[int, ...] = (MEDIA, END_OF_CHUNK)):
    from flamingo_pytorch import Flamingo

    sizes = TINY_FLAMINGO if case["tiny"] else FLAMINGO
    return Flamingo(
        lm,
        media_token_id=MEDIA,
        cross_attn_every=case["every"],
        train_token_ids=token_ids,
        perceiver_num_time_embeds=4,
        **sizes,
    )


def tensor_bytes(tensor) -> int:
    """Bytes a weight holds: a tensor subclass's inner tensors (torchao), a 4-bit weight's absmax (bitsandbytes)."""
    if tensor is None:  # e.g. a symmetric int8 weight's absent zero point
        return 0
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    absmax = getattr(getattr(tensor, "quant_state", None), "absmax", None)
    scales = absmax.numel() * absmax.element_size() if absmax is not None else 0
    return tensor.numel() * tensor.element_size() + scales


class Memory:
    """Readings on the device of a case: the current level and the peak, in bytes."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def preload(precision: str) -> None:
    """Import what building and training import, so that the memory readings start after the imports."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    import flamingo_pytorch  # noqa: F401

    if precision == "int8":
        import torchao.quantization  # noqa: F401
    if precision == "nf4":
        import bitsandbytes  # noqa: F401


def measure(case: dict) -> dict:
    """Build the case's model, train ``warmup + steps`` steps; memory and the median step time."""
    torch.set_num_threads(case["threads"])
    device, memory = case["device"], Memory(case["device"])
    preload(case["precision"])
    before = memory.now()
    model = build_flamingo(build_lm(case), case)
    if case["checkpointing"]:
        model.lm.activation_checkpointing_enable()  # non-reentrant; the inner layer of each FusionLayer too
    built = memory.now()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    vocab, seq, width = (64 if case["tiny"] else 128256), case["seq"], model.perceiver_resampler.dim
    text = torch.randint(0, vocab, (1, seq), generator=generator)
    text[:, [0, seq // 2]] = MEDIA
    embeds = torch.randn(1, 2, 16 if case["tiny"] else 256, width, generator=generator)
    text, embeds = text.to(device), embeds.to(device=device, dtype=model.working_dtype)
    model.train()
    seconds = []
    for step in range(case["warmup"] + case["steps"]):
        memory.sync()
        start = time.perf_counter()
        model(text, image_embeds=embeds, labels=text).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory.sync()
        if step >= case["warmup"]:
            seconds.append(time.perf_counter() - start)
    lm_params = {id(p): p for p in model.lm.parameters()}  # a tied weight once
    return {
        "lm_params": sum(p.numel() for p in lm_params.values()),
        "lm_weight_mb": sum(tensor_bytes(p) for p in lm_params.values()) / MIB,
        "trained_params": sum(p.numel() for p in trained),
        "block_params": sum(p.numel() for p in model.gated_cross_attn.parameters()),
        "resampler_params": sum(p.numel() for p in model.perceiver_resampler.parameters()),
        "built_mb": (built - before) / MIB,
        "peak_mb": (memory.peak() - before) / MIB,
        "seconds": seconds,
        "median_s": statistics.median(seconds),
    }


def run_case(case: dict) -> dict:
    """``measure`` in a fresh process (glibc returning freed blocks to the OS)."""
    env = {**os.environ, **common.MALLOC_ENV, "OMP_NUM_THREADS": str(case["threads"])}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {**case, "error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return {**case, **json.loads(proc.stdout.strip().splitlines()[-1])}


def cases(args: argparse.Namespace) -> list[dict]:
    precisions = args.precisions or (["bf16", "int8", "nf4"] if args.device == "cuda" else ["float32", "bf16", "int8"])
    common_settings = dict(
        device=args.device,
        threads=args.threads,
        tiny=args.tiny,
        seq=args.seq,
        warmup=args.warmup,
        steps=args.steps,
        checkpointing=args.checkpointing,
    )
    suffix = ", checkpointing" if args.checkpointing else ""
    chosen = [dict(precision=p, layers=None, every=4, name=f"{p}, 16 layers{suffix}") for p in precisions]
    if args.per_layer:  # 2 vs 4 layers: two decoder layers; one block vs two (every 4 vs every 2): one gated block
        chosen = []
        for p in precisions:
            chosen += [
                dict(precision=p, layers=2, every=4, name=f"{p}, 2 layers, 1 block"),
                dict(precision=p, layers=4, every=4, name=f"{p}, 4 layers, 1 block"),
                dict(precision=p, layers=4, every=2, name=f"{p}, 4 layers, 2 blocks"),
            ]
    return [{**common_settings, **case} for case in chosen]


def count_8b() -> dict:
    """Exact parameter counts of Flamingo over Llama-3.1-8B's shape, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(llama_config(LLAMA_8B))
    model = build_flamingo(lm, dict(tiny=False, every=4), token_ids=())  # (TrainedTokenRows reads ids: not on meta)
    lm_params = {id(p): p for p in model.lm.parameters()}
    return {
        "lm_params": sum(p.numel() for p in lm_params.values()),
        "embedding_params": model.lm.get_input_embeddings().weight.numel(),
        "decoder_layer_params": sum(p.numel() for p in model.lm.model.layers[1].parameters()),
        "gated_blocks": len(model.gated_cross_attn),
        "block_params": sum(p.numel() for p in model.gated_cross_attn[0].parameters()),
        "resampler_params": sum(p.numel() for p in model.perceiver_resampler.parameters()),
        "token_row_params": 2 * model.lm.config.hidden_size,  # <image> and <|endofchunk|>
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad) + 2 * 4096,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "bf16", "int8", "nf4"), default=None)
    parser.add_argument("--per-layer", action="store_true", help="2- and 4-layer models instead of 16 layers")
    parser.add_argument("--checkpointing", action="store_true", help="recompute each decoder layer in backward")
    parser.add_argument("--seq", type=int, default=512, help="text length (batch 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script in seconds")
    parser.add_argument("--count-8b", action="store_true", help="print Flamingo-over-Llama-3.1-8B parameter counts")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    if args.count_8b:
        print(json.dumps(count_8b(), indent=2))
        return
    results = []
    for case in cases(args):
        results.append(run_case(case))
        print(f"{case['name']}: {results[-1].get('median_s', results[-1].get('error'))}", flush=True)
    columns = [("name", "configuration"), ("lm_weight_mb", "LM weights MB"), ("trained_params", "trained params")]
    columns += [("built_mb", "built MB"), ("peak_mb", "peak MB"), ("median_s", "step s")]
    title = f"Flamingo training step over a Llama-3.2-1B-shaped LM, 1 x {args.seq} tokens, 2 images"
    common.print_table(title, results, columns)
    args.autocast = None  # machine_info's field: the precision is per case here
    kind = ("_per_layer" if args.per_layer else "") + ("_checkpointing" if args.checkpointing else "")
    name = f"quantized_memory{kind}"
    common.write_json(name, args, {"results": results})


if __name__ == "__main__":
    main()
