"""KL on rollouts: rollouts and teacher-forced KL against plain forwards, derivatives against
central differences, and the budget solved by Newton against regula falsi.

The references share no code with `analysis.rollout`, and decode one step at a time with
"last" steering as one pass per predicting position: for the GPT, the architecture written
again in float64 numpy on the growing sequence; for a pretrained decoder, its own prefix and
suffix on unpadded sequences (each prompt from position 0, no left padding), steered at the
cut, as one compiled program of fixed width (the unfilled slots to the right hidden by
causality), so the file stays fast on two cores.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ufmjax.analysis import rollout as R
from ufmjax.models.gpt import GPT, GPTConfig
from ufmjax.models.hf import load_decoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
CFG = GPTConfig(vocab=11, context=12, layers=2, width=16, heads=2, mlp_ratio=2)
P, T, B, LAYER = 4, 6, 5, 1


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def random_gpt(cfg: GPTConfig, seed: int) -> GPT:
    """A GPT with large random weights (peaked logits that steering bends visibly), drawn here:
    `init_gpt` compiles an initialiser, seconds this file does not need to spend."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), jnp.float64)
        if "embedding" in name:  # float32 values: nnx.Embed looks them up in its float32 dtype
            return jnp.asarray(rng.normal(size=x.shape).astype(np.float32), jnp.float64)
        return jnp.asarray(0.3 * rng.normal(size=x.shape), jnp.float64)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def gpt():
    return random_gpt(CFG, 0)


@pytest.fixture(scope="module")
def gpt_setup(gpt):
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, CFG.vocab, size=(B, P)).astype(np.int32)
    v = 0.7 * rng.normal(size=CFG.width)
    rms = {pos: R.gpt_rollout_model(gpt, prompts, v, LAYER, pos, jnp.float64) for pos in ("all", "last")}
    return prompts, v, rms


def _norm(x, scale, bias, eps):
    x = x - x.mean(axis=-1, keepdims=True)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * scale + bias


def _gelu(x):  # the tanh form, jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_gpt(W: dict, tokens_BxN, add_BxNxD) -> np.ndarray:
    """The GPT of Sec. 4 written again in float64 numpy (W: its weights as a plain dict): full
    logits [B, N, V], `add` added to the residual entering block LAYER."""
    H, eps = CFG.heads, CFG.norm_eps
    tokens = np.asarray(tokens_BxN)
    Bn, N = tokens.shape
    h = W["embed"]["embedding"][tokens] + W["pos"][:N]
    causal = np.tril(np.ones((N, N), bool))
    for layer, blk in sorted(W["blocks"].items()):
        if layer == LAYER:
            h = h + add_BxNxD
        qkv = _norm(h, blk["ln1"]["scale"], blk["ln1"]["bias"], eps) @ blk["qkv"]["kernel"] + blk["qkv"]["bias"]
        q, k, v = (z.reshape(Bn, N, H, -1) for z in np.split(qkv, 3, axis=-1))
        sc = np.where(causal, np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1]), -np.inf)
        w = np.exp(sc - sc.max(axis=-1, keepdims=True))
        att = np.einsum("bhqk,bkhe->bqhe", w / w.sum(axis=-1, keepdims=True), v).reshape(Bn, N, -1)
        h = h + att @ blk["proj"]["kernel"] + blk["proj"]["bias"]
        x = _norm(h, blk["ln2"]["scale"], blk["ln2"]["bias"], eps)
        h = h + _gelu(x @ blk["fc"]["kernel"] + blk["fc"]["bias"]) @ blk["out"]["kernel"] + blk["out"]["bias"]
    return _norm(h, W["ln_f"]["scale"], W["ln_f"]["bias"], eps) @ W["unembed"]["kernel"]


@pytest.fixture(scope="module")
def gpt_forward(gpt):
    """`numpy_gpt` on this GPT's weights: shares no code with the model or the rollout."""
    W = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(gpt)))
    return lambda tokens, add: numpy_gpt(W, tokens, add)


def _steer_mask(lengths, N, positions):
    """[B, N]: where alpha * v is added when row b predicts its next token from position
    lengths[b] - 1: every position so far ("all") or that one alone ("last")."""
    j = np.arange(N)[None]
    L = np.asarray(lengths)[:, None]
    return (j < L) if positions == "all" else (j == L - 1)


