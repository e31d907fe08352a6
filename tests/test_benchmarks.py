"""The performance work: fast kernel paths equal the reference, and the benchmark runs (quick).

The fast paths of `ufmjax.kernel` (the affine path for closures linear in alpha, the generic
path that differentiates the model only) must equal the reference kernel, which pushes nested
jax.jvp through every quantity (method="jvp"), to rounding. Timings are never asserted: the
quick benchmark is run so that it cannot break silently.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufmjax import kernel as sweep_mod
from ufmjax.cli import load_bench, main
from ufmjax.kernel import affine, sweep, upper_envelope
from ufmjax.steering import Steered, linear_steered

bench = load_bench()  # benchmarks/bench.py: outside the package, loaded from the checkout

SKIP = ("alphas", "tokens", "concept_of", "weights")


def generic_linear(params, alpha):
    """linear_logits under another name: not registered affine, so it takes the generic paths."""
    return params["base"] + alpha * params["direction"]


def assert_same(a, b, rtol, what=""):
    """Every quantity of two sweeps within rtol of the curve's own scale."""
    assert set(a) == set(b)
    for key in a:
        if key in SKIP:
            continue
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        assert np.all(np.isfinite(x)), (what, key)
        scale = max(np.abs(y).max(), 1e-300)
        err = np.abs(x - y).max() / scale
        assert err <= rtol, f"{what} {key}: relative error {err:.2e} > {rtol:.0e}"


def random_linear(rng, M=4, V=23, G=3, shared=False):
    base = rng.normal(size=(M, V)) * 3
    direction = rng.normal(size=V if shared else (M, V)) * 2
    concept_of = rng.integers(0, G, V)
    concept_of[:G] = np.arange(G)
    return base, direction, concept_of


@pytest.mark.parametrize("shared", [False, True])
def test_affine_and_taylor_paths_equal_nested_jvp(x64, shared):
    """All three kernel paths agree to ~1e-12 in float64, from alpha = -1e6 to 1e6, for every
    kind of CE target; a mismatch means a closed form in kernel.affine.affine_quantities or
    kernel.taylor.taylor_quantities is wrong."""
    rng = np.random.default_rng(3)
    base, direction, concept_of = random_linear(rng, shared=shared)
    fast = linear_steered(base, direction)
    generic = Steered(generic_linear, fast.params)
    alphas = np.concatenate([np.linspace(-25, 25, 51), [-1e6, -1e3, -1e-3, 1e-3, 1e3, 1e6]])
    M, V = base.shape
    targets = [None, rng.dirichlet(np.ones(V), M), rng.integers(0, V, M)]
    for derivatives in (0, 1, 2):
        for ce_target in targets:
            kw = dict(concept_of=concept_of, ce_target=ce_target, derivatives=derivatives, dtype=jnp.float64,
                      weights=rng.dirichlet(np.ones(M)))
            ref = sweep(generic, alphas, method="jvp", **kw)
            assert_same(sweep(fast, alphas, **kw), ref, 1e-11, "affine")
            assert_same(sweep(generic, alphas, **kw), ref, 1e-11, "taylor")
            assert_same(sweep(fast, alphas, method="taylor", **kw), ref, 1e-11, "taylor on a UFM closure")


