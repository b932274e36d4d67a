"""Runs one benchmark case in this process and prints its result as a JSON line.

Called by the benchmark scripts as ``python worker.py '<case json>'`` with PYTHONPATH set to
either this checkout or the directory holding flamingo-pytorch 0.1.2 (same import name). On CUDA
the scripts pass a JSON list of cases instead, run one after another in this process (each
reading its own peak from the allocator), since starting a CUDA process can take 15 s.

Memory: on CPU, the peak resident set size (VmHWM, reset through /proc/self/clear_refs) during
the timed repetitions minus the resident set size just before them, after the model is built,
warmed up, and freed memory handed back (gc + malloc_trim); glibc runs with a fixed mmap
threshold (see common.py), so freed tensors leave the resident set. Where clear_refs is not
writable, ``getrusage`` maxrss minus the RSS after the model build is used instead
(``memory_method`` says which). On CUDA, ``max_memory_allocated`` minus the memory allocated
before the timed repetitions.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory above the level at ``start()``, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM reset via clear_refs"

    def start(self) -> None:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self.method = "getrusage maxrss minus RSS after build"
        self.base = rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("getrusage"):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return rss_bytes("VmHWM") - self.base


def autocast(case: dict):
    if case["autocast"] == "bf16":
        return torch.autocast(device_type=case["device"], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def media_locations_tokens(text: torch.Tensor, num_media: int, media_token_id: int) -> torch.Tensor:
    """Place num_media media tokens evenly, the first at position 0."""
    positions = torch.linspace(0, text.shape[1], num_media + 1)[:-1].long()
    text[:, positions] = media_token_id
    return text


def build_model_case(case: dict, device: torch.device):
    """The full FlamingoPaLM, ours or 0.1.2; returns (model, call) where call() gives logits."""
    from flamingo_pytorch import FlamingoPaLM

    sizes = dict(
        num_tokens=case["num_tokens"],
        dim=case["dim"],
        depth=case["depth"],
        dim_head=case["dim_head"],
        heads=case["heads"],
        cross_attn_every=case["cross_attn_every"],
        perceiver_num_latents=case["latents"],
        perceiver_depth=case["perceiver_depth"],
        media_token_id=3,
    )
    if case["impl"] == "ours":
        extra = {"checkpoint_activations": case.get("checkpoint", False)}
        model = FlamingoPaLM(**sizes, perceiver_num_time_embeds=max(4, case["images"]), **extra)
    else:  # 0.1.2: img_encoder=None crashes its constructor, so embeddings pass through an Identity encoder
        model = FlamingoPaLM(**sizes, img_encoder=nn.Identity())
    model.to(device).train()
    b, n = case["batch"], case["seq"]
    text = torch.randint(4, case["num_tokens"], (b, n), device=device)
    text = media_locations_tokens(text, case["images"], 3)
    embeds = torch.randn(b, case["images"], case["patches"], case["dim"], device=device)
    labels = torch.cat((text[:, 1:], torch.full_like(text[:, :1], -100)), dim=1).flatten()  # next token
    if case["mode"] == "text":
        call = lambda: model(text)  # noqa: E731
    elif case["impl"] == "ours":
        call = lambda: model(text, image_embeds=embeds)  # noqa: E731
    else:
        call = lambda: model(text, images=embeds)  # noqa: E731  (0.1.2's forward is keyword-only)
    if case.get("fused_loss"):  # ours only: the loss straight from labels=, without the full logits
        media = {} if case["mode"] == "text" else {"image_embeds": embeds}
        loss_call = lambda: model(text, labels=labels.view(b, n), **media)  # noqa: E731
    else:
        loss_call = lambda: F.cross_entropy(call().flatten(0, 1).float(), labels)  # noqa: E731
    if case.get("compile"):
        compile_model(model, case["impl"])
    return model, call, loss_call


def compile_model(model: nn.Module, impl: str) -> None:
    """Compile each layer, gated block and the resampler (the freezing code stays eager)."""
    if impl == "ours":
        modules = [*model.palm.layers, *model.gated_cross_attn, model.perceiver_resampler]
    else:
        modules = [m for pair in model.layers for m in pair if m is not None] + [model.perceiver_resampler]
    for module in modules:
        module.compile()


def build_block_case(case: dict, device: torch.device):
    """One gated cross-attention block with open gates; returns (block, call)."""
    from flamingo_pytorch import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(dim=case["dim"], dim_head=case["dim_head"], heads=case["heads"]).to(device)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ff_gate.fill_(1.0)
    b, n, t = case["batch"], case["seq"], case["images"]
    x = torch.randn(b, n, case["dim"], device=device, requires_grad=True)
    media = torch.randn(b, t, case["latents"], case["dim"], device=device, requires_grad=True)
    locations = media_locations_tokens(torch.zeros(b, n, dtype=torch.long, device=device), t, 1).bool()
    if case["impl"] == "ours":
        call = lambda: block(x, media, locations)  # noqa: E731
    else:
        call = lambda: block(x, media, media_locations=locations)  # noqa: E731
    return block, call, (x, media)


def make_step(case: dict, device: torch.device):
    if case["kind"] == "model":
        model, call, loss_fn = build_model_case(case, device)
        params = list(model.parameters())

    else:
        block, call, inputs = build_block_case(case, device)
        params = [*block.parameters(), *inputs]

        def loss_fn():
            return call().float().sum()

    def step():
        if case["phase"] == "forward":  # inference forward
            with torch.no_grad(), autocast(case):
                call()
            return
        for param in params:
            param.grad = None
        with autocast(case):
            loss = loss_fn()
        loss.backward()

    return step


def matmul_case(case: dict, device: torch.device) -> dict:
    """Median rate of (m, k) @ (k, n) float32 (bf16 with autocast) matmuls, in GFLOP/s; the best is
    the rate a step's efficiency is measured against."""
    dtype = torch.bfloat16 if case["autocast"] == "bf16" else torch.float32
    rates = {}
    for m, k, n in case["shapes"]:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        seconds = timed(lambda a=a, b=b: a @ b, case, device)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(seconds) / 1e9
    return {"gflops": rates, "best_gflops": max(rates.values())}