def _log_softmax(y):
    y = y - y.max(axis=-1, keepdims=True)
    return y - np.log(np.exp(y).sum(axis=-1, keepdims=True))


def gpt_reference_rollout(forward, prompts, v, alpha, new, positions):
    """Greedy decoding one token at a time: the forward on the growing sequence, argmax."""
    seq = prompts.copy()
    for _ in range(new):
        n = seq.shape[1]
        m = _steer_mask([n] * len(seq), n, positions)
        y = forward(seq, alpha * m[..., None] * v)[:, -1]
        seq = np.concatenate([seq, np.argmax(y, axis=-1)[:, None]], axis=1)
    return seq[:, prompts.shape[1]:]


def gpt_reference_kl(forward, prompts, v, alpha, cont, positions):
    """KL(steered || base) per continuation token from separate steered and unsteered forwards."""
    seq = np.concatenate([prompts, cont], axis=1)
    Bn, N = seq.shape
    base = _log_softmax(forward(seq, np.zeros((Bn, N, v.size))))
    out = np.zeros(cont.shape)
    for i in range(cont.shape[1]):
        s = prompts.shape[1] - 1 + i  # the position predicting continuation token i
        m = _steer_mask([s + 1] * Bn, s + 1, positions)
        lp = _log_softmax(forward(seq[:, :s + 1], alpha * m[..., None] * v))[:, s]
        out[:, i] = (np.exp(lp) * (lp - base[:, s])).sum(axis=-1)
    return out


# ---------------------------------------------------------------- GPT

@pytest.mark.parametrize("positions", ["all", "last"])
def test_gpt_rollout_and_kl_equal_step_by_step_forwards(gpt_setup, gpt_forward, positions):
    prompts, v, rms = gpt_setup
    rm = rms[positions]
    for alpha in (0.0, 2.5, -4.0):
        cont = R.rollout(rm, alpha, T)
        np.testing.assert_array_equal(cont, gpt_reference_rollout(gpt_forward, prompts, v, alpha, T, positions),
                                      err_msg="the compiled rollout no longer decodes as the model does")
        got = R.rollout_kl(rm, alpha, cont)
        ref = gpt_reference_kl(gpt_forward, prompts, v, alpha, cont, positions)
        np.testing.assert_allclose(got.kl_BxT, ref, rtol=1e-9, atol=1e-12,
                                   err_msg="teacher-forced KL differs from two plain forwards")
        if alpha == 0.0:
            assert np.abs(got.kl_BxT).max() <= 1e-6 and np.abs(got.d_kl_BxT).max() <= 1e-6
    assert got.summary["max"] > 0.05, "the test model barely reacts to steering: the checks above are weak"
    # the steered continuation differs from the unsteered one somewhere (a real rollout test)
    assert not np.array_equal(R.rollout(rm, -4.0, T), R.rollout(rm, 0.0, T))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_tokens_fixed_derivative_equals_central_differences(gpt_setup, positions):
    _, _, rms = gpt_setup
    rm, alpha, h = rms[positions], 1.7, 1e-5
    cont = R.rollout(rm, alpha, T)
    mid = R.rollout_kl(rm, alpha, cont)
    plus, minus = (R.rollout_kl(rm, alpha + s, cont) for s in (h, -h))  # (order 1: compiled already)
    fd_BxT = (plus.kl_BxT - minus.kl_BxT) / (2 * h)
    np.testing.assert_allclose(mid.d_kl_BxT, fd_BxT, rtol=1e-5, atol=1e-9 * np.abs(fd_BxT).max())
    for s in R.STATS:
        fd = (plus.summary[s] - minus.summary[s]) / (2 * h)
        assert abs(mid.d_summary[s] - fd) <= 1e-5 * abs(fd) + 1e-10, (s, mid.d_summary[s], fd)
    # the summaries are numpy's own percentiles
    flat = mid.kl_BxT.ravel()
    for s, q in R.PERCENTILES.items():
        assert abs(mid.summary[s] - np.percentile(flat, q)) <= 1e-14
    assert mid.summary["mean"] == pytest.approx(flat.mean(), abs=1e-15) and mid.summary["max"] == flat.max()
    # the Fisher information at alpha = 0 is the curvature of KL there
    base = R.rollout(rm, 0.0, T)
    k0 = R.rollout_kl(rm, 0.0, base)
    small = R.rollout_kl(rm, 1e-3, base)
    np.testing.assert_allclose(2 * small.kl_BxT / 1e-6, k0.fisher_BxT, rtol=1e-2, atol=1e-8)


