"""The paper's method and ufmjax on the same pretrained-family weights, side by side.

The paper's method (Taimeskhanov et al., 2026, Sec. 4) in PyTorch: a forward pre-hook adds
alpha * v to the residual stream entering block l, alpha in the batch, one full forward pass
of the model per alpha, only the last position's logits computed, derivatives in alpha by
central differences (three passes). ufmjax: the prefix-cached closure of the same checkpoint
(`ufmjax.models.hf`) through the sweep kernel, derivatives exact.

`write_gpt2(folder, ...)` writes a GPT-2 checkpoint (config.json + model.safetensors, random
N(0, 0.02) weights, no tokenizer: the prompts are random token ids) that both load: ufmjax with
`load_decoder`, PyTorch with transformers' `GPT2LMHeadModel.from_pretrained`. `TorchPaper`
is the baseline; it needs torch and transformers (optional: `available()` says whether they
import). `matmul_rate()` measures the float32 matrix-product rate of this machine, the scale
every "share of the hardware" is read against.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def write_gpt2(folder, *, layers: int, width: int, heads: int, vocab: int, context: int, seed: int = 0) -> Path:
    """A GPT-2 checkpoint of the given shape in `folder` (created), float32, tied head."""
    from ufmjax.models.hf.checkpoint import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    D, F = width, 4 * width
    t = {"transformer.wte.weight": normal(vocab, D), "transformer.wpe.weight": normal(context, D, std=0.01),
         "transformer.ln_f.weight": np.ones(D, np.float32), "transformer.ln_f.bias": np.zeros(D, np.float32)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": np.ones(D, np.float32), p + "ln_1.bias": np.zeros(D, np.float32),
                  p + "ln_2.weight": np.ones(D, np.float32), p + "ln_2.bias": np.zeros(D, np.float32),
                  p + "attn.c_attn.weight": normal(D, 3 * D), p + "attn.c_attn.bias": normal(3 * D, std=0.01),
                  p + "attn.c_proj.weight": normal(D, D), p + "attn.c_proj.bias": normal(D, std=0.01),
                  p + "mlp.c_fc.weight": normal(D, F), p + "mlp.c_fc.bias": normal(F, std=0.01),
                  p + "mlp.c_proj.weight": normal(F, D), p + "mlp.c_proj.bias": normal(D, std=0.01)})
    write_safetensors(folder / "model.safetensors", t, metadata={"format": "pt"})
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": D, "n_head": heads,
              "n_layer": layers, "n_positions": context, "n_inner": None, "vocab_size": vocab,
              "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
              "bos_token_id": 0, "eos_token_id": 0, "scale_attn_weights": True, "dtype": "float32",
              "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def available() -> str | None:
    """None when torch and transformers import, else why not (the baseline is then skipped)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"
    return None