def test_affine_path_over_several_vocabulary_blocks(x64):
    """A vocabulary of several blocks (and a partial last one) gives the same sums."""
    rng = np.random.default_rng(9)
    V = 2 * affine.VOCAB_BLOCK + 77
    base, direction, concept_of = random_linear(rng, M=3, V=V, G=5)
    fast = linear_steered(base, direction)
    alphas = np.array([-1e3, -4.0, -0.5, 0.0, 0.3, 2.0, 9.0, 1e3])
    kw = dict(concept_of=concept_of, tokens=np.array([0, V // 2, V - 1]), dtype=jnp.float64,
              ce_target=rng.integers(0, V, 3))
    assert_same(sweep(fast, alphas, **kw), sweep(Steered(generic_linear, fast.params), alphas, method="jvp", **kw),
                1e-11, "blocked affine")


def test_affine_path_is_taken_for_the_ufm_and_tracked_tokens(x64):
    """The UFM closure takes the affine path by default; a token subset equals the full curves."""
    rng = np.random.default_rng(4)
    base, direction, concept_of = random_linear(rng, M=3, V=40)
    fast = linear_steered(base, direction)
    alphas = np.linspace(-10, 10, 21)
    before = sweep_mod.trace_count()
    full = sweep(fast, alphas, concept_of=concept_of, dtype=jnp.float64)
    tok = np.array([0, 7, 39])
    sub = sweep(fast, alphas, concept_of=concept_of, tokens=tok, dtype=jnp.float64)
    for prefix in ("", "d_", "d2_"):
        np.testing.assert_allclose(sub[prefix + "delta_p"], full[prefix + "delta_p"][:, :, tok], atol=1e-15)
    assert sweep_mod.trace_count() > before
    assert affine.affine_chunk_fn.cache_info().currsize >= 1


def test_generic_path_on_a_gpt_equals_nested_jvp(x64):
    """The generic path (forward mode through the model, softmax in closed form) on a GPT."""
    from ufmjax.models.gpt import GPT, GPTConfig, steered_closure

    model = GPT(GPTConfig(vocab=11, context=6, layers=2, width=16, heads=2), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    prompts = rng.integers(0, 11, (3, 6))
    v = rng.normal(size=16).astype(np.float32)
    concept_of = np.arange(11) % 3
    alphas = np.linspace(-30, 30, 13)
    for positions in ("all", "last"):
        st = steered_closure(model, prompts, v, 1, positions)
        kw = dict(concept_of=concept_of, dtype=jnp.float64, ce_target=rng.integers(0, 11, 3))
        assert_same(sweep(st, alphas, **kw), sweep(st, alphas, method="jvp", **kw), 1e-10, positions)


def test_chunk_size_does_not_change_results(x64):
    rng = np.random.default_rng(6)
    base, direction, concept_of = random_linear(rng, M=5, V=31)
    fast = linear_steered(base, direction)
    generic = Steered(generic_linear, fast.params)
    alphas = np.linspace(-12, 17, 45)
    for st in (fast, generic):
        outs = [sweep(st, alphas, concept_of=concept_of, chunk_size=c, dtype=jnp.float64) for c in (1, 7, 64, None)]
        for out in outs[1:]:
            assert_same(out, outs[0], 1e-13, f"chunking {st.fn.__name__}")


def test_upper_envelope_gives_the_most_likely_token():
    """vertices[sum(breaks <= alpha)] attains max_z (l_z + alpha u_z), ties and constant u included."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        M, V = 3, int(rng.integers(1, 30))
        l, u = rng.normal(size=(M, V)), rng.normal(size=(M, V))
        if trial % 3 == 0:  # ties in u and l
            l, u = np.round(l), np.round(u)
        if trial % 5 == 0:
            u[:] = 1.0
        breaks, verts = upper_envelope(l, u)
        for b in breaks:
            assert np.all(np.diff(b[np.isfinite(b)]) >= 0), "breaks must increase"
        alphas = np.concatenate([rng.normal(size=40) * 10, [-1e6, 0.0, 1e6]])
        for m in range(M):
            idx = verts[m][np.sum(breaks[m][None] <= alphas[:, None], axis=1)]
            x = l[m][None] + alphas[:, None] * u[m][None]
            got = x[np.arange(alphas.size), idx]
            np.testing.assert_allclose(got, x.max(axis=1), rtol=1e-12, atol=1e-9)


def test_affine_kernel_does_not_recompile_for_another_model_or_grid():
    """Same shapes, other alpha values, another model (another envelope): no new trace."""
    rng = np.random.default_rng(8)
    base, direction, concept_of = random_linear(rng, M=4, V=200)
    kw = dict(concept_of=concept_of, chunk_size=32)
    sweep(linear_steered(base, direction), np.linspace(-5, 5, 40), **kw)
    before = sweep_mod.trace_count()
    sweep(linear_steered(base, direction), np.linspace(-9, 3, 40), **kw)
    base2, direction2, _ = random_linear(rng, M=4, V=200)
    sweep(linear_steered(base2, direction2), np.linspace(-1, 1, 40), **kw)
    assert sweep_mod.trace_count() == before


def test_numpy_baseline_is_the_same_computation():
    """The benchmark's NumPy loop computes what the kernel computes (else the ratio is moot)."""
    steered, concept_of = bench.synthetic_ufm(3, 50)
    W, H, v = (np.asarray(steered.params[k]) for k in ("W", "H", "v"))
    l, u = (W @ H).T.astype(np.float32), np.broadcast_to(W @ v, (3, 50)).astype(np.float32)
    onehot = np.eye(4, dtype=np.float32)[concept_of]
    alphas, tokens = np.linspace(-5, 5, 6), np.arange(50)
    ref = bench.numpy_sweep(l, u, alphas, tokens, onehot, 2)
    got = sweep(steered, alphas, concept_of=concept_of)
    # Both in float32: equal within the documented float32 tolerance (1e-4 of each curve's scale).
    for key in ("delta_p", "d_delta_p", "d2_delta_p", "kl", "d_kl", "entropy", "d_entropy", "d2_entropy"):
        scale = np.abs(ref[key]).max()
        np.testing.assert_allclose(got[key], ref[key], atol=bench.TOL_F32_REL * scale, err_msg=key)
    for prefix in ("", "d_", "d2_"):
        want = ref[prefix + "concept"]
        np.testing.assert_allclose(got[prefix + "delta_p_concept"] * np.bincount(concept_of), want,
                                   atol=bench.TOL_F32_REL * np.abs(want).max(), err_msg=prefix + "concept")


def test_float32_within_documented_tolerance_of_float64():
    """The README's float32 tolerance, as the benchmark measures it (not a timing)."""
    sec = bench.section_precision({}, 1)
    assert sec.rows and all(r.met for r in sec.rows), [(r.name, r.value) for r in sec.rows]


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    """`ufmjax bench --quick` runs every section and writes a report with finite ratios."""
    assert main(["bench", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    md = (tmp_path / "bench.md").read_text()
    assert report["mode"] == "quick" and report["machine"]["cores"] >= 1
    names = [s["name"] for s in report["sections"]]
    assert names == list(bench.SECTIONS)
    for s in report["sections"]:
        assert s["error"] is None, (s["name"], s["error"])
        assert s["rows"], s["name"]
        assert s["title"] in md
        for r in s["rows"]:
            assert math.isfinite(r["value"]), (s["name"], r["name"])
    # Every target of the issue is reported (met or not), with its measured value.
    targets = [r for s in report["sections"] for r in s["rows"] if r["target"]]
    assert len(targets) >= 10 and all(r["met"] in (True, False) for r in targets)
    # sweep_memory: both `ufmjax sweep` runs wrote their files (else the section fails) and the
    # 1e8-alpha grid was refused with its estimate (the reference UFM: 2612 bytes per alpha).
    mem = {r["name"]: r for s in report["sections"] if s["name"] == "sweep_memory" for r in s["rows"]}
    assert "--max-output" in mem["1e8 alphas refused (a fresh process, start-up included)"]["note"]
    assert "243 GiB" in mem["1e8 alphas refused (a fresh process, start-up included)"]["note"]
    assert mem["peak memory 100,000 / 1,000 alphas"]["target"] == "<= 1.2"


def test_bench_rejects_unknown_sections(tmp_path):
    assert main(["bench", "--quick", "--sections", "nope", "--out", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="mode"):
        bench.run_bench("slow", tmp_path)


def test_paper_baseline_is_the_same_model():
    """benchmarks/paper.py: the generated GPT-2 checkpoint gives the same steered logits in
    ufmjax and in transformers (the paper's hook, alpha in the batch), at every position steered
    and at the last one; its central differences approach ufmjax's exact derivatives."""
    import importlib.util
    import tempfile
    from pathlib import Path

    import jax

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from ufmjax.kernel.series import series_jets
    from ufmjax.models.hf import load_decoder, steered_closure

    spec = importlib.util.spec_from_file_location("paper_bench", Path(bench.__file__).with_name("paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    with tempfile.TemporaryDirectory() as tmp:
        folder = paper.write_gpt2(Path(tmp) / "g", layers=3, width=32, heads=4, vocab=300, context=12)
        model = load_decoder(folder, "float32")
        torch_paper = paper.TorchPaper(folder)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 300, (2, 12))
    v = rng.normal(size=32).astype(np.float32) * 0.05  # alpha |v| comparable to |h|: smooth at h = 1e-2
    alphas = np.asarray([-2.0, 0.0, 1.5], np.float32)
    for layer in (1, 3):
        for positions in ("all", "last"):
            st = steered_closure(model, list(toks), v, layer, positions)
            jets = jax.jit(jax.vmap(lambda a: series_jets(st.fn, st.params, a, 2)))(jnp.asarray(alphas))
            y, d1, d2 = torch_paper.central_differences(toks, v, layer, alphas, positions, h=1e-2)
            np.testing.assert_allclose(np.asarray(jets[0]), y, atol=2e-5 * np.abs(y).max())
            np.testing.assert_allclose(np.asarray(jets[1]), d1, atol=1e-3 * np.abs(d1).max())  # measured 1.5e-4
            np.testing.assert_allclose(np.asarray(jets[2]), d2, atol=2e-2 * np.abs(d2).max())  # measured 4e-3


def test_stream_probe_runs_three_independent_streams_of_the_same_products():
    """benchmarks/paper.py's three-stream floor: the three-stream program computes the one-stream
    program's products on each of its three inputs (the first equal to one stream's, the others
    different inputs, not copies)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("paper_bench", Path(bench.__file__).with_name("paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    one, three, (n1, n3) = paper.stream_probe(90, 16, 32, 48)
    assert (n1, n3) == (96, 96)  # whole blocks, at least the rows asked for
    y1, y3 = np.asarray(one()), [np.asarray(y) for y in three()]
    assert y1.shape == (96, 16) and [y.shape for y in y3] == [(96, 16)] * 3
    np.testing.assert_allclose(y3[0], y1, rtol=1e-5, atol=1e-6)
    assert np.abs(y3[1] - y3[0]).max() > 1e-2 and np.abs(y3[2] - y3[1]).max() > 1e-2
    # every row of the blocked walk is the product of its own input row (blocks put back in order;
    # the first stream's inputs do not depend on how many rows are drawn)
    one_whole, three_ragged, (n, n3) = paper.stream_probe(96, 16, 96, 40)
    assert n == 96
    np.testing.assert_allclose(np.asarray(one_whole()), y1, rtol=1e-5, atol=1e-6)
    assert n3 == 120 and np.asarray(three_ragged()[0]).shape == (120, 16)
    with pytest.raises(ValueError, match="block_three must be a positive integer"):
        paper.stream_probe(100, 16, 32, 0)
