"""Shared cases of the theory tests: Assumption-1 tables and random UFMs (float64)."""

from __future__ import annotations

import numpy as np

from ufmjax import theory as th

CASES = [(9, 3, 0.05), (12, 4, 0.2), (20, 5, 0.1), (30, 3, 0.5)]  # (V, G, eps)
N_PER_CONCEPT = 2  # contexts per concept
TARGET = 0  # target concept T


# ----------------------------------------------------------------------------- data


def assumption1_table(V, G, eps, rng=None, n_per=N_PER_CONCEPT):
    """Assumption 1 table (App. B.1, B.3): a_z = (1-eps) gamma_z, b_z = eps/(G-1) omega_z.

    Profiles are uniform when rng is None, else Dirichlet inside each concept, redrawn
    until 1 > a_z > b_z > 0 holds.
    """
    s = V // G
    concept_of = np.repeat(np.arange(G), s)
    for _ in range(1000):
        if rng is None:
            gamma = omega = np.full(V, 1.0 / s)
        else:
            gamma = np.concatenate([rng.dirichlet(np.full(s, 5.0)) for _ in range(G)])
            omega = np.concatenate([rng.dirichlet(np.full(s, 5.0)) for _ in range(G)])
        a = (1 - eps) * gamma
        b = eps / (G - 1) * omega
        if np.all(a > b):
            break
    else:  # pragma: no cover
        raise RuntimeError("could not draw profiles satisfying Assumption 1")
    ctx_concept = np.repeat(np.arange(G), n_per)
    p = np.where(concept_of[None, :] == ctx_concept[:, None], a[None, :], b[None, :])
    return p, ctx_concept, concept_of


def softmax(x):
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_ufm(seed, V=15, m=6, d=4):
    """A generic UFM (no Assumption 1): W [V, d], H [d, m], p = softmax(W h_j)."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, d))
    H = rng.normal(size=(d, m))
    p = softmax((W @ H).T)
    concept_of = rng.permutation(np.arange(V) % 4)  # concept sizes 4, 4, 4, 3
    return W, H, p, concept_of


def make_setups():
    setups = []
    for i, (V, G, eps) in enumerate(CASES):
        rng = np.random.default_rng(100 + i)
        p, ctx, concept_of = assumption1_table(V, G, eps, rng)
        P = np.flatnonzero(ctx == TARGET)
        S = 1  # opposite concept of the contrastive setting
        N_con = np.flatnonzero(ctx == S)
        N_rand = rng.choice(np.flatnonzero(ctx != TARGET), size=P.size, replace=False)
        setups.append(dict(name=f"A1-V{V}G{G}e{eps}-contrastive", p=p, P=P, N=N_con,
                           concept_of=concept_of, a1=True, S=S))
        setups.append(dict(name=f"A1-V{V}G{G}e{eps}-random", p=p, P=P, N=N_rand,
                           concept_of=concept_of, a1=True, S=None))
    for seed in (1, 2):
        _, _, p, concept_of = random_ufm(seed)
        setups.append(dict(name=f"generic-{seed}", p=p, P=np.array([0, 1]), N=np.array([2, 3]),
                           concept_of=concept_of, a1=False, S=None))
    for s in setups:
        s["M"] = th.log_odds(s["p"], s["P"], s["N"])
    return setups


SETUPS = make_setups()
IDS = [s["name"] for s in SETUPS]
A1_SETUPS = [s for s in SETUPS if s["a1"]]
A1_IDS = [s["name"] for s in A1_SETUPS]
ALPHAS = np.array([-3.0, -0.7, 0.0, 0.4, 2.5])


def central_difference(fn, alphas, h):
    return (fn(alphas + h) - fn(alphas - h)) / (2 * h)


def assert_close(actual, expected, rel, what):
    """max |actual - expected| <= rel * max |expected| (plus a tiny floor)."""
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rel * scale + 1e-15, f"{what}: max error {err:.3e} > {rel:g} * scale {scale:.3e}"


# ----------------------------------------------------------------------------- data checks


