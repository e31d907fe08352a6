"""The chunk sizer's cost model: only alpha-dependent intermediates count per alpha."""

import jax.numpy as jnp
import numpy as np

from ufmjax.kernel import default_chunk_size, largest_intermediate
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
