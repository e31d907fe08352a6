"""The concept dataset of Assumption 1 (Taimeskhanov et al. 2026, Sec. 2.1; docs/theory.md, Sec. 2).

Shape legend for suffixes: M = contexts (m), V = vocabulary, G = concepts, T = sequence
length (context tokens plus the next token), N = sequences, Q = size of a steering set.

A vocabulary [V] is split into G contiguous concepts of size s = V / G. A context is a
sequence of T-1 tokens of one concept; its next token follows Assumption 1: probability
a_z = (1 - eps) * gamma_z inside the context's concept, b_z = eps / (G - 1) * omega_z
outside it (App. B.1, B.3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ufmjax.common import check_seed

PROFILE_TOL = 1e-6


@dataclass(frozen=True)
class DataConfig:
    """Concept dataset. Profiles default to uniform; pi defaults to uniform over contexts."""

    vocab: int = 9
    concepts: int = 3
    eps: float = 0.05
    context_len: int = 4
    contexts_per_concept: int = 4
    gamma: tuple[float, ...] | None = None
    omega: tuple[float, ...] | None = None
    pi: tuple[float, ...] | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        d = dict(d)
        for key in ("gamma", "omega", "pi"):
            if d.get(key) is not None:
                d[key] = tuple(float(x) for x in d[key])
        return cls(**d)


def reference_config() -> DataConfig:
    """The paper's reference point: V=9, G=3, eps=0.05, uniform profiles (entropy 1.33178)."""
    return DataConfig(vocab=9, concepts=3, eps=0.05)


def _check_profile(name: str, profile, concept_of_V: np.ndarray, G: int) -> np.ndarray:
    V = concept_of_V.shape[0]
    if profile is None:
        return np.full(V, G / V)  # uniform 1/s inside each concept
    arr = np.asarray(profile, dtype=np.float64)
    if arr.shape != (V,):
        raise ValueError(f"{name} must have length vocab={V}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and strictly positive")
    sums = np.bincount(concept_of_V, weights=arr, minlength=G)
    if np.any(np.abs(sums - 1.0) > PROFILE_TOL):
        raise ValueError(
            f"{name} must sum to 1 inside each concept, got concept sums {np.round(sums, 6).tolist()}")
    return arr


def dirichlet_config(vocab: int = 12, concepts: int = 3, eps: float = 0.1,
                     concentration: float = 2.0, seed: int = 0) -> DataConfig:
    """A concept dataset with Dirichlet in-concept profiles gamma and omega (App. B.3).

    Non-uniform profiles give every token its own log-odds, hence its own bump; profiles
    breaking Assumption 1 (a_z > b_z) are redrawn from the same seeded generator.
    """
    if concepts < 2 or vocab % concepts:
        raise ValueError(f"concepts (G={concepts}) must be >= 2 and divide vocab (V={vocab})")
    s = vocab // concepts
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        gamma = np.concatenate([rng.dirichlet(np.full(s, concentration)) for _ in range(concepts)])
        omega = np.concatenate([rng.dirichlet(np.full(s, concentration)) for _ in range(concepts)])
        if np.all((1 - eps) * gamma > eps / (concepts - 1) * omega):
            return DataConfig(vocab=vocab, concepts=concepts, eps=eps,
                              gamma=tuple(float(x) for x in gamma), omega=tuple(float(x) for x in omega),
                              seed=seed)
    raise ValueError("could not draw Dirichlet profiles satisfying Assumption 1; lower eps")


