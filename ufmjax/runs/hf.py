"""Pretrained models read from a local Hugging Face folder, steered and swept like a trained run.

Shape legend: A = alphas, M = evaluation prompts, V = vocabulary, D = width, Q = prompts of a
steering set, W = tokens of a held-out text window.

`load_hf(folder)` gives an `HFRun`; `HFRun.steer(...)` builds the same `Steering` as a GPT
run (`ufmjax.runs.steer`): the vector is the paper's difference of means over token-averaged
residuals of the positive and negative prompts (padding masked), the rows are the evaluation
prompts' next tokens, and the concept is a token set (a word list or a regular expression over
decoded tokens, so Delta p(C | alpha) is exact). `hf_sweep` adds what the GPT sweep adds: the
top tokens at a named end of the grid, the Prop. 4.1 limit, the local UFM and Delta CE on
held-out text with every position steered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ufmjax.kernel.grid import resolve_top_k, tracked_count
from ufmjax.analysis.gpt_probes import sinh_grid
from ufmjax.data.concept_tokens import (
    concept_files,
    concept_of_tokens,
    heldout_text_path,
    regex_concept,
    word_concept,
)
from ufmjax.data.prompts import InputError, read_text, read_texts, read_words
from ufmjax.runs.terms import read_vector  # noqa: F401  (the --vector reader, re-exported)
from ufmjax.models.hf.config import Spec, load_spec
from ufmjax.models.hf.load import load_decoder
from ufmjax.models.hf.model import (
    Decoder,
    check_layer,
    check_vector,
    limit_logits,
    residual_norms,
    steered_closure,
    token_mean_residual,
)
from ufmjax.models.hf.tokenizer import HFTokenizer, encode_texts, load_tokenizer
from ufmjax.runs.folders import versions
from ufmjax.runs.steer import Steering, add_probes, add_text_ce, probe_size, sweep_grid

TEXT_WINDOWS = 8       # held-out windows whose every position enters the text Delta CE
TEXT_WINDOW = 32       # tokens per window


@dataclass
class HFRun:
    """A pretrained model folder, loaded: the Decoder and its tokenizer."""

    path: Path
    spec: Spec
    model: Decoder
    tokenizer: HFTokenizer

    def token_strs(self) -> list[str]:
        """Every token id's decoded string (ids beyond the tokenizer: "")."""
        return self.tokenizer.token_strs(self.spec.vocab)

    def encode(self, texts, name: str) -> list[np.ndarray]:
        ids = encode_texts(self.tokenizer, texts, name)
        too_long = [i for i, t in enumerate(ids) if t.size > self.spec.context]
        if too_long:
            raise InputError(f"{name}: text {too_long[0]} has {ids[too_long[0]].size} tokens, more than the "
                             f"model's context {self.spec.context}")
        return ids

    def concept_mask(self, words=None, regex=None) -> np.ndarray:
        if (words is None) == (regex is None):
            raise InputError("give the concept as exactly one of --concept-words or --concept-regex")
        strs = self.token_strs()
        return word_concept(strs, words) if words is not None else regex_concept(strs, regex)

    def steering_vector(self, positive, negative, layer: int, dtype=jnp.float32) -> np.ndarray:
        """Eq. 3 on a pretrained model: mean over P of the token-averaged residual at layer l,
        minus the same over N (padding masked; Sec. 4). Special tokens the tokenizer puts in
        front of every text (a BOS) are left out of the means: their residual is the same in
        every prompt and, in Llama or Gemma, far larger than the others, so with prompts of
        different lengths it would leak into v with weight mean_P 1/len - mean_N 1/len."""
        mP, mN = self.steering_features(positive, negative, layer, dtype)
        return mP.mean(axis=0) - mN.mean(axis=0)

    def steering_features(self, positive, negative, layer: int, dtype=jnp.float32):
        """The token-averaged residuals of every P and N prompt ([|P|, D], [|N|, D]): the
        terms of `steering_vector`'s means, for bootstrap resamples of the two sets."""
        P = self.encode(positive, "--positive")
        N = self.encode(negative, "--negative")
        skip = self.tokenizer.special_prefix()
        return (token_mean_residual(self.model, P, layer, dtype, skip=skip),
                token_mean_residual(self.model, N, layer, dtype, skip=skip))

    def steer(self, *, prompts, positive=None, negative=None, concept_words=None, concept_regex=None,
              concept_name: str | None = None, vector=None, layer: int | None = None, positions: str = "all",
              dtype=jnp.float32) -> Steering:
        """Steer the model at residual layer `layer` (default the middle, ceil(L/2)).

        Args:
          prompts: evaluation texts; each gives one row (its next-token distribution).
          positive, negative: texts of the two steering sets (Eq. 3), unless `vector` is given.
          concept_words / concept_regex: the target concept as a token set.
          concept_name: a label for the concept (meta only).
          vector: a [D] steering vector to use instead of the difference of means.
          positions: "all" (every position steered, the paper's default) or "last".
        """
        layer = (self.spec.layers + 1) // 2 if layer is None else check_layer(self.model, layer)
        mask = self.concept_mask(concept_words, concept_regex)
        rows = self.encode(prompts, "--prompts")
        if vector is None:
            if not positive or not negative:
                raise InputError("give --positive and --negative prompt files (or --vector)")
            feats = self.steering_features(positive, negative, layer, dtype)
            v = feats[0].mean(axis=0) - feats[1].mean(axis=0)
            q = (len(positive), len(negative))
        else:
            v = check_vector(self.model, np.asarray(vector, np.float64), "--vector")
            q, feats = (0, 0), None
        steered = steered_closure(self.model, rows, v, layer, positions, rows="last", dtype=dtype)
        concept_of = concept_of_tokens(mask)
        lengths = np.asarray([r.size for r in rows])
        padded = np.full((len(rows), lengths.max()), -1, np.int64)
        for i, r in enumerate(rows):
            padded[i, padded.shape[1] - r.size:] = r
        meta = {"model": "hf", "model_type": self.spec.model_type, "family": self.spec.family,
                "folder": str(self.path), "target": 1, "target_name": concept_name or "concept",
                "concept_tokens": int(mask.sum()), "layer": layer, "layers": self.spec.layers,
                "positions": positions, "q_positive": q[0], "q_negative": q[1], "ce_against": "model",
                "vector_source": "file" if vector is not None else "difference of means"}
        arrays = {"prompts": padded, "prompt_lengths": lengths, "concept_mask": mask}
        return Steering(steered, concept_of=concept_of, ce_target=None, weights=None,
                        P=np.arange(q[0]), N=np.arange(q[1]), vector=np.asarray(v), target=1,
                        dtype=jnp.dtype(dtype), meta=meta, arrays=arrays, features=feats)


