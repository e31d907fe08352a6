"""The chunk sizer's cost model: only alpha-dependent intermediates count per alpha."""

import jax.numpy as jnp
import numpy as np

from ufmjax import steering
from ufmjax.kernel import default_chunk_size, largest_intermediate
from ufmjax.kernel.driver import WEIGHT_ROWS, balanced_chunk, plan_sweep, weight_rows
from ufmjax.kernel.measure import make_measure
from ufmjax.models import gpt


def _closure(positions, vocab=4000, width=16, prompts=2, T=6):
    model = gpt.init_gpt(gpt.GPTConfig(vocab=vocab, context=T, layers=2, width=width, heads=2), seed=0)
    toks = np.random.default_rng(0).integers(0, vocab, (prompts, T))
    return gpt.steered_closure(model, toks, np.ones(width, np.float32), 1, positions)


def test_alpha_independent_arrays_are_not_per_alpha():
    """The head's transposed unembedding [V, D] = 64,000 elements is computed once per chunk;
    the largest per-alpha array is the logits [B, V] (last position), or with every
    position steered the last block's queries, keys and values [B, T, 3D] (its MLP runs on the
    last position alone)."""
    st = _closure("last")
    assert largest_intermediate(st.fn, st.params, jnp.float32) == 2 * 4000
    st = _closure("all", vocab=40)
    assert largest_intermediate(st.fn, st.params, jnp.float32) == 2 * 6 * 3 * 16
    # A function of alpha alone plus a large constant product: only the [3] vector counts.
    big = jnp.ones((300, 300))
    assert largest_intermediate(lambda p, a: (p @ p).sum(0)[:3] * a, big, jnp.float32) == 3


def test_a_large_vocabulary_gets_more_than_one_alpha_per_chunk():
    """At a 50,257-token vocabulary (one 64-token prompt, last position) the chunk holds many
    alphas; counting the [V, D] transpose as per-alpha gave one (issue: 2.25 -> 1.06 s at 4)."""
    st = _closure("last", vocab=50257, width=8, prompts=1, T=4)
    inter = largest_intermediate(st.fn, st.params, jnp.float32)
    assert inter == 50257
    assert default_chunk_size(1, 50257, 1, inter, order=2) >= 8
    assert default_chunk_size(1, 50257, 1, 50257 * 8, order=2) < 8  # what the old count gave


def test_a_loop_carry_that_picks_alpha_up_inside_counts():
    """A scan whose carry enters constant and gains alpha in its body: the body's [8, 8, 8]
    array is per alpha (as in the same loop unrolled)."""
    import jax

    def body(h, a):
        big = jnp.einsum("i,j,k->ijk", h, h, h)
        return h + a + big.sum() * 1e-3, None

    def fn(p, a):
        return jax.lax.scan(body, p, jnp.full((3,), a))[0][None]

    def unrolled(p, a):
        h = p
        for _ in range(3):
            h = body(h, a)[0]
        return h[None]

    p = jnp.ones(8)
    assert largest_intermediate(fn, p, jnp.float32) == largest_intermediate(unrolled, p, jnp.float32) == 512


def test_weight_rows_count_the_rows_through_the_largest_constant_product():
    """weight_rows counts the rows one alpha sends through the largest product with a constant
    operand: the one block after the cut runs its MLP ([D, 4D], the largest weight) on each
    prompt's last position alone, 2 rows (its qkv weight [D, 3D] sees B * T = 12); a bare
    product with a [5, 7] matrix sees the moving operand's 3 rows; no product, none."""
    st = _closure("all", vocab=40, width=16, prompts=2, T=6)
    assert weight_rows(steering.head_of(st.fn).hidden, st.params, jnp.float32) == 2
    W = jnp.ones((5, 7))
    assert weight_rows(lambda p, a: (a * jnp.ones((3, 5))) @ p, W, jnp.float32) == 3
    assert weight_rows(lambda p, a: a * p, W, jnp.float32) == 0


def test_a_head_sweep_batches_its_model_part_apart_from_the_vocabulary_walk():
    """A head closure with 256 rows and a [256, 1024] intermediate. The chunk (alphas per call)
    is the vocabulary walk's: 2^20 // (3 * 256 * 32) = 42 alphas with both derivatives, cut
    evenly to 32 for a grid of 64 (42 would compute 84). The model part goes in batches: the
    element count alone gives 2^21 // (3 * 262,144) = 2 alphas; 2,048 rows per weight read
    summed over the three streams (768 per alpha) need 3, within 2^23 elements of
    intermediates (10): 3. With 2,048 rows per alpha the element count's 2 stays, and the chunk
    is 2^20 // (3 * 2048 * 32) = 5. For values alone, one stream: 8 alphas of 256 rows."""
    def plan(rows, order=2):
        rng = np.random.default_rng(0)
        width = 2 ** 18 // rows
        params = {"x": jnp.asarray(rng.normal(size=(rows, 64)), jnp.float32),
                  "v": jnp.ones(64, jnp.float32), "w1": jnp.ones((64, width), jnp.float32) / 64,
                  "w2": jnp.ones((width, 64), jnp.float32) / width, "W": jnp.ones((32, 64), jnp.float32)}

        def hidden(p, a):
            return jnp.tanh((p["x"] + a * p["v"]) @ p["w1"]) @ p["w2"]

        def fn(p, a):
            return steering.head_logits(steering.Unembedding(p["W"]), hidden(p, a))

        steering.register_head(fn, hidden, lambda p: steering.Unembedding(p["W"]))
        st = steering.Steered(fn, params)
        measure = make_measure(st, concept_of=np.arange(32) % 3, tokens=np.arange(4))
        p = plan_sweep(st, np.linspace(-1, 1, 64), measure, derivatives=order, chunk_size=None,
                       dtype=jnp.float32, devices=None, method="head")
        return p.chunk_size, p.model_batch

    assert WEIGHT_ROWS == 2048
    assert plan(256) == (32, 3)
    assert plan(2048) == (5, 2)
    assert plan(256, order=0) == (64, 8)


def test_balanced_chunks_cut_the_grid_evenly():
    """At most the cap, as few chunks as the cap allows, the padding of the last one minimal
    (up to rounding to an eighth of a power of two); per device when there are several."""
    assert balanced_chunk(64, 42, 1) == 32        # 2 chunks of 32, not 42 + 42 (20 padded)
    assert balanced_chunk(64, 7, 1) == 7          # 10 chunks are needed either way
    assert balanced_chunk(70, 42, 1) == 40        # 35 rounded up to an eighth of 64
    assert balanced_chunk(1000, 42, 1) == 42      # rounding never passes the cap
    assert balanced_chunk(5, 42, 1) == 5          # a short grid: one chunk that holds it
    assert balanced_chunk(9, 64, 1) == 10         # ... rounded to an eighth of 16
    assert balanced_chunk(64, 42, 2) == 32        # 32 per device, cap 21: 2 chunks of 16 each
    for A in range(1, 300):
        for cap in (1, 3, 7, 16, 42, 64):
            C = balanced_chunk(A, cap, 1)
            assert 1 <= C <= cap and -(-A // C) == -(-A // cap), (A, cap, C)
