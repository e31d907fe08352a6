#!/usr/bin/env bash
# One short call on a machine with a GPU: the kernel, training and the paper-method comparison,
# written as the same bench.md / bench.json tables as on the CPU.
#
#   bash benchmarks/device.sh [OUT]        # OUT defaults to $OUT, else results/device
#
# Run from the repository root. Nothing is downloaded: the machine's own JAX build is used when
# it sees the GPU (an image with jax[cuda] installed, as the lent H200s have); else wheels of a
# CUDA JAX build carried in .whl/ (see the device notes) are installed into /tmp/site first.
# ufmjax itself runs from the source tree (PYTHONPATH), so no install is needed. PyTorch and
# transformers, when they import, give the paper-method baseline (on the GPU when torch sees it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/device}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 UFMJAX_PROGRESS=0
py="${PYTHON:-python3}"

backend() { "$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none; }
if [ "$(backend)" != "gpu" ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$py" - <<'EOF' | tee "$out/device.txt"
import jax, platform
print("python", platform.python_version(), "jax", jax.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
except Exception as e:
    print("torch: not importable:", e)
EOF
# The UFM kernel against the exp floor, the GPT kernel paths, training and the paper method.
# Default sizes (the issue's 6-layer, width-384, 50,257-token model for the paper rows).
"$py" benchmarks/bench.py --sections ufm_exp,gpt,train,paper --out "$out" 2>&1 | tee "$out/bench.log"
