"""Many devices: the kernel shards the alpha axis over every visible device, same results.

JAX fixes its device count when it is first imported, and the pytest process has imported it
already, so the check runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8: eight CPU devices standing in for GPUs or
a TPU slice. Inside it, every kernel path (affine UFM, generic GPT, nested-jvp reference) is run
sharded over the 8 devices and on one device, with several chunk sizes; all must agree.
The same code runs unchanged on many GPUs or a TPU slice (`jax.devices()` is all it asks).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r'''
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    jax.config.update("jax_enable_x64", True)
    from ufmjax import kernel
    from ufmjax.models.gpt import GPT, GPTConfig, steered_closure
    from ufmjax.steering import Steered, linear_steered
    from ufmjax.kernel import sweep

    devices = jax.devices()
    report = {"devices": len(devices), "worst": {}, "shards": None, "retraced": None}

    def compare(name, a, b):
        worst = 0.0
        for key in a:
            if key in ("alphas", "tokens", "concept_of", "weights"):
                continue
            x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
        report["worst"][name] = max(report["worst"].get(name, 0.0), worst)

    rng = np.random.default_rng(0)
    M, V = 5, 37
    base, direction = rng.normal(size=(M, V)) * 3, rng.normal(size=(M, V)) * 2
    concept_of = np.arange(V) % 3
    ufm = linear_steered(base, direction)

    def generic_linear(params, alpha):
        return params["base"] + alpha * params["direction"]

    gen = Steered(generic_linear, ufm.params)
    model = GPT(GPTConfig(vocab=13, context=6, layers=2, width=16, heads=2), rngs=nnx.Rngs(0))
    gpt = steered_closure(model, rng.integers(0, 13, (3, 6)), rng.normal(size=16).astype(np.float32), 1, "all")
    gpt_concepts = np.arange(13) % 2
    alphas = np.linspace(-20, 20, 61)
    one = devices[:1]
    for dtype in (jnp.float32, jnp.float64):
        for name, st, co, method in (("affine", ufm, concept_of, "auto"), ("taylor", gen, concept_of, "auto"),
                                     ("jvp", gen, concept_of, "jvp"), ("gpt", gpt, gpt_concepts, "auto")):
            kw = dict(concept_of=co, dtype=dtype, method=method)
            single = sweep(st, alphas, devices=one, **kw)
            for chunk in (None, 8):  # the default chunk, and 8 short ones (61 -> 64, 1 per device)
                compare(f"{name}/{jnp.dtype(dtype).name}", sweep(st, alphas, chunk_size=chunk, **kw), single)

    # The alpha axis really is split: a sharded chunk in, a result spread over all 8 devices out.
    mesh = Mesh(np.asarray(devices), ("alpha",))
    ev = kernel.Evaluator(gen, kernel.make_measure(gen, concept_of=concept_of), order=0)
    chunk = jax.device_put(jnp.linspace(-1, 1, 16, dtype=jnp.float32), NamedSharding(mesh, PartitionSpec("alpha")))
    out = ev.chunk(chunk)[0]["kl"]
    report["shards"] = len(out.sharding.device_set)

    # The head path with its model part in batches (`model_batch`): each device takes its 4 of
    # the chunk's 32 alphas 2 at a time, the vocabulary walk all 4; the same as one device.
    gms = kernel.make_measure(gpt, concept_of=gpt_concepts, dtype=jnp.float64)
    at = np.linspace(-5, 5, 32)
    batched = kernel.Evaluator(gpt, gms, order=2, method="head", dtype=jnp.float64, model_batch=2)
    spread = batched.chunk(jax.device_put(jnp.asarray(at), batched.alpha_sharding))
    whole = kernel.Evaluator(gpt, gms, order=2, method="head", dtype=jnp.float64, devices=one).at(at)
    compare("head/model_batch/float64", {p + k: v for p, tree in zip(("", "d_", "d2_"), spread)
                                         for k, v in tree.items()}, whole)

    # No recompilation on 8 devices either: other alpha values and another model, same shapes.
    sweep(ufm, np.linspace(-3, 3, 61), concept_of=concept_of)
    before = kernel.trace_count()
    sweep(ufm, np.linspace(-7, 1, 61), concept_of=concept_of)
    sweep(linear_steered(base[::-1], direction[::-1]), np.linspace(-2, 5, 61), concept_of=concept_of)
    report["retraced"] = kernel.trace_count() - before
    print(json.dumps(report))
''')


@pytest.mark.slow
def test_sharded_sweeps_equal_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["shards"] == 8, "the alpha axis of a chunk must be split over all devices"
    assert report["retraced"] == 0, "a new grid of the same length or another model must not recompile"
    for name, worst in report["worst"].items():
        # Sharded vs single device, any chunk size: in float64 the same numbers to 1e-6 of each
        # curve's scale (in practice ~1e-14). In float32 the rounding of a reduction depends on
        # the compiled shape (per-device chunk), and second derivatives amplify it, so there the
        # bound is the documented float32 tolerance (README; the nested-jvp reference differs by
        # as much between shapes).
        bound = 1e-6 if name.endswith("float64") else 1e-4
        assert worst <= bound, f"{name}: sharded/chunked differs from single-device by {worst:.2e}"


MULTI = textwrap.dedent(r'''
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from ufmjax.steering import linear_steered
    from ufmjax.kernel import sweep

    rng = np.random.default_rng(0)
    base, direction = rng.normal(size=(5, 37)) * 3, rng.normal(size=(5, 37)) * 2
    out = sweep(linear_steered(base, direction), np.linspace(-20, 20, 61), concept_of=np.arange(37) % 3,
                dtype=jnp.float64)
    print(json.dumps({"devices": len(jax.devices()), "local": len(jax.local_devices()),
                      "out": {k: np.asarray(v).tolist() for k, v in out.items()}}))
''')


def test_two_processes_with_jax_distributed_equal_one_device(x64, tmp_path):
    """Multi-host as README describes it: jax.distributed.initialize in every process, the same
    script and grid everywhere; each process gets the whole result (2 processes x 2 devices)."""
    import socket

    import jax.numpy as jnp
    import numpy as np

    from ufmjax.steering import linear_steered
    from ufmjax.kernel import sweep

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    # Output to files, not pipes: a process blocked on a full pipe would hold the other one at
    # the distributed shutdown barrier.
    logs = [(tmp_path / f"out{i}.json", tmp_path / f"err{i}.txt") for i in range(2)]
    procs = []
    for i, (out_path, err_path) in enumerate(logs):
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            procs.append(subprocess.Popen([sys.executable, "-c", MULTI, str(i), address], stdout=out_f,
                                          stderr=err_f, text=True, env=env))
    outs = []
    for p, (out_path, err_path) in zip(procs, logs):
        try:
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, err_path.read_text()[-3000:]
        outs.append(json.loads(out_path.read_text().strip().splitlines()[-1]))
    rng = np.random.default_rng(0)
    base, direction = rng.normal(size=(5, 37)) * 3, rng.normal(size=(5, 37)) * 2
    ref = sweep(linear_steered(base, direction), np.linspace(-20, 20, 61), concept_of=np.arange(37) % 3,
                dtype=jnp.float64, devices=[__import__("jax").devices()[0]])
    for o in outs:
        assert o["devices"] == 4 and o["local"] == 2
        for key, want in ref.items():
            got = np.asarray(o["out"][key])
            scale = max(np.abs(want).max(), 1e-30)
            assert np.abs(got - want).max() <= 1e-6 * scale, key