def test_budget_newton_meets_it_and_agrees_with_regula_falsi(gpt, gpt_setup):
    prompts, v, rms = gpt_setup
    rm, tol = rms["all"], 0.05
    # 0.05 v: the same model with the answer 20x further out (Newton's start is scale-free;
    # the baseline pays log2(alpha / alpha_init) doublings to bracket it)
    far = R.gpt_rollout_model(gpt, prompts, 0.05 * v, LAYER, "all", jnp.float64)
    for model, stat, budget in ((rm, "p95", 0.5), (rm, "mean", 0.2), (far, "p95", 0.5)):
        out = R.compare_budget(model, budget, T, stat=stat, tol=tol)
        nt, rf = out["results"]["newton"], out["results"]["regula_falsi"]
        assert nt.converged and abs(nt.value - budget) <= tol, nt.path
        assert rf.converged and abs(rf.value - budget) <= tol, rf.path
        assert abs(nt.value - rf.value) <= tol and out["agree"]
        # the reported value is the stat of a fresh rollout at the reported alpha
        again = R.rollout_kl(model, nt.alpha, R.rollout(model, nt.alpha, T), order=0)
        assert again.summary[stat] == pytest.approx(nt.value, abs=1e-12)
        np.testing.assert_array_equal(nt.continuation_BxT, R.rollout(model, nt.alpha, T))
        assert nt.rollouts == len(nt.path) and rf.rollouts == len(rf.path)
        if model is far:  # measured: Newton 3 rollouts (one at alpha = 0), regula falsi 7
            assert nt.rollouts < rf.rollouts, (nt.path, rf.path)
    # the other direction of steering
    neg = R.budget_newton(rm, 0.5, T, sign=-1)
    assert neg.converged and neg.alpha < 0 and abs(neg.value - 0.5) <= tol


def test_sampled_rollouts_are_seeded_and_nothing_recompiles(gpt_setup):
    _, _, rms = gpt_setup
    rm = rms["all"]
    a = R.rollout(rm, 1.0, T, sample=True, key=3)
    np.testing.assert_array_equal(a, R.rollout(rm, 1.0, T, sample=True, key=3))
    assert a.dtype == np.int32 and a.shape == (B, T) and a.min() >= 0 and a.max() < CFG.vocab
    draws = {R.rollout(rm, 1.0, T, sample=True, key=k).tobytes() for k in range(4)}
    assert len(draws) > 1, "every key gave the same sample"
    fn = R._rollout_jit(rm.logits_fn, T)
    before = fn._cache_size()
    R.rollout(rm, -2.0, T, sample=True, key=5)
    R.rollout(rm, 0.3, T)
    assert fn._cache_size() == before == 1, "a new alpha, key or mode recompiled the rollout"


