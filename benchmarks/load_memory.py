"""Peak resident memory of loading a whole model with `load_decoder` (memory-mapped, tensor by tensor).

The target: loading costs about (checkpoint size + largest tensor) over the process's baseline,
not twice the checkpoint. `measure(size_mb, tmpdir)` writes a float32 checkpoint shaped like a
small transformer (embedding, L layers of attention and MLP matrices, norms; the largest tensor
a few percent of the total), then loads it with `ufmjax.models.hf.load_decoder` in a FRESH subprocess, so nothing the parent
allocated while writing it counts. The child imports JAX and starts its CPU backend before
taking the baseline (a model loader has paid for that already), loads every tensor, keeps the
jax arrays alive as a model would, and reports its peak (VmHWM; see PEAK below).

    python benchmarks/load_memory.py --mb 512        # prints the result as JSON

Sizes are MiB (2**20 bytes) throughout, like the kernel's KiB counters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout: `python benchmarks/load_memory.py`
    sys.path.insert(0, str(ROOT))

from ufmjax.models.hf.checkpoint import SINGLE_FILE, write_safetensors  # noqa: E402

MIB = float(1 << 20)
LAYERS = 8

# PEAK: VmHWM, not ru_maxrss. Linux carries ru_maxrss across fork + exec, so a child started
# from a parent that is large (pytest after importing torch: ~850 MiB) reports the parent's
# size as its own peak; VmHWM belongs to the child's fresh address space only.

# The child: baseline after JAX's backend is up, then read + device_put tensor by tensor.
_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")

import numpy as np
import jax
jax.device_put(np.ones(4, np.float32)).block_until_ready()  # the backend is started
from flax import nnx
from ufmjax.models.hf import load_decoder

before = status("VmRSS")
start = time.perf_counter()
model = load_decoder(sys.argv[1])  # the whole model, as `ufmjax sweep --hf` loads it
params = {str(k): v for k, v in nnx.state(model, nnx.Param).flat_state()}
params = {k: v[...] for k, v in params.items()}
jax.block_until_ready(params)
seconds = time.perf_counter() - start
peak = status("VmHWM")  # this mm's high-water mark; see PEAK below on ru_maxrss
if peak != peak:  # no /proc: ru_maxrss, in KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"rss_before_mb": before, "peak_mb": peak, "rss_after_mb": status("VmRSS"),
                  "load_s": seconds, "device_bytes": sum(int(a.nbytes) for a in params.values())}))
"""


def transformer_shapes(size_mb: float, layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-shaped model of about `size_mb` MiB in float32: vocabulary 4D,
    per layer q/k/v/o (D, D), gated MLP gate/up (4D, D) and down (D, 4D), two norms; tied head.
    The largest tensors (embedding, MLP) are each 4 / (16 L + 4) of the total (3% at L = 8)."""
    floats = size_mb * MIB / 4
    width = max(8, int(round((floats / (16 * layers + 4)) ** 0.5 / 8)) * 8)
    shapes = {"model.embed_tokens.weight": (4 * width, width), "model.norm.weight": (width,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (width,), p + "post_attention_layernorm.weight": (width,),
                       p + "mlp.gate_proj.weight": (4 * width, width), p + "mlp.up_proj.weight": (4 * width, width),
                       p + "mlp.down_proj.weight": (width, 4 * width)})
        shapes.update({p + f"self_attn.{x}_proj.weight": (width, width) for x in "qkvo"})
    return shapes


def write_checkpoint(folder: Path, size_mb: float, seed: int = 0) -> Path:
    """A float32 Llama checkpoint folder of random values (not zeros, so no page is special):
    config.json and model.safetensors, loadable by `ufmjax.models.hf.load_decoder`."""
    rng = np.random.default_rng(seed)
    shapes = transformer_shapes(size_mb)
    width = shapes["model.norm.weight"][0]
    config = {"model_type": "llama", "hidden_size": width, "intermediate_size": 4 * width,
              "num_hidden_layers": LAYERS, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 4 * width, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu"}
    (Path(folder) / "config.json").write_text(json.dumps(config))
    tensors = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    return write_safetensors(Path(folder) / SINGLE_FILE, tensors, metadata={"format": "pt"})


def measure(size_mb: int, tmpdir, keep: bool = False) -> dict:
    """Write a ~size_mb MiB checkpoint under tmpdir, load it in a fresh process, and report
    resident memory: peak over the baseline, and that as a ratio of the checkpoint size
    (1.0 = the loaded arrays only). The checkpoint is deleted afterwards unless `keep`."""
    folder = Path(tempfile.mkdtemp(prefix="load_memory_", dir=tmpdir))
    try:
        path = write_checkpoint(folder, size_mb)
        shapes = transformer_shapes(size_mb)
        tensor_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
        largest = max(4 * int(np.prod(s)) for s in shapes.values())
        child = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(ROOT)],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"load_memory child failed ({child.returncode}): {child.stderr[-2000:]}")
        out = json.loads(child.stdout.strip().splitlines()[-1])
        assert out["device_bytes"] == tensor_bytes, (out["device_bytes"], tensor_bytes)
        checkpoint_mb = path.stat().st_size / MIB
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    over = out["peak_mb"] - out["rss_before_mb"]
    return {"checkpoint_mb": round(checkpoint_mb, 1), "largest_tensor_mb": round(largest / MIB, 1),
            "tensors": len(shapes), "rss_before_mb": round(out["rss_before_mb"], 1),
            "peak_mb": round(out["peak_mb"], 1), "rss_after_mb": round(out["rss_after_mb"], 1),
            "peak_over_baseline_mb": round(over, 1), "ratio": round(over / checkpoint_mb, 3),
            "load_s": round(out["load_s"], 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="checkpoint size in MiB (default 512)")
    parser.add_argument("--tmpdir", default=None, help="where to write it (default: the system temp dir)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.mb, args.tmpdir), indent=2))


if __name__ == "__main__":
    main()
