#!/usr/bin/env bash
# One pass over a machine with one NVIDIA GPU, in at most ~8 minutes: uses the Python whose jax already sees
# the GPU (else installs the CUDA jax into .venv-gpu: needs the package registry), then
#   1. the baseline at the arena's paper shape (d=768, 12 layers, 12 heads, seq 1024: 85M non-embedding
#      parameters, ~125M with a GPT-2 vocabulary) in bf16 with cuDNN flash attention and no remat, batch 64:
#      tokens/s and MFU against the GPU's dense bf16 peak (target >= 50% on an H100/H200);
#   2. every architecture at the arena's tiny shape, seq 256, with the GPU defaults ('auto': bf16, full remat,
#      fused attention).
# Writes results/gpu-baseline.{md,csv,png} and results/gpu-tiny.{md,csv,png}, each row with its command,
# commit, hardware and date.
#   bash experiments/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  [ -d .venv-gpu ] || { python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -r requirements.lock -e '.[gpu]'; }
  . .venv-gpu/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print(jax.devices())"
timeout 240 python -m experiments.bench --models transformer --sizes paper --seq_lens 1024 --tokens_per_step 65536 \
  --repeats 3 --steps_per_repeat 5 --case_timeout_s 200 --name gpu-baseline \
  --override model.dtype=bfloat16 model.remat=none model.attention_impl=cudnn
timeout 240 python -m experiments.bench --sizes tiny --seq_lens 256 --tokens_per_step 16384 --repeats 3 \
  --steps_per_repeat 5 --case_timeout_s 60 --name gpu-tiny
