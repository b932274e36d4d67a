"""Shared plumbing for the benchmark scripts: one fresh subprocess per measured case, the
published flamingo-pytorch 0.1.2 installed on the side, tables and JSON.

Every case runs in its own Python process (``worker.py``), so each peak-memory reading starts
from a clean heap. Ours is imported from this checkout, 0.1.2 from a separate directory; both
use the import name ``flamingo_pytorch``, so they never share a process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "flamingo-pytorch==0.1.2"
# A fixed mmap threshold makes glibc return every block above 128 KiB to the OS when it is
# freed, so the resident set size tracks the memory the tensors actually hold.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def parse_args(description: str, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--reps", type=int, default=defaults.get("reps", 6), help="timed repetitions per case")
    parser.add_argument(
        "--rounds", type=int, default=defaults.get("rounds", 3), help="timing processes per case, interleaved"
    )
    parser.add_argument("--warmup", type=int, default=defaults.get("warmup", 1), help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument(
        "--ref-dir", default=os.environ.get("FLAMINGO_REF_DIR", "/tmp/ref012"), help=f"where {REFERENCE} lives"
    )
    parser.add_argument("--no-ref", action="store_true", help="skip the 0.1.2 reference")
    parser.add_argument(
        "--autocast", choices=("none", "bf16"), default=None, help="default: bf16 on cuda, none (float32) on cpu"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the batch size (e.g. to fill a GPU)")
    parser.add_argument("--seq", type=int, default=None, help="override the text length n")
    parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<script>.json)")
    args = parser.parse_args()
    if args.autocast is None:
        args.autocast = "bf16" if args.device == "cuda" else "none"  # bf16 autocast on GPUs, float32 on CPU
    args.autocast = None if args.autocast == "none" else args.autocast
    return args


def sized(config: dict, args: argparse.Namespace) -> dict:
    """The config with ``--batch`` and ``--seq`` applied where given."""
    overrides = {"batch": args.batch, "seq": args.seq}
    return {**config, **{key: value for key, value in overrides.items() if value is not None}}


def ensure_reference(ref_dir: str) -> str:
    """Install the published 0.1.2 into ``ref_dir`` (no dependencies) unless it is already there."""
    if not (Path(ref_dir) / "flamingo_pytorch" / "flamingo_palm.py").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", ref_dir, REFERENCE],
            check=True,
        )
    return ref_dir


def run_cases(cases: list[dict], args: argparse.Namespace) -> list[dict]:
    """Measure cases (``case["impl"]`` is "ours" or "ref"), each in fresh processes.

    Peak memory: on CPU one process per case (fixed mmap threshold, one measured step after
    warm-up); on CUDA the first round's ``max_memory_allocated`` reading.
    Time: ``args.rounds`` rounds, each running one process per case in turn (default allocator,
    ``args.warmup`` untimed then ``reps / rounds`` timed steps), so that a burst of load on a
    shared machine falls on all the compared cases alike. The median is over all timed steps.
    On CUDA each round runs all the cases of one implementation in one process.
    """
    defaults = {"device": args.device, "autocast": args.autocast, "warmup": args.warmup}
    cases = [{**defaults, **case, "reps": max(1, math.ceil(args.reps / args.rounds))} for case in cases]
    if args.device == "cuda":  # the CUDA allocator's peak counter is exact in any process: no extra run
        rounds = [run_by_impl(cases, args) for _ in range(args.rounds)]
        memory = rounds[0]
    else:
        rounds = [[run_worker(case, args, {}) for case in cases] for _ in range(args.rounds)]
        memory = [run_worker({**case, "reps": 1}, args, MALLOC_ENV) for case in cases]
    results = []
    for i, case in enumerate(cases):
        runs = [memory[i]] + [row[i] for row in rounds]
        errors = [run["error"] for run in runs if "error" in run]
        if errors:
            results.append({**case, "error": errors[0]})
            continue
        seconds = [s for row in rounds for s in row[i]["seconds"]]
        results.append(
            {
                **case,
                "reps": len(seconds),
                "seconds": seconds,
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "peak_mb": memory[i]["peak_mb"],
                "memory_method": memory[i]["memory_method"],
                "maxrss_above_build_mb": max(row[i]["maxrss_above_build_mb"] for row in rounds),
                "warmup_s": rounds[0][i]["warmup_s"],
                "gpu_busy_s": rounds[0][i].get("gpu_busy_s"),  # CUDA only: kernel time of one step
                "kernels": rounds[0][i].get("kernels"),
                "aten_ops": rounds[0][i].get("aten_ops"),  # operators dispatched by one step
                "package": memory[i]["package"],
            }
        )
    return results


def run_worker(case: dict, args: argparse.Namespace, extra_env: dict) -> dict:
    return run_process([case], args, extra_env, batched=False)[0]


def run_by_impl(cases: list[dict], args: argparse.Namespace) -> list[dict]:
    """All the cases, one process per implementation (CUDA); results in the order of ``cases``."""
    results = {}
    for impl in dict.fromkeys(case["impl"] for case in cases):
        indices = [i for i, case in enumerate(cases) if case["impl"] == impl]
        batch = run_process([cases[i] for i in indices], args, {}, batched=True)
        results.update(zip(indices, batch))
    return [results[i] for i in range(len(cases))]


def run_process(cases: list[dict], args: argparse.Namespace, extra_env: dict, batched: bool) -> list[dict]:
    """Run ``worker.py`` once on the cases (all of one implementation): a list if ``batched``."""
    path = str(ROOT) if cases[0]["impl"] == "ours" else ensure_reference(args.ref_dir)
    env = {**os.environ, **extra_env, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
    payload = json.dumps(cases if batched else cases[0])
    proc = subprocess.run([sys.executable, str(WORKER), payload], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return [{**case, "error": tail} for case in cases]
    output = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{**case, **result} for case, result in zip(cases, output if batched else [output])]


def machine_info(args: argparse.Namespace) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_name(),
        "device": args.device,
        "autocast": args.autocast,
    }
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """columns: (key, header) pairs; floats print with 3 significant digits."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    print(f"\n{title}")
    for i, line in enumerate(table):
        print("  ".join(text.rjust(width) for text, width in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
    for row in rows:
        if "error" in row:
            print(f"! {row.get('impl')} {row.get('name', '')}: {row['error']}")


def write_json(name: str, args: argparse.Namespace, payload: dict) -> Path:
    path = Path(args.out) if args.out else RESULTS / f"{name}{'' if args.device == 'cpu' else '_' + args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(args), **payload}, indent=2))
    print(f"\nwrote {path}")
    return path


def write_rows(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows of an in-process comparison (hf_generation.py, conversation.py), with the run's arguments
    and the machine: CPU, torch and transformers versions, torch's threads."""
    import transformers

    machine = {"cpu": cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    machine["threads"] = torch.get_num_threads()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {**vars(args), "out": str(path)}, "machine": machine, "rows": rows}))
    print(f"wrote {path}")