def load_hf(folder, dtype: str | None = None, put=None) -> HFRun:
    """A model folder (config.json, safetensors weights, tokenizer.json) as an HFRun.

    dtype: None keeps the checkpoint's dtype; put: numpy -> device array (e.g. a sharded
    placement, `models.hf.shard`).
    """
    folder = Path(folder)
    spec = load_spec(folder)  # config and tokenizer are checked before any weight is read
    tok = load_tokenizer(folder)
    tok.check_vocab(spec.vocab)
    model = load_decoder(folder, dtype, put)
    return HFRun(folder, model.spec, model, tok)


@dataclass(frozen=True)
class Inputs:
    """The researcher's inputs, read from plain files (the CLI's options)."""

    prompts: list
    positive: list | None
    negative: list | None
    words: list | None
    regex: str | None
    ce_text: str | None
    vector: np.ndarray | None
    name: str | None


def read_inputs(*, concept=None, positive=None, negative=None, prompts=None, concept_words=None,
                concept_regex=None, ce_text=None, vector=None) -> Inputs:
    """Read every input file (each error names its option), a shipped concept filling what is
    not given. Nothing is computed before all of them are read."""
    files = concept_files(concept) if concept is not None else {}
    if concept_words is None and concept_regex is None:
        concept_words, concept_regex = files.get("words"), None
        if "regex" in files:
            concept_regex = Path(files["regex"]).read_text(encoding="utf-8").strip()
    elif concept_words is not None and concept_regex is not None:
        raise InputError("give only one of --concept-words and --concept-regex")
    prompts = prompts or files.get("prompts")
    if prompts is None:
        raise InputError("--prompts: give an evaluation prompt file (or --concept NAME)")
    positive = positive or files.get("positive")
    negative = negative or files.get("negative")
    if vector is None and (positive is None or negative is None):
        raise InputError("give --positive and --negative prompt files, --concept NAME, or --vector FILE")
    if concept_words is None and concept_regex is None:
        raise InputError("give the concept: --concept-words FILE, --concept-regex RE or --concept NAME")
    return Inputs(
        prompts=read_texts(prompts, "--prompts"),
        positive=None if positive is None else read_texts(positive, "--positive"),
        negative=None if negative is None else read_texts(negative, "--negative"),
        words=None if concept_words is None else read_words(concept_words, "--concept-words"),
        regex=concept_regex, ce_text=None if ce_text is None else read_text(ce_text, "--ce-text"),
        vector=None if vector is None else read_vector(vector),
        name=concept or (Path(concept_words).stem if concept_words is not None else f"regex {concept_regex}"))