def gpu_busy(step) -> dict:
    """The summed duration and the number of the GPU kernels of one step (CUDA, via the profiler).

    Against the step's wall time this separates GPU work from launch overhead: a step whose
    kernels take a small part of its time is bound by the host, not the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        return {"gpu_busy_s": sum(event.time_range.elapsed_us() for event in kernels) / 1e6, "kernels": len(kernels)}
    except Exception as error:  # the profiler is optional here: never lose the timings to it
        return {"gpu_busy_error": repr(error)}


def aten_ops(step) -> int:
    """The number of aten operators one step dispatches, forward and backward (views included).

    On a GPU each non-view operator is at least one kernel launch, so where a step is bound by
    the host this count explains its time; it is the same on any device for a given code path.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.calls


def timed(step, case: dict, device: torch.device) -> list[float]:
    seconds = []
    for _ in range(case["reps"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_case(case: dict) -> dict:
    torch.manual_seed(0)
    device = torch.device(case["device"])
    if case["kind"] == "matmul":
        return matmul_case(case, device)
    import flamingo_pytorch

    step = make_step(case, device)
    built_rss = rss_bytes()
    start = time.perf_counter()
    for _ in range(case["warmup"]):
        step()
    warmup_seconds = time.perf_counter() - start
    memory = PeakMemory(device)
    memory.start()
    seconds = timed(step, case, device)
    result = {
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "peak_mb": memory.peak() / 2**20,
        "memory_method": memory.method,
        "warmup_s": warmup_seconds,
        # the cruder reading: peak RSS of the whole run (warm-up included) minus the RSS after the build
        "maxrss_above_build_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - built_rss) / 2**20,
        "package": flamingo_pytorch.__file__,
    }
    if device.type == "cuda":
        result.update(gpu_busy(step))
    result["aten_ops"] = aten_ops(step)  # after the measurements: counting slows the step down
    return result


def main() -> None:
    """One case (a JSON object) or, on CUDA, several (a JSON list) run one after another."""
    payload = json.loads(sys.argv[1])
    if isinstance(payload, dict):
        print(json.dumps(run_case(payload)))
        return
    results = []
    for case in payload:
        try:
            results.append(run_case(case))
        except Exception as error:  # e.g. out of memory: report it and go on with the next case
            results.append({"error": repr(error)})
        release_memory()
        torch.cuda.empty_cache()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