class ConceptData:
    """The exact next-token table p(z|c_j) of a DataConfig, its contexts and a sampler."""

    def __init__(self, config: DataConfig):
        self.config = config
        V, G, eps = config.vocab, config.concepts, config.eps
        if not isinstance(V, int) or V < 2:
            raise ValueError(f"vocab must be an integer >= 2, got {V!r}")
        if not isinstance(G, int) or G < 2:
            raise ValueError(f"concepts must be an integer >= 2, got {G!r}")
        if V % G != 0:
            raise ValueError(f"concepts (G={G}) must divide vocab (V={V})")
        if not (math.isfinite(eps) and 0.0 < eps < (G - 1) / G):
            raise ValueError(f"eps must lie in (0, (G-1)/G) = (0, {(G - 1) / G:.4g}), got {eps!r}")
        if config.context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {config.context_len}")
        check_seed(config.seed)
        s = V // G
        if not 1 <= config.contexts_per_concept <= s ** config.context_len:
            raise ValueError(
                f"contexts_per_concept must be in [1, s^context_len = {s ** config.context_len}],"
                f" got {config.contexts_per_concept}")
        self.concept_of = np.arange(V) // s
        self.gamma = _check_profile("gamma", config.gamma, self.concept_of, G)
        self.omega = _check_profile("omega", config.omega, self.concept_of, G)
        self.a = (1.0 - eps) * self.gamma
        self.b = eps / (G - 1) * self.omega
        if np.any(self.a <= self.b):
            bad = np.flatnonzero(self.a <= self.b).tolist()
            raise ValueError(f"gamma/omega break Assumption 1 (a_z > b_z) at tokens {bad}")

        # Distinct contexts per concept, drawn without replacement from the s^(T-1) sequences.
        rng = np.random.default_rng(config.seed)
        contexts, context_concept = [], []
        n_seq = s ** config.context_len
        for g in range(G):
            codes = rng.choice(n_seq, size=config.contexts_per_concept, replace=False)
            for code in np.sort(codes):
                digits = [(code // s ** i) % s for i in range(config.context_len)]
                contexts.append([g * s + d for d in digits])
                context_concept.append(g)
        self.contexts = np.asarray(contexts, dtype=np.int32)          # [M, T-1]
        self.context_concept = np.asarray(context_concept, dtype=np.int32)  # [M]
        m = self.contexts.shape[0]
        if config.pi is None:
            self.pi = np.full(m, 1.0 / m)
        else:
            pi = np.asarray(config.pi, dtype=np.float64)
            if pi.shape != (m,) or np.any(~np.isfinite(pi)) or np.any(pi <= 0) or abs(pi.sum() - 1) > PROFILE_TOL:
                raise ValueError(f"pi must be {m} positive context probabilities summing to 1")
            self.pi = pi
        same = self.context_concept[:, None] == self.concept_of[None, :]
        self.p_MxV = np.where(same, self.a[None, :], self.b[None, :])  # Assumption 1

    @property
    def num_contexts(self) -> int:
        return self.contexts.shape[0]

    @property
    def vocab(self) -> int:
        return self.config.vocab

    @property
    def num_concepts(self) -> int:
        return self.config.concepts

    def entropy(self) -> float:
        """Expected entropy sum_j pi_j H(p(.|c_j)): the minimum of the UFM's cross-entropy."""
        h_M = -np.sum(self.p_MxV * np.log(self.p_MxV), axis=1)
        return float(np.dot(self.pi, h_M))

    def contexts_of(self, concept: int) -> np.ndarray:
        return np.flatnonzero(self.context_concept == concept)

    def sample_sequences(self, rng: np.random.Generator, n: int, fresh: bool = True) -> np.ndarray:
        """Sample n sequences [N, T]: T-1 context tokens of one concept, then the next token.

        With fresh=True the context tokens are drawn anew (uniformly inside the concept chosen
        with the total pi of its contexts); since p(z|c) depends only on c's concept
        (Assumption 1), every such sequence is consistent with the table. With fresh=False
        the context is one of the m fixed contexts, drawn with probability pi.
        """
        j_N = rng.choice(self.num_contexts, size=n, p=self.pi)
        g_N = self.context_concept[j_N]
        if fresh:
            s = self.vocab // self.num_concepts
            ctx = g_N[:, None] * s + rng.integers(0, s, size=(n, self.config.context_len))
        else:
            ctx = self.contexts[j_N]
        # Next token by inverse-CDF sampling from p(.|concept).
        cdf_MxV = np.cumsum(self.p_MxV, axis=1)
        u = rng.random(n)
        nxt = np.minimum((u[:, None] > cdf_MxV[j_N]).sum(axis=1), self.vocab - 1)
        return np.concatenate([ctx, nxt[:, None]], axis=1).astype(np.int32)


def check_steering_sets(P, N, num_contexts: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the steering sets of Eq. 3: non-empty, in range, disjoint, |P| = |N|."""
    P = np.asarray(P, dtype=np.int64).reshape(-1)
    N = np.asarray(N, dtype=np.int64).reshape(-1)
    if P.size == 0 or N.size == 0:
        raise ValueError("P and N must be non-empty")
    if P.size != N.size:
        raise ValueError(f"P and N must have the same size, got |P|={P.size}, |N|={N.size}")
    for name, idx in (("P", P), ("N", N)):
        if np.any(idx < 0) or np.any(idx >= num_contexts):
            raise ValueError(f"{name} holds context indices outside [0, {num_contexts})")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{name} holds repeated contexts")
    if np.intersect1d(P, N).size:
        raise ValueError(f"P and N overlap at contexts {np.intersect1d(P, N).tolist()}")
    return P, N


def select_steering_sets(context_concept_M, target: int, negatives: str = "contrastive",
                         negative_concept: int | None = None, q: int | None = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Choose P (contexts of the target concept) and N (Eq. 3).

    Args:
      context_concept_M: concept of each context.
      target: the target concept T.
      negatives: "contrastive" (N = contexts of negative_concept, default target+1 mod G) or
        "random" (N = a seeded sample of contexts of the other concepts).
      negative_concept: the concept of N in the contrastive setting.
      q: |P| = |N|; defaults to as many as both sides allow.
      seed: seed of the random setting.
    Returns:
      (P, N) int arrays of context indices.
    """
    cc = np.asarray(context_concept_M)
    G = int(cc.max()) + 1
    check_seed(seed)
    if not isinstance(target, (int, np.integer)) or not 0 <= target < G:
        raise ValueError(f"target must be a concept in [0, {G}), got {target!r}")
    pos = np.flatnonzero(cc == target)
    if negatives == "contrastive":
        neg_c = (target + 1) % G if negative_concept is None else negative_concept
        if not isinstance(neg_c, (int, np.integer)) or not 0 <= neg_c < G or neg_c == target:
            raise ValueError(
                f"negative_concept must be a concept in [0, {G}) other than target={target}, got {neg_c!r}")
        neg = np.flatnonzero(cc == neg_c)
    elif negatives == "random":
        if negative_concept is not None:
            raise ValueError("negative_concept applies to negatives='contrastive' only")
        neg = np.flatnonzero(cc != target)
    else:
        raise ValueError(f"negatives must be 'contrastive' or 'random', got {negatives!r}")
    q_max = min(pos.size, neg.size)
    q = q_max if q is None else q
    if not 1 <= q <= q_max:
        raise ValueError(f"q must be in [1, {q_max}], got {q}")
    P = pos[:q]
    if negatives == "random":
        N = np.sort(np.random.default_rng(seed).choice(neg, size=q, replace=False))
    else:
        N = neg[:q]
    return check_steering_sets(P, N, cc.size)
