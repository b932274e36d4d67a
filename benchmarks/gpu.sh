#!/usr/bin/env bash
# The device tests, then every benchmark on a CUDA GPU with bf16 autocast (generation: bf16
# weights), ours against flamingo-pytorch 0.1.2:
#     bash benchmarks/gpu.sh [extra flags for the four model benchmarks, e.g. --rounds 2]
# Results go to benchmarks/results/*_cuda.json. Memory is torch.cuda.max_memory_allocated above
# the level before the timed steps; 0.1.2 is installed into $FLAMINGO_REF_DIR (default /tmp/ref012).
# On CUDA each script starts two processes per round (ours, 0.1.2), and a CUDA process took about
# 15 s to start on the H200 we measured: with `--rounds 2`, expect roughly 6 minutes in all.
# `--batch 8 --seq 2048` gives the GPU enough work per kernel launch to measure it, not the host.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
"$python" -m pytest -q tests/test_devices.py  # CUDA variants: layouts, bf16 training step, decoding, no host sync
for script in training_step media_items sequence_length torch_compile; do
    "$python" "benchmarks/$script.py" --device cuda --autocast bf16 "$@"
done
"$python" benchmarks/generation.py --device cuda --dtype bfloat16 --ref-path "${FLAMINGO_REF_DIR:-/tmp/ref012}"