def default_ce_text() -> str:
    """The held-out prose shipped with ufmjax (used when --ce-text is not given)."""
    return read_text(heldout_text_path(), "--ce-text")


def steer_inputs(run: HFRun, inputs: Inputs, *, layer=None, positions="all", dtype=jnp.float32) -> Steering:
    return run.steer(prompts=inputs.prompts, positive=inputs.positive, negative=inputs.negative,
                     concept_words=inputs.words, concept_regex=inputs.regex, concept_name=inputs.name,
                     vector=inputs.vector, layer=layer, positions=positions, dtype=dtype)


def hf_scaled_grid(run: HFRun, st: Steering, reach: float = 50.0, num: int = 401) -> np.ndarray:
    """A grid dense near 0 reaching alpha |v| = reach * median |h| at the steered layer (as
    `scaled_grid` for a GPT): alpha = s sinh(t), t uniform."""
    rows = [r[r >= 0] for r in st.arrays["prompts"]]
    h = residual_norms(run.model, rows, st.meta["layer"], st.dtype)
    return sinh_grid(float(np.median(h)), float(np.linalg.norm(st.vector)), reach, num)


def hf_chunk_size(spec: Spec, rows: int, positions: int) -> int:
    """Alphas per compiled call: the larger of the per-alpha MLP activations [M, T, F] and
    the per-alpha softmax tables [M, V] (about 4 of them) kept near 2^23 elements."""
    per_alpha = max(rows * positions * spec.mlp_width, 4 * rows * spec.vocab)
    return int(np.clip((1 << 23) // max(per_alpha, 1), 1, 256))


def text_windows(run: HFRun, text: str, windows: int = TEXT_WINDOWS, width: int = TEXT_WINDOW) -> np.ndarray:
    """Up to `windows` windows [n, W + 1] of the tokenised text, spread over it."""
    ids = np.asarray(run.tokenizer.encode(text), np.int64)
    width = min(width, run.spec.context - 1)
    n = ids.size // (width + 1)
    if n < 1:
        raise InputError(f"--ce-text: the text has {ids.size} tokens; at least {width + 1} are needed")
    starts = np.linspace(0, (n - 1) * (width + 1), min(windows, n)).round().astype(int)
    return np.stack([ids[s:s + width + 1] for s in starts])


def hf_sweep(run: HFRun, st: Steering, alphas, *, top_k: int | str | None = "auto", top_k_at: str = "max",
             derivatives: int = 2, chunk_size: int | None = None, ce_text: str | None = None,
             limits: bool = True, local_ufm: bool = True, max_output: int | None = None, sink=None,
             progress: bool = False, bootstrap: int | None = None,
             bootstrap_seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Sweep a steered pretrained model. Returns (arrays, meta) with the GPT run's keys.

    alphas: an increasing grid or a `kernel.Grid`.
    top_k: track only the k most likely tokens (mean over prompts) at the grid's largest
      alpha (`top_k_at="max"`), its smallest (`"min"`) or both ends (`"both"`: up to 2k);
      None: every token; "auto" (default): every token up to 1,024, else the top 256.
    ce_text: held-out text; its windows are steered at every position and their next-token
      CE gives `text_delta_ce` (with `d_`/`d2_`), `text_kl`, `text_concept_prob`.
    limits / local_ufm: the Prop. 4.1 distance and the local UFM, as for a GPT run.
    max_output, sink, progress: as for `gpt_sweep` (a size limit checked before the grid is
      built, where the arrays go, progress bars).
    bootstrap, bootstrap_seed: B resamples of the positive and negative prompts give
      `<key>_lo` / `<key>_hi` bands (`runs.several.bootstrap_bands`). A norm-preserving `st`
      (`runs.several.normalized`) leaves out the probes of additive steering.
    """
    from ufmjax.runs.several import add_bands

    if st.meta.get("normalize") == "preserve":
        limits, local_ufm, ce_text = False, False, None
    t0 = time.perf_counter()
    M = st.arrays["prompts"].shape[0]
    T = st.arrays["prompts"].shape[1] if st.meta["positions"] == "all" else 1
    chunk = hf_chunk_size(run.spec, M, T) if chunk_size is None else chunk_size
    win = text_windows(run, ce_text) if ce_text is not None else None  # refused before any sweep
    strs = run.token_strs()
    top_k = resolve_top_k(top_k, st.vocab)
    K = tracked_count(len(strs), top_k, top_k_at)
    fixed = 4 * K * max(map(len, strs), default=1) + (0 if win is None else win.nbytes)  # token_strs, windows
    extra = probe_size(st, limits=limits, local_ufm=local_ufm,
                       text_ce_derivatives=None if win is None else derivatives, fixed=fixed)
    alphas, arrays = sweep_grid(st, alphas, top_k=top_k, top_k_at=top_k_at, derivatives=derivatives,
                                chunk_size=chunk, max_output=max_output, extra=extra, sink=sink,
                                progress=progress, desc="sweep hf", bands=bootstrap is not None)
    arrays["token_strs"] = np.asarray(strs)[arrays["tokens"]]  # decoded tracked tokens
    meta: dict[str, Any] = {**st.meta, "dtype": str(st.dtype), "derivatives": derivatives, "top_k": top_k,
                            "top_k_at": top_k_at, "versions": versions()}
    add_bands(arrays, meta, run, st, alphas, bootstrap, seed=bootstrap_seed, top_k=top_k, derivatives=derivatives,
              chunk_size=chunk, progress=progress)
    if limits or local_ufm:
        add_probes(arrays, meta, st, alphas, chunk, limit_logits(run.model, st.vector, st.dtype) if limits else None,
                   local_ufm)
    if win is not None:
        all_pos = steered_closure(run.model, list(win[:, :-1]), st.vector, st.meta["layer"], "all", rows="all",
                                  dtype=st.dtype)
        add_text_ce(arrays, meta, st, all_pos, win[:, 1:].reshape(-1), alphas, derivatives,
                    hf_chunk_size(run.spec, win.shape[0], win.shape[1] - 1) if chunk_size is None else chunk_size,
                    progress)
        arrays["text_windows"] = win
    meta["seconds"] = time.perf_counter() - t0
    return arrays, meta