class TorchPaper:
    """The paper's method in PyTorch on a GPT-2 folder: hook, alpha in the batch, full passes."""

    def __init__(self, folder, threads: int | None = None, device: str | None = None):
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = transformers.GPT2LMHeadModel.from_pretrained(str(folder), dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        self.version = f"torch {torch.__version__} on {self.device}"

    def logits(self, tokens_BxT, v_D, layer: int, alphas_A, positions: str) -> np.ndarray:
        """Last-position logits [A, B, V] with alpha * v added to the input of block `layer`
        (layer = number of blocks: the last block's output), every alpha in one batch."""
        torch = self.torch
        ids = torch.as_tensor(np.asarray(tokens_BxT), dtype=torch.long, device=self.device)
        B, T = ids.shape
        alphas = torch.as_tensor(np.asarray(alphas_A, np.float32), device=self.device)
        v = torch.as_tensor(np.asarray(v_D, np.float32), device=self.device)
        add = alphas.repeat_interleave(B)[:, None, None] * v  # [A*B, 1, D]
        blocks = self.model.transformer.h

        def steer(h):
            if positions == "all":
                return h + add
            h = h.clone()
            h[:, -1:] += add
            return h

        if layer < len(blocks):
            hook = blocks[layer].register_forward_pre_hook(
                lambda mod, args, kwargs: ((steer(args[0]),) + tuple(args[1:]), kwargs), with_kwargs=True)
        else:
            hook = blocks[-1].register_forward_hook(
                lambda mod, args, out: (steer(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else steer(out))
        try:
            with torch.inference_mode():
                h = self.model.transformer(input_ids=ids.repeat(len(alphas), 1), use_cache=False).last_hidden_state
                y = self.model.lm_head(h[:, -1])  # only the last position's logits
        finally:
            hook.remove()
        return y.reshape(len(alphas), B, -1).cpu().numpy()  # the copy back waits for the device

    def central_differences(self, tokens_BxT, v_D, layer: int, alphas_A, positions: str, h: float = 1e-2):
        """(values, first, second derivative) of the logits by central differences: 3 passes."""
        a = np.asarray(alphas_A, np.float32)
        y0, yp, ym = (self.logits(tokens_BxT, v_D, layer, a + s, positions) for s in (0.0, h, -h))
        return y0, (yp - ym) / (2 * h), (yp - 2 * y0 + ym) / (h * h)


def matmul_probe(n: int | None = None):
    """(call, flops): one float32 n x n matrix product in jax, compiled and warmed up (n = 1536
    on a CPU, 8192 on an accelerator), to time beside the kernel."""
    import jax
    import jax.numpy as jnp

    n = n or (1536 if jax.default_backend() == "cpu" else 8192)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return (lambda: jax.block_until_ready(f(a))), 2.0 * n ** 3


def stream_probe(rows: int, width: int, block_one: int, block_three: int):
    """(one, three, (rows_one, rows_three)): one stream of an MLP's products ([R, D] @ [D, 4D],
    GELU, @ [4D, D]) walked in blocks of `block_one` rows, and three independent streams of
    the same shape walked together in blocks of `block_three` rows (`jax.lax.map`, as the
    kernel's model part walks its batches), compiled and warmed up. Each walks at least `rows`
    rows, whole blocks only: rows_one and rows_three say how many, so three / one is compared
    per row. Three streams of products are what a Taylor-series pass costs at least, so that
    ratio is this machine's floor for derivatives / values on a model made of such products.
    `rows` should exceed what the cache holds: a probe that repeats one small block finds its
    whole working set still in cache from the call before (one [2048, 1536] intermediate fits
    a 32 MB cache, three do not), which no sweep does; that version read 3.3-4.0x where
    streaming reads 3.1-3.2x."""
    import jax
    import jax.numpy as jnp

    for name, value in (("rows", rows), ("width", width), ("block_one", block_one), ("block_three", block_three)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n1, n3 = (block * -(-rows // block) for block in (block_one, block_three))
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.standard_normal((4 * width, width), dtype=np.float32) / np.sqrt(width))
    w2 = jnp.asarray(rng.standard_normal((width, 4 * width), dtype=np.float32) / np.sqrt(4 * width))
    x = jnp.asarray(rng.standard_normal((3, max(n1, n3), width), dtype=np.float32))

    def mlp(x_RxD):
        return jnp.einsum("rf,df->rd", jax.nn.gelu(jnp.einsum("rd,fd->rf", x_RxD, w1)), w2)

    def blocks(x_SxRxD, n, block):  # the first n rows of [S, R, D] -> [n / block, S, block, D]
        return x_SxRxD[:, :n].reshape(x_SxRxD.shape[0], n // block, block, width).transpose(1, 0, 2, 3)

    def one_fn(x):
        return jax.lax.map(lambda b: mlp(b[0]), blocks(x[:1], n1, block_one)).reshape(n1, width)

    def three_fn(x):
        y = jax.lax.map(lambda b: [mlp(b[i]) for i in range(3)], blocks(x, n3, block_three))
        return [yi.reshape(n3, width) for yi in y]

    f1, f3 = jax.jit(one_fn), jax.jit(three_fn)
    jax.block_until_ready((f1(x), f3(x)))
    return (lambda: jax.block_until_ready(f1(x))), (lambda: jax.block_until_ready(f3(x))), (n1, n3)


def matmul_rate(rounds: int = 5, n: int | None = None) -> float:
    """This machine's float32 matrix-product rate in GFLOP/s (`matmul_probe`, best round)."""
    call, flops = matmul_probe(n)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9