def test_bad_input_names_the_parameter(gpt, gpt_setup):
    prompts, v, rms = gpt_setup
    rm = rms["all"]
    cases = [
        (lambda: R.rollout(rm, 1.0, 0), "tokens"),
        (lambda: R.rollout(rm, 1.0, 2.5), "tokens"),
        (lambda: R.rollout(rm, 1.0, CFG.context), "tokens"),
        (lambda: R.rollout(rm, float("nan"), T), "alpha"),
        (lambda: R.rollout(rm, 1.0, T, sample=True), "key"),
        (lambda: R.rollout_kl(rm, 1.0, np.zeros((B + 1, T), np.int32)), "continuation"),
        (lambda: R.rollout_kl(rm, 1.0, np.full((B, T), CFG.vocab)), "continuation"),
        (lambda: R.budget_newton(rm, 0.0, T), "budget"),
        (lambda: R.budget_newton(rm, -1.0, T), "budget"),
        (lambda: R.budget_regula_falsi(rm, float("inf"), T), "budget"),
        (lambda: R.budget_newton(rm, 0.5, 0), "tokens"),
        (lambda: R.budget_regula_falsi(rm, 0.5, -3), "tokens"),
        (lambda: R.budget_newton(rm, 0.5, T, stat="p99"), "stat"),
        (lambda: R.compare_budget(rm, 0.5, T, tol=0.0), "tol"),
        (lambda: R.budget_newton(rm, 0.5, T, sign=0), "sign"),
        (lambda: R.budget_newton(rm, 0.5, T, alpha0=-1.0), "alpha0"),
        (lambda: R.gpt_rollout_model(gpt, prompts, v, LAYER, "first"), "positions"),
        (lambda: R.gpt_rollout_model(gpt, prompts, v[:3], LAYER), "width"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ---------------------------------------------------------------- a pretrained decoder

@pytest.fixture(scope="module")
def pretrained():
    """Mistral (RoPE, grouped-query heads, a sliding window of 4 keys) in float32; Gemma 3
    would add soft-capping and sandwich norms but compiles ~3x slower."""
    ref = np.load(FIXTURES / "mistral" / "reference.npz")
    prompts = [ref[f"prompt_{i}"] for i in range(int(ref["num_prompts"]))]
    assert len({p.size for p in prompts}) == len(prompts)
    return load_decoder(FIXTURES / "mistral"), prompts, np.asarray(ref["vector"], np.float32)


@pytest.fixture(scope="module")
def hf_forward(pretrained):
    """Logits [B, N, V] of each sequence laid out from position 0 (no left padding), with
    `add` [B, N, D] at the cut; slots at or after `lengths` are marked padding."""
    model = pretrained[0]
    graphdef, state = nnx.split(model)
    layer = 1

    def fn(st, tokens, valid, add):
        m = nnx.merge(graphdef, st)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = m.prefix(tokens, valid, pos, layer, jnp.float32) + add
        return m.suffix(h, valid, pos, layer)

    jfn = jax.jit(fn)

    def forward(seq, lengths, add):
        valid = np.arange(seq.shape[1])[None] < np.asarray(lengths)[:, None]
        return np.asarray(jfn(state, jnp.asarray(seq), jnp.asarray(valid), jnp.asarray(add, jnp.float32)),
                          np.float64)

    return forward


@pytest.mark.parametrize("positions", ["all", "last"])
def test_pretrained_rollout_and_kl_with_prompts_of_different_lengths(pretrained, hf_forward, positions):
    model, prompts, v = pretrained
    new, alpha = 4, 6.0
    rm = R.hf_rollout_model(model, prompts, v, 1, positions)
    cont = R.rollout(rm, alpha, new)
    lengths = np.array([p.size for p in prompts])
    N = lengths.max() + new
    seq = np.zeros((len(prompts), N), np.int32)
    for i, p in enumerate(prompts):
        seq[i, :p.size] = p
    rows = np.arange(len(prompts))
    for i in range(new):  # the reference decoder, one step at a time
        cur = lengths + i
        y = hf_forward(seq, cur, alpha * _steer_mask(cur, N, positions)[..., None] * v)
        seq[rows, cur] = np.argmax(y[rows, cur - 1], axis=-1)
    ref_cont = np.stack([seq[j, lengths[j]:lengths[j] + new] for j in rows])
    np.testing.assert_array_equal(cont, ref_cont, err_msg="left-padded batched rollout differs from decoding")

    got = R.rollout_kl(rm, alpha, cont)
    full = lengths + new
    base = _log_softmax(hf_forward(seq, full, np.zeros(seq.shape + (v.size,))))
    steered_all = _log_softmax(hf_forward(seq, full, alpha * _steer_mask(full, N, "all")[..., None] * v))
    for i in range(new):
        s = lengths - 1 + i  # the position predicting continuation token i
        if positions == "all":
            lp = steered_all[rows, s]
        else:  # a pass steering position s alone
            lp = _log_softmax(hf_forward(seq, full, alpha * _steer_mask(s + 1, N, "last")[..., None] * v))[rows, s]
        ref = (np.exp(lp) * (lp - base[rows, s])).sum(axis=-1)
        np.testing.assert_allclose(got.kl_BxT[:, i], ref, rtol=1e-4, atol=1e-6)
    assert got.summary["max"] > 0.05
    zero = R.rollout_kl(rm, 0.0, cont)
    assert np.abs(zero.kl_BxT).max() <= 1e-6
