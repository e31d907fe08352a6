"""A pretrained model's weights sharded over 8 simulated devices equal one device's results.

JAX fixes its device count when first imported, so the check runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The weights are laid out on an
("alpha", "model") mesh (`models.hf.shard`): projections split over "model", the sweep's
alphas over "alpha"; the kernel keeps that layout (`kernel.driver.model_mesh`).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hf"

CHILD = textwrap.dedent(r'''
    import json, sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from ufmjax.kernel import sweep
    from ufmjax.models.hf import load_decoder, model_mesh, sharded_put, steered_closure

    folder = sys.argv[1]
    ref = np.load(folder + "/reference.npz")
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    alphas = np.linspace(-6, 6, 13)
    one = load_decoder(folder, put=lambda x, key: jax.device_put(x, jax.devices()[0]))
    concept_of = (np.arange(one.spec.vocab) % 5 == 0).astype(int)
    report = {"devices": len(jax.devices()), "worst": {}, "split": {}}
    for model_devices, modes in ((4, ("last",)),):  # a 2 x 4 mesh: both axes, all 8 devices
        mesh = model_mesh(model_devices)
        sharded = load_decoder(folder, put=sharded_put(mesh))
        spec = sharded.blocks[0].q_w[...].sharding.spec
        report["split"][str(model_devices)] = [str(s) for s in spec]
        for positions in modes:
            a = sweep(steered_closure(one, prompts, ref["vector"], 1, positions), alphas, concept_of=concept_of, derivatives=1,
                      devices=jax.devices()[:1])
            b = sweep(steered_closure(sharded, prompts, ref["vector"], 1, positions), alphas, derivatives=1,
                      concept_of=concept_of)
            worst = max(float(np.abs(np.asarray(a[k], float) - np.asarray(b[k], float)).max())
                        for k in a if k not in ("alphas", "tokens", "concept_of", "weights"))
            report["worst"][f"{model_devices}/{positions}"] = worst
    print(json.dumps(report))
''')


def test_sharded_weights_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(FIXTURES / "qwen3")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["split"]["4"][0] == "model"  # q_w split by rows
    assert max(report["worst"].values()) < 1e-5, report
