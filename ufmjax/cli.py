"""The `ufmjax` command: parses arguments and calls the library; user errors exit with status 2.

Commands: `train ufm|gpt`, `sweep`, `optimize`, `reproduce`, `bench`. Every command steers a
run through `run.steer(...)` (ufmjax.runs), so `sweep` and `optimize` measure the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

# Imported at once: numpy-only modules, so `--help` and the checks that come before any work
# (the grid, the output's size and path, the run's config.json) answer without JAX.
from ufmjax.common import enable_compile_cache
from ufmjax.data import CORPORA
from ufmjax.data.concept_tokens import CONCEPT_NAMES
from ufmjax.kernel.grid import (check_grid, check_points, is_auto, output_bytes, parse_grid, parse_product_grid,
                                resolve_top_k, tracked_count)
from ufmjax.runs import io, sweepfile
from ufmjax.runs.terms import parse_terms
from ufmjax.runs.folders import check_output


class _Lazy:
    """A module imported on its first attribute access (JAX, Flax and the models take ~2.5 s
    to import: a command refused by its arguments should not wait for them)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


jax = _Lazy("jax")
jnp = _Lazy("jax.numpy")
gpt_runs = _Lazy("ufmjax.runs.gpt")
hf_runs = _Lazy("ufmjax.runs.hf")
hf_config = _Lazy("ufmjax.models.hf.config")
data = _Lazy("ufmjax.data")
runs = _Lazy("ufmjax.runs")
train_mod = _Lazy("ufmjax.runs.train")
optim = _Lazy("ufmjax.optimize")
several = _Lazy("ufmjax.runs.several")
rollout = _Lazy("ufmjax.analysis.rollout")

NORMS = ("raw", "unit", "residual", "preserve")  # steering.NORMS, without importing JAX


def reproduce(*args, **kwargs):
    """`ufmjax.report.reproduce.reproduce`, imported when called."""
    return importlib.import_module("ufmjax.report.reproduce").reproduce(*args, **kwargs)


BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


# ---------------------------------------------------------------- train

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder")
    models = p.add_subparsers(dest="model", required=True)
    u = models.add_parser("ufm", help="the Unconstrained Features Model on the exact loss")
    u.add_argument("--vocab", type=int, default=9, help="vocabulary size V")
    u.add_argument("--concepts", type=int, default=3, help="number of concepts G (must divide V)")
    u.add_argument("--eps", type=float, default=0.05, help="off-concept mass, in (0, (G-1)/G)")
    u.add_argument("--context-len", type=int, default=4, help="tokens per context (T-1)")
    u.add_argument("--contexts-per-concept", type=int, default=4)
    u.add_argument("--gamma", type=str, default=None, help="in-concept profile: V comma-separated numbers")
    u.add_argument("--omega", type=str, default=None, help="off-concept profile: V comma-separated numbers")
    u.add_argument("--dim", type=int, default=16, help="feature width d")
    u.add_argument("--steps", type=int, default=2000)
    u.add_argument("--lr", type=float, default=0.05)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in steps (0: at the end)")
    u.add_argument("--out", required=True, help="run folder to write")
    u.add_argument("--force", action="store_true", help="replace an existing run folder")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_gpt(models.add_parser("gpt", help="a small GPT on concept data or bundled text"))


def _add_train_gpt(p) -> None:
    """Options of `ufmjax train gpt`."""
    p.add_argument("--corpus", choices=CORPORA, default="concept",
                   help="concept: the concept dataset; text: characters of Python's bundled docs")
    p.add_argument("--layers", type=int, default=None, help="blocks L (concept 1, text 2)")
    p.add_argument("--width", type=int, default=None, help="residual width D (concept 32, text 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (concept 2, text 4)")
    p.add_argument("--mlp-ratio", type=int, default=None, help="MLP width / D (4)")
    p.add_argument("--tied", action="store_true", help="tie the unembedding to the token embedding")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], default="layernorm")
    p.add_argument("--context", type=int, default=None,
                   help="positions (text: window length, 64; concept: context_len + 1)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (concept 500, text 1500)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (concept 256, text 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (3e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (concept 50, text 100)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW decay (concept 0, text 0.01)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every k steps (text 500)")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every k steps (default: eval-every)")
    # Corpus-specific options default to None so that one given with the other corpus is
    # refused by name instead of silently ignored.
    p.add_argument("--val-frac", type=float, default=None, help="text: validation share (the end of the text; 0.1)")
    p.add_argument("--vocab", type=int, default=None, help="concept: vocabulary size V (9)")
    p.add_argument("--concepts", type=int, default=None, help="concept: number of concepts G (3)")
    p.add_argument("--eps", type=float, default=None, help="concept: off-concept mass (0.05)")
    p.add_argument("--context-len", type=int, default=None, help="concept: tokens per context (T-1) (4)")
    p.add_argument("--contexts-per-concept", type=int, default=None,
                   help="concept: steered contexts per concept (4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def gpt_configs_from_args(args):
    """(gpt overrides, TrainConfig, batch) from parsed `train gpt` arguments."""
    gpt = {k: getattr(args, a) for k, a in (("layers", "layers"), ("width", "width"), ("heads", "heads"),
                                            ("mlp_ratio", "mlp_ratio"), ("context", "context"))
           if getattr(args, a) is not None}
    gpt.update(tied=bool(args.tied), norm=args.norm)
    base = gpt_runs.CONCEPT_TRAIN if args.corpus == "concept" else gpt_runs.TEXT_TRAIN
    changes = {k: getattr(args, a) for k, a in (("steps", "steps"), ("lr", "lr"), ("warmup", "warmup"),
                                                ("weight_decay", "weight_decay"), ("eval_every", "eval_every"),
                                                ("ckpt_every", "ckpt_every"))
               if getattr(args, a) is not None}
    if "steps" in changes and "warmup" not in changes:
        changes["warmup"] = min(base.warmup, changes["steps"] // 10)
    if "steps" in changes and "eval_every" not in changes and base.eval_every >= changes["steps"]:
        changes["eval_every"] = 0
    train_cfg = replace(base, **changes)
    if args.ckpt_every is None:
        train_cfg = replace(train_cfg, ckpt_every=train_cfg.eval_every)
    return gpt, train_cfg, args.batch


def _train_gpt(args) -> dict:
    """`ufmjax train gpt ...`: train, then print one summary line."""
    gpt, train_cfg, batch = gpt_configs_from_args(args)
    if args.corpus == "concept":
        _refuse_given(args, TEXT_ONLY, "applies to --corpus text only")
        given = {k: getattr(args, k) for k in CONCEPT_ONLY_FIELDS if getattr(args, k) is not None}
        kw = {"data_config": data.DataConfig(**given, seed=args.seed)}
    else:
        _refuse_given(args, tuple("--" + k.replace("_", "-") for k in CONCEPT_ONLY_FIELDS),
                      "applies to --corpus concept only")
        kw = {"text_config": data.TextConfig() if args.val_frac is None else data.TextConfig(val_frac=args.val_frac)}
    metrics = gpt_runs.train_gpt_run(args.out, args.corpus, gpt=gpt, train_config=train_cfg, batch=batch, seed=args.seed,
                            progress=not args.quiet, force=args.force, **kw)
    if args.corpus == "concept":
        print(f"final_ce={metrics['final_ce']:.6f} entropy={metrics['entropy']:.6f} gap={metrics['gap']:.2e} nats "
              f"(fixed contexts gap={metrics['gap_fixed']:.2e})  {metrics['seconds']:.1f}s  ({args.out})")
    else:
        print(f"val_loss={metrics['val_loss']:.4f} bigram={metrics['bigram_val_loss']:.4f} "
              f"unigram={metrics['unigram_val_loss']:.4f} nats/char  {metrics['seconds']:.1f}s  ({args.out})")
    return metrics


CONCEPT_ONLY_FIELDS = ("vocab", "concepts", "eps", "context_len", "contexts_per_concept")  # DataConfig fields
TEXT_ONLY = ("--val-frac",)


def cmd_train(args) -> int:
    if args.model == "gpt":
        _train_gpt(args)
        return 0

    def floats(name, text):
        if text is None:
            return None
        try:
            return tuple(float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None

    data_cfg = data.DataConfig(vocab=args.vocab, concepts=args.concepts, eps=args.eps,
                          context_len=args.context_len, contexts_per_concept=args.contexts_per_concept,
                          gamma=floats("gamma", args.gamma), omega=floats("omega", args.omega), seed=args.seed)
    train_cfg = train_mod.TrainConfig(steps=args.steps, lr=args.lr, clip=0.0, ckpt_every=args.ckpt_every)
    metrics = runs.train_ufm_run(args.out, data_cfg, dim=args.dim, seed=args.seed, train_config=train_cfg,
                            progress=not args.quiet, force=args.force)
    print(f"final_ce={metrics['final_ce']:.6f} entropy={metrics['entropy']:.6f} "
          f"gap={metrics['gap']:.2e} nats  ({args.out})")
    return 0


# ---------------------------------------------------------------- sweep

def _add_steering_args(p) -> None:
    """The options of `run.steer(...)`, shared by sweep and optimize."""
    p.add_argument("--negatives", choices=["contrastive", "random"], default="contrastive")
    p.add_argument("--negative-concept", type=int, default=None, help="concept of N (contrastive)")
    p.add_argument("--q", type=int, default=None, help="|P| = |N| (default: as many as possible)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random negatives (0)")
    p.add_argument("--ce-against", choices=["data", "model"], default="data",
                   help="CE reference: data = p(z|c) (concept data) or the observed next character (text); "
                        "model = the unsteered model itself")
    p.add_argument("--layer", type=int, default=None, help="GPT: residual layer to steer (0..L)")
    p.add_argument("--positions", choices=["all", "last"], default=None, help="GPT: positions steered (all)")
    p.add_argument("--vector", action="append", default=None, metavar="TERM",
                   help="a steering term, repeated once per term (alpha gets one entry each): "
                        "target=K[,negatives=contrastive|random][,negative=K2][,layer=L][,positions=all|last]"
                        "[,weight=W], or file=V.npy[,layer=L][,positions=..]; a bare FILE is file=FILE. "
                        "Pretrained models: file=V.npy or layer=L (the --positive/--negative difference of means)")
    p.add_argument("--normalize", choices=NORMS, default="raw",
                   help="vector norm convention: raw (the paper's v), unit (v/|v|), residual (alpha in units of "
                        "the median residual norm at the layer), preserve (steered residual rescaled to its "
                        "unsteered norm)")
    p.add_argument("--bootstrap", type=int, default=None, metavar="B",
                   help="B bootstrap resamples of P and N: sweep: _lo/_hi bands of every curve (one vectorised "
                        "pass); optimize: the spread of the optimal alpha")


def _add_hf_args(p) -> None:
    """The options of a pretrained model read from a Hugging Face folder (`--hf DIR`)."""
    g = p.add_argument_group("pretrained model (--hf)")
    g.add_argument("--hf", default=None, metavar="DIR",
                   help="a local Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    g.add_argument("--concept", default=None, choices=CONCEPT_NAMES,
                   help="a shipped concept: its positive/negative prompts, evaluation prompts and token set")
    g.add_argument("--positive", default=None, metavar="FILE", help="positive steering prompts (lines or JSONL)")
    g.add_argument("--negative", default=None, metavar="FILE", help="negative steering prompts (lines or JSONL)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="evaluation prompts (lines or JSONL)")
    g.add_argument("--concept-words", default=None, metavar="FILE", help="the concept as a word list")
    g.add_argument("--concept-regex", default=None, metavar="RE",
                   help="the concept as a regular expression over decoded tokens (full match, stripped)")
    g.add_argument("--ce-text", default=None, metavar="FILE",
                   help="held-out text for Delta CE with every position steered (default: shipped prose)")
    g.add_argument("--weights-dtype", "--dtype", dest="weights_dtype", default=None,
                   choices=["float32", "float16", "bfloat16", "float64"],
                   help="cast the weights on loading (default: keep the checkpoint's dtype)")
    g.add_argument("--model-devices", type=int, default=None,
                   help="shard the weights over this many devices (a 'model' mesh axis; default: one device)")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="sweep a trained run or a pretrained model over an alpha grid into an .npz")
    p.add_argument("run", nargs="?", default=None, help="run folder (or --hf DIR)")
    p.add_argument("--target", default=None,
                   help="target concept index (text GPT runs: also a class name, e.g. uppercase); runs only")
    _add_steering_args(p)
    _add_hf_args(p)
    p.add_argument("--alphas", default=None,
                   help="START:STOP:NUM (default -20:20:401); with k --vector terms one grid per term, comma-"
                        "separated (their product is swept; default -20:20:41 each)")
    p.add_argument("--alphas-file", default=None, metavar="A.npy",
                   help="the alpha points instead of --alphas: [A] increasing (one term) or [A, k] (k terms)")
    p.add_argument("--top-k", default="auto", metavar="K|all|auto",
                   help="track only the k most likely tokens (mean over rows) at the end --top-k-at names; "
                        "all: every token; auto (default): every token of a vocabulary up to 1,024, else the "
                        "top 256"),
    p.add_argument("--top-k-at", choices=["max", "min", "both"], default=None,
                   help="where --top-k takes its tokens: the grid's largest alpha (max, the target's direction; "
                        "default), its smallest (min), or both ends (the union: up to 2k tokens)")
    p.add_argument("--chunk-size", type=int, default=None, help="alphas per compiled call")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--max-output", default=f"{sweepfile.MAX_OUTPUT >> 30}GiB", metavar="SIZE",
                   help="refuse, before any work, a grid whose arrays would exceed SIZE uncompressed "
                        "(e.g. 8GiB, 500MB, or bytes; default %(default)s)")
    p.add_argument("--no-compress", action="store_true",
                   help="store the .npz's arrays uncompressed: ~3x larger, about twice as fast on long grids")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help=".npz file to write")


def _steer_kwargs(args) -> dict:
    if args.seed is not None and args.negatives != "random":
        raise ValueError("--seed applies to --negatives random (contrastive negatives are not drawn)")
    return {"negative_concept": args.negative_concept, "q": args.q, "seed": 0 if args.seed is None else args.seed,
            "ce_against": args.ce_against, "layer": args.layer, "positions": args.positions}


def _source(args) -> None:
    """Exactly one of a run folder and --hf; the run options only with a run."""
    if (args.run is None) == (args.hf is None):
        raise ValueError("give a run folder or --hf DIR (exactly one)")
    if args.hf is None:
        if getattr(args, "target", None) is None and not getattr(args, "vector", None):
            raise ValueError("--target is required with a run folder (or --vector target=K)")
        _refuse_given(args, HF_ONLY, "applies to --hf models only")


def _load_run(args):
    """The run folder of `args.run`, with the GPT-only options refused on a UFM run."""
    run = runs.load_run(args.run)
    if not isinstance(run, gpt_runs.GPTRun):
        _refuse_given(args, ("--layer", "--positions"), "applies to GPT runs (a UFM has no layers or positions)")
    return run


def _refuse_given(args, options, why: str) -> None:
    """ValueError naming the first of `options` (flags) that was given."""
    given = [o for o in options if getattr(args, o.lstrip("-").replace("-", "_"), None) is not None]
    if given:
        raise ValueError(f"{given[0]} {why}")


HF_ONLY = ("--concept", "--positive", "--negative", "--prompts", "--concept-words", "--concept-regex",
           "--ce-text", "--weights-dtype", "--model-devices")


# Options of run folders that mean nothing for an --hf model, with their defaults.
RUN_ONLY = {"negatives": "contrastive", "negative_concept": None, "q": None, "seed": None, "ce_against": "data"}


def _hf_inputs(args):
    """(Inputs, weight placement) of the --hf options: every option and input file is checked
    here, before any model is loaded; --model-devices gives a sharded placement."""
    given = [k for k, default in RUN_ONLY.items() if getattr(args, k, default) != default]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to run folders, not to --hf models")
    for name in ("chunk_size",):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.weights_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("--weights-dtype float64 needs a float64 computation (sweep --float64; optimize's default)")
    spec = hf_config.load_spec(args.hf)  # config.json alone: the layer is checked before any weight is read
    if getattr(args, "layer", None) is not None and not 0 <= args.layer <= spec.layers:
        raise ValueError(f"--layer must be an integer in [0, {spec.layers}] (0: embedding output, "
                         f"{spec.layers}: last block's output), got {args.layer}")
    inputs = hf_runs.read_inputs(concept=args.concept, positive=args.positive, negative=args.negative,
                                 prompts=args.prompts, concept_words=args.concept_words,
                                 concept_regex=args.concept_regex, ce_text=args.ce_text,
                                 vector=getattr(args, "vector_file", None))
    put = None
    if args.model_devices is not None:
        from ufmjax.models.hf.shard import model_mesh, sharded_put

        put = sharded_put(model_mesh(args.model_devices))
    return inputs, put


def _hf_steering(args, dtype):
    """(HFRun, Steering, Inputs) of `--hf DIR` and its input files; every file is read and
    checked before the model is loaded."""
    if args.target is not None:
        raise ValueError("--target applies to run folders; give the concept of an --hf model with "
                         "--concept, --concept-words or --concept-regex")
    inputs, put = _hf_inputs(args)
    run = hf_runs.load_hf(args.hf, args.weights_dtype, put)
    st = hf_runs.steer_inputs(run, inputs, layer=args.layer, positions=args.positions or "all", dtype=dtype)
    return run, st, inputs


def _sweep_hf(args, alphas, dtype, **kw):
    run, st, inputs = _hf_steering(args, dtype)
    st = several.normalized(run, st, args.normalize)
    ce_text = inputs.ce_text if inputs.ce_text is not None else hf_runs.default_ce_text()
    return hf_runs.hf_sweep(run, st, alphas, top_k=args.top_k, top_k_at=args.top_k_at, chunk_size=args.chunk_size,
                            ce_text=ce_text, **kw)


def _resolve_terms(args) -> list:
    """The --vector terms, parsed and checked without JAX. One term is folded into the single-
    term options (--target, --negatives, --layer, ...: today's path, keys and shapes); several
    (k >= 2) are returned, with the single-term options refused (they go in each term)."""
    terms = parse_terms(args.vector)
    args.vector_file = None
    if args.bootstrap is not None and args.bootstrap < 1:
        raise ValueError(f"--bootstrap B must be an integer >= 1 (resamples of P and N), got {args.bootstrap}")
    if len(terms) >= 2:
        _refuse_given(args, ("--target", "--negative-concept", "--layer", "--positions"),
                      "applies to one steering term: with several --vector terms give target=, negative=, layer= "
                      "and positions= in each")
        if args.negatives != "contrastive":
            raise ValueError("--negatives applies to one steering term: with several --vector terms give "
                             "negatives= in each")
        if args.hf is not None and all(t.file is not None for t in terms):
            args.vector_file = terms[0].file  # the inputs need no --positive/--negative then
        return terms
    if terms:
        t = terms[0]
        for key, option, dest, default in (("target", "--target", "target", None),
                                           ("negatives", "--negatives", "negatives", "contrastive"),
                                           ("negative", "--negative-concept", "negative_concept", None),
                                           ("layer", "--layer", "layer", None),
                                           ("positions", "--positions", "positions", None)):
            value = getattr(t, key)
            if value is None:
                continue
            if getattr(args, dest, default) != default:
                raise ValueError(f"{option} and --vector {key}= both given: give it once")
            setattr(args, dest, value)
        if t.weight != 1.0:
            raise ValueError("--vector weight= weighs a target among several --vector terms; one term has no weight")
        args.vector_file = t.file
        if t.file is not None and args.hf is None and args.target is None:
            raise ValueError("--vector file= on a run folder needs a target too (target=K in the term, or --target): "
                             "the concept its rows are measured toward")
    return []


def _points(args, k: int):
    """The alphas: a `Grid` (one term), a `ProductGrid` (k terms), or the --alphas-file points."""
    if args.alphas_file is None:
        if k == 1:
            return parse_grid(args.alphas or "-20:20:401")
        return parse_product_grid(args.alphas or ",".join(["-20:20:41"] * k), k)
    if args.alphas is not None:
        raise ValueError("give --alphas or --alphas-file, not both")
    try:
        arr = np.load(args.alphas_file, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--alphas-file: {args.alphas_file} is not a readable .npy file ({_one_line(e)})") from None
    try:
        if k == 1:
            return check_grid(arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else arr)
        return check_points(arr, k)
    except ValueError as e:
        raise ValueError(f"--alphas-file {args.alphas_file}: {e}") from None


def _reach(points) -> float:
    """The largest |alpha| of any point, without building a grid."""
    if hasattr(points, "grids"):
        return max(max(abs(g.start), abs(g.stop)) for g in points.grids)
    if hasattr(points, "start"):
        return max(abs(points.start), abs(points.stop))
    return float(np.abs(points).max())


def _num_points(points) -> int:
    return points.size if hasattr(points, "size") and not isinstance(points, np.ndarray) else len(points)


def _top_k(text):
    """--top-k: an integer k >= 1, "all" (None: every token) or "auto" (kernel.grid.resolve_top_k)."""
    if text in ("auto", None):
        return "auto"
    if text == "all":
        return None
    try:
        k = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"--top-k must be a positive integer, 'all' or 'auto', got {text!r}") from None
    if k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {k}")
    return k


def cmd_sweep(args) -> int:
    # Everything the arguments alone decide is checked first, before JAX is imported: a
    # request that cannot run (a 1e8-alpha grid, an unwritable --out) is refused at once.
    terms = _resolve_terms(args)
    k = max(1, len(terms))
    args.top_k = _top_k(args.top_k)
    _source(args)
    grid = _points(args, k)  # checked, not built: its output size is checked first
    num = _num_points(grid)
    max_output = sweepfile.parse_size(args.max_output, "--max-output")
    if not args.out.endswith(".npz"):
        raise ValueError(f"out must be a .npz file, got {args.out!r}")
    check_output(args.out, "--out")  # a run's own files, or a path that cannot be written
    f32_max = float(np.finfo(np.float32).max)
    if not args.float64 and _reach(grid) > f32_max:
        raise ValueError(f"--alphas {args.alphas!r} reaches beyond float32 ({f32_max:.3g}): every value there "
                         f"would be inf; sweep a narrower range or add --float64")
    if (is_auto(args.top_k) or args.top_k is None) and args.top_k_at is not None:
        raise ValueError("--top-k-at applies with --top-k K (by default every token of a small vocabulary is "
                         "tracked, else the top 256 at the grid's largest alpha)")
    args.top_k_at = args.top_k_at or "max"
    _sweep_size_first(args, num, max_output, "float64" if args.float64 else "float32", k)
    # A scoped switch, not a global one: the CLI is also called in-process (tests, notebooks).
    with jax.enable_x64(True) if args.float64 else contextlib.nullcontext():
        dtype = jnp.float64 if args.float64 else jnp.float32
        kw = dict(top_k=args.top_k, top_k_at=args.top_k_at, chunk_size=args.chunk_size, max_output=max_output,
                  progress=not args.quiet)
        # The file is opened (its folder checked writable) before any model is loaded; results
        # stream into it chunk by chunk and it appears, whole, only once everything is computed.
        with sweepfile.SweepFile(args.out, progress=not args.quiet, compress=not args.no_compress) as sink:
            if terms:
                arrays, meta, what = _sweep_terms(args, terms, grid, dtype, sink, **kw)
            elif args.hf is not None:
                arrays, meta = _sweep_hf(args, grid, dtype, sink=sink, bootstrap=args.bootstrap,
                                         **{k: kw[k] for k in ("max_output", "progress")})
                what = (f"prompts ({meta['model_type']}, layer {meta['layer']}/{meta['layers']})")
            else:
                run = _load_run(args)
                vector = None if args.vector_file is None else hf_runs.read_vector(args.vector_file)
                kw.update(target=args.target, negatives=args.negatives, dtype=dtype, sink=sink,
                          normalize=args.normalize, bootstrap=args.bootstrap, vector=vector, **_steer_kwargs(args))
                if isinstance(run, gpt_runs.GPTRun):
                    arrays, meta = gpt_runs.gpt_sweep(run, grid, limits=True, local_ufm=True, text_ce=True,
                                                      presence=True, **kw)
                else:
                    arrays, meta = runs.ufm_sweep(run, grid, **kw)
                what = "contexts"
            summary = (f"{num} {'points' if terms else 'alphas'} x {arrays['probs_base'].shape[0]} {what}, "
                       f"max delta_ce={arrays['delta_ce'].max():.4g}")
            sink.commit(meta)
    print(f"wrote {args.out}: {summary}")
    return 0


def _steering_terms(args, terms, dtype):
    """(run, MultiSteering) of k >= 2 --vector terms on a run folder or an --hf model."""
    if args.hf is not None:
        inputs, put = _hf_inputs(args)
        run = hf_runs.load_hf(args.hf, args.weights_dtype, put)
        return run, several.steer_terms_hf(run, inputs, terms, norm=args.normalize, dtype=dtype)
    run = _load_run(args)
    return run, several.steer_terms(run, terms, norm=args.normalize, q=args.q,
                                    seed=0 if args.seed is None else args.seed, ce_against=args.ce_against,
                                    dtype=dtype)


def _sweep_terms(args, terms, points, dtype, sink, *, top_k, top_k_at, chunk_size, max_output, progress):
    """A sweep of k >= 2 terms over [A, k] points: the k-term keys (README, "Several vectors")."""
    run, ms = _steering_terms(args, terms, dtype)
    pts, arrays = several.multi_steering_sweep(ms, points, top_k=top_k, top_k_at=top_k_at, chunk_size=chunk_size,
                                               max_output=max_output, sink=sink, progress=progress)
    top_k = resolve_top_k(top_k, int(np.asarray(arrays["probs_base"]).shape[-1]))
    meta = {**ms.meta, "dtype": str(jnp.dtype(dtype)), "derivatives": 2, "top_k": top_k, "top_k_at": top_k_at,
            "versions": runs.versions()}
    several.add_bands(arrays, meta, run, ms, pts, args.bootstrap, top_k=top_k, chunk_size=chunk_size,
                      progress=progress)
    if args.hf is not None:
        arrays["token_strs"] = np.asarray(run.token_strs())[np.asarray(arrays["tokens"])]
    return arrays, meta, f"rows ({ms.k} terms)"


def _sweep_size_first(args, num: int, max_output: int, dtype, k: int = 1) -> None:
    """Refuse a grid too long for --max-output before any model is read: a UFM run's size from
    its config.json alone; a pretrained model's lower bound (one prompt) from its config. With
    k terms every curve has 1 + k + k^2 copies (value, gradient, Hessian) in place of 3; a
    bootstrap adds two bands of each."""
    scale = (1 + k + k * k) / 3 * (3 if args.bootstrap is not None else 1)
    if args.hf is not None:
        V = hf_config.load_spec(args.hf).vocab
        K = tracked_count(V, args.top_k, args.top_k_at)
        per_alpha, fixed = output_bytes(rows=1, vocab=V, concepts=1, tokens=K, dtype=dtype)
        per_alpha = int(per_alpha * scale)
        sweepfile.check_output_size(per_alpha * num + fixed, max_output, num, at_least=True)
        sweepfile.check_free_space(per_alpha * num + fixed, args.out, compress=not args.no_compress)
        return
    size = sweepfile.config_size(io.load_run_config(args.run), top_k=args.top_k, top_k_at=args.top_k_at,
                                 dtype=dtype)
    if size is not None:
        size = sweepfile.OutputSize(int(size.per_alpha * scale), size.fixed)
        sweepfile.check_output_size(size.total(num), max_output, num)
        sweepfile.check_free_space(size.total(num), args.out, compress=not args.no_compress)


# ---------------------------------------------------------------- optimize

def _add_optimize(sub) -> None:
    p = sub.add_parser("optimize", help="solve for the best steering strength alpha (penalised, budgeted or "
                                      "target level) by gradients")
    p.add_argument("run", nargs="?", default=None, help="run folder (UFM or GPT), or --hf DIR")
    p.add_argument("--objective", choices=["penalised", "budget", "level", "rollout-kl"], default="penalised",
                   help="penalised: max dp - lam*D; budget: max dp - lam*D s.t. D <= budget; "
                        "level: min |alpha| s.t. target-concept probability >= level; rollout-kl: p95 of the "
                        "teacher-forced KL on steered rollouts = --budget (Newton against regula falsi)")
    p.add_argument("--tokens", type=int, default=None, help="rollout-kl: tokens T generated per prompt (16)")
    p.add_argument("--lam", type=float, default=None, help="penalty weight (penalised: default 0.1; budget: 0)")
    p.add_argument("--budget", type=float, default=None, help="distortion budget in nats (objective budget)")
    p.add_argument("--level", type=float, default=None, help="target-concept probability in (0, 1) (objective level)")
    p.add_argument("--metric", choices=["ce", "kl"], default="ce",
                   help="distortion D: ΔCE (Def. 3.7) or mean KL to the unsteered model")
    p.add_argument("--per-context", action="store_true", help="one alpha per evaluation context (a vector)")
    p.add_argument("--target", default=None,
                   help="target concept index (text GPT runs: also a class name, e.g. uppercase); runs only")
    p.add_argument("--contexts", default=None,
                   help="evaluation contexts: comma-separated row indices (default: all rows)")
    _add_steering_args(p)
    p.add_argument("--method", choices=["newton", "lbfgs", "adam", "gd"], default="newton",
                   help="newton: kernel second derivatives; lbfgs/adam/gd: optax on reverse-mode gradients")
    p.add_argument("--tol", type=float, default=None, help="gradient tolerance (default 1e-10; float32 1e-5)")
    p.add_argument("--max-iter", type=int, default=None, help="iterations per inner solve")
    p.add_argument("--alpha-max", type=float, default=1e3, help="largest |alpha| searched (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="adam / gd learning rate")
    p.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    _add_hf_args(p)
    p.add_argument("--out", required=True, help="JSON file to write")


def _contexts(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"contexts must be comma-separated row indices, got {text!r}") from None


def cmd_optimize(args) -> int:
    terms = _resolve_terms(args)
    if args.objective == "rollout-kl":
        return _optimize_rollout(args, terms)
    if args.tokens is not None:
        raise ValueError("--tokens applies to --objective rollout-kl")
    # float64 by default, as a scoped switch (the CLI is also called in-process).
    with jax.enable_x64(True) if not args.float32 else contextlib.nullcontext():
        if not args.out.endswith(".json"):
            raise ValueError(f"out must be a .json file, got {args.out!r}")
        check_output(args.out, "--out")  # before any work: a path that cannot be written, or a run's own file
        objective = optim.Objective(args.objective, lam=args.lam, budget=args.budget, level=args.level,
                              metric=args.metric)
        dtype = jnp.float32 if args.float32 else jnp.float64
        _source(args)
        if terms:
            if args.per_context or args.bootstrap is not None:
                raise ValueError(f"{'--per-context' if args.per_context else '--bootstrap'} applies to one "
                                 f"steering term, not to several --vector terms")
            _, ms = _steering_terms(args, terms, dtype)
            result = optim.optimize_vector(ms.problem(contexts=_contexts(args.contexts)), objective,
                                           method=args.method, tol=args.tol, max_iter=args.max_iter,
                                           alpha_max=args.alpha_max, lr=args.lr)
            out = {**result.to_dict(), **ms.meta, "dtype": str(jnp.dtype(dtype)), "versions": runs.versions()}
            io.write_json_atomic(args.out, out)
            print(f"alpha={[round(a, 6) for a in result.alpha]} objective={result.objective:.6g} "
                  f"delta_p_target={result.delta_p_target:.4g} delta_ce={result.delta_ce:.4g} kl={result.kl:.4g} "
                  f"iterations={result.iterations} evaluations={result.evaluations} ({args.out})")
            return _converged(result)
        if args.hf is not None:
            run, st = _hf_steering(args, dtype)[:2]
        else:
            run = _load_run(args)
            st = run.steer(args.target, args.negatives, dtype=dtype, **_steer_kwargs(args))
            if args.vector_file is not None:
                st = several.file_vector(st, hf_runs.read_vector(args.vector_file))
        st = several.normalized(run, st, args.normalize)
        problem = st.problem(contexts=_contexts(args.contexts))
        kw = dict(per_context=args.per_context, method=args.method, tol=args.tol, max_iter=args.max_iter,
                  alpha_max=args.alpha_max, lr=args.lr)
        result = optim.optimize(problem, objective, **kw)
        meta = {k: v for k, v in st.meta.items() if k != "target"}
        if "context_concept" in st.arrays:
            meta["context_concept"] = st.arrays["context_concept"][problem.contexts].tolist()
        out = {**result.to_dict(), **meta, "dtype": str(jnp.dtype(dtype)), "versions": runs.versions()}
        if args.bootstrap is not None:
            if args.per_context:
                raise ValueError("--bootstrap applies to a shared alpha, not --per-context")
            out["bootstrap"] = several.bootstrap_optima(run, st, objective, args.bootstrap, **kw)
        io.write_json_atomic(args.out, out)
    alpha = result.alpha if not args.per_context else f"[{min(result.alpha):.4g} .. {max(result.alpha):.4g}]"
    alpha = f"{alpha:.6g}" if isinstance(alpha, float) else alpha
    spread = ""
    if args.bootstrap is not None:
        b = out["bootstrap"]
        spread = f" bootstrap {b['interval'][0]:g}-{b['interval'][1]:g}%: [{b['lo']:.4g}, {b['hi']:.4g}]"
    print(f"alpha={alpha} objective={result.objective:.6g} delta_p_target={result.delta_p_target:.4g} "
          f"delta_ce={result.delta_ce:.4g} kl={result.kl:.4g} iterations={result.iterations} "
          f"evaluations={result.evaluations}{spread} ({args.out})")
    return _converged(result)


def _converged(result) -> int:
    if result.converged:
        return 0
    print(f"ufmjax optimize: NOT CONVERGED: {result.message}", file=sys.stderr)
    return 1


def _optimize_rollout(args, terms) -> int:
    """`--objective rollout-kl`: the alpha whose p95 teacher-forced KL on steered rollouts is
    --budget, by Newton on its derivative (re-rolling each step) and by regula falsi."""
    if terms:
        raise ValueError("--objective rollout-kl steers one term (a scalar alpha), not several --vector terms")
    if args.budget is None or not args.budget > 0:
        raise ValueError(f"--budget must be a KL budget > 0 (nats) for rollout-kl, got {args.budget}")
    tokens = 16 if args.tokens is None else args.tokens
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    for name in ("lam", "level"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} does not apply to --objective rollout-kl")
    if not args.out.endswith(".json"):
        raise ValueError(f"out must be a .json file, got {args.out!r}")
    check_output(args.out, "--out")
    _source(args)
    with jax.enable_x64(True) if not args.float32 else contextlib.nullcontext():
        dtype = jnp.float32 if args.float32 else jnp.float64
        if args.hf is not None:
            run, st = _hf_steering(args, dtype)[:2]
            rows = [r[r >= 0] for r in st.arrays["prompts"]]
            rm = rollout.hf_rollout_model(run.model, rows, st.vector, st.meta["layer"], st.meta["positions"], dtype)
        else:
            run = _load_run(args)
            if not isinstance(run, gpt_runs.GPTRun):
                raise ValueError("--objective rollout-kl needs a model that generates text (a GPT run or --hf)")
            st = run.steer(args.target, args.negatives, dtype=dtype, **_steer_kwargs(args))
            rm = rollout.gpt_rollout_model(run.model, st.arrays["prompts"], st.vector, st.meta["layer"],
                                           st.meta["positions"], dtype)
        pb = st.problem()  # the target's slope at 0 picks the side of alpha (the kernel's d dp / d alpha)
        slope = float(np.asarray(pb.at0["dp"][1])[0] @ pb.w_E)
        if slope == 0.0:
            raise ValueError("the target's slope at alpha = 0 is 0: no side of alpha raises it")
        sign = 1 if slope > 0 else -1
        res = rollout.compare_budget(rm, args.budget, tokens, sign=sign)
        out = {k: v for k, v in res.items() if k != "results"}
        out.update(objective="rollout-kl", sign=sign, slope_at_0=slope,
                   newton_path=res["results"]["newton"].path, regula_falsi_path=res["results"]["regula_falsi"].path,
                   **{k: v for k, v in st.meta.items() if k != "target"}, dtype=str(jnp.dtype(dtype)),
                   versions=runs.versions())
        io.write_json_atomic(args.out, out)
    n, r = res["newton"], res["regula_falsi"]
    print(f"rollout-kl p95<={args.budget:g}: newton alpha={n['alpha']:.6g} (p95={n['value']:.4g}, {n['rollouts']} "
          f"rollouts), regula falsi alpha={r['alpha']:.6g} (p95={r['value']:.4g}, {r['rollouts']} rollouts) "
          f"({args.out})")
    return 0 if n["converged"] and r["converged"] else 1


# ---------------------------------------------------------------- reproduce and bench

def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="train, sweep, check every law of the theory, optimise alpha; "
                                         "write figures and report.md")
    p.add_argument("--out", default=None,
                   help="folder for runs, figures and report.md (default results/reproduce, "
                        "with --hf results/reproduce_hf)")
    p.add_argument("--quick", action="store_true", help="small version: shorter training, the same laws (1.5-3 minutes on 2 cores)")
    p.add_argument("--force", action="store_true", help="retrain instead of reusing finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--layers", default=None,
                   help="--hf: comma-separated layers (default early, middle, last: max(1, L//4), ceil(L/2), L)")
    p.add_argument("--vector", dest="vector_file", default=None, metavar="V.npy",
                   help="--hf: steer this [D] vector at every layer instead of the --positive/--negative "
                        "difference of means")
    _add_hf_args(p)


def _layers(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {text!r}") from None


def cmd_reproduce(args) -> int:
    if args.hf is None:
        _refuse_given(args, HF_ONLY + ("--layers",), "applies to reproduce --hf only")
        if args.vector_file is not None:
            raise ValueError("--vector applies to reproduce --hf only")
    else:
        return _reproduce_hf(args)
    args.out = args.out or "results/reproduce"
    summary = reproduce(args.out, quick=args.quick, force=args.force, progress=not args.quiet)
    print(f"{summary['passed']}/{summary['total']} laws pass in {summary['seconds']:.0f} s; "
          f"report: {args.out}/report.md")
    if summary["failed_sections"]:
        print(f"sections that failed to run: {', '.join(summary['failed_sections'])}")
    return 0 if summary["all_passed"] else 1


def _reproduce_hf(args) -> int:
    """`ufmjax reproduce --hf DIR`: Sec. 4's laws and figures on the user's model."""
    from ufmjax.report.reproduce import reproduce_hf

    out = args.out or "results/reproduce_hf"
    layers = _layers(args.layers)
    if layers is not None and (not layers or len(set(layers)) != len(layers)):
        raise ValueError(f"--layers must list distinct layers, got {args.layers!r}")
    inputs, put = _hf_inputs(args)
    summary = reproduce_hf(out, args.hf, inputs, layers=layers, quick=args.quick, progress=not args.quiet,
                           weights_dtype=args.weights_dtype, put=put)
    print(f"{summary['model_type']}: {summary['passed']}/{summary['total']} laws hold at layers "
          f"{','.join(map(str, summary['layers']))} in {summary['seconds']:.0f} s; report: {out}/report.md")
    if summary["failed_sections"]:
        print(f"sections that failed to run: {', '.join(summary['failed_sections'])}")
    return 0 if summary["all_ran"] else 1


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the sweep kernel (ratios against exp, NumPy, full GPT passes, "
                                     "grids); write bench.md (needs the source checkout's benchmarks/)")
    add_bench_args(p)


def add_bench_args(p) -> None:
    """The options of `ufmjax bench` (also those of `python benchmarks/bench.py`)."""
    p.add_argument("--out", default="results", help="folder for bench.md and bench.json (default results)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test, about a minute (ratios not meaningful)")
    mode.add_argument("--full", action="store_true",
                      help="also the full 20,000 alphas x 32 contexts x 50,257 tokens memory run")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: ufm_exp, ufm_numpy, gpt, optimize, scaling, memory, precision, "
                        "hf_load, sweep_memory, paper, train")
    p.add_argument("--quiet", action="store_true", help="no per-section progress lines")


def load_bench():
    """The benchmark suite, `benchmarks/bench.py` of the source checkout (it is not in the wheel)."""
    if not BENCH_SCRIPT.is_file():
        raise ValueError(f"bench needs the source checkout's {BENCH_SCRIPT.parent.name}/ folder "
                         f"(not installed with the wheel; looked for {BENCH_SCRIPT})")
    spec = importlib.util.spec_from_file_location("ufmjax_benchmarks", BENCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its child processes and dataclasses look it up by name
    spec.loader.exec_module(module)
    return module


def cmd_bench(args) -> int:
    return load_bench().main_from_args(args)


# ---------------------------------------------------------------- main

COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "optimize": cmd_optimize, "reproduce": cmd_reproduce,
            "bench": cmd_bench}
# Options whose value may start with '-' (a negative number): argparse would read it as an option.
VALUE_OPTIONS = {"--alphas", "--alpha-range", "--level", "--lam", "--budget"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ufmjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sweep, _add_optimize, _add_reproduce, _add_bench):
        add(sub)
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let `--alphas -20:20:401` through as `--alphas=-20:20:401`."""
    out = []
    for arg in argv:
        if out and out[-1] in VALUE_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (a message with line breaks is joined)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if not isinstance(e, OSError) or e.filename is None or str(e.filename) in text \
        else f"{text}: {e.filename}"


def _quiet_third_party() -> None:
    """On the command line, drop what libraries print from finalizers and background loops
    after ufmjax has already said what went wrong (Orbax's abandoned async reads printed up to
    ~130 lines of 'Exception ignored ... Event loop is closed' after a one-line error)."""
    import logging

    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def main(argv=None) -> int:
    if argv is None:  # the `ufmjax` command itself, not a call from Python (tests, notebooks)
        _quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    enable_compile_cache()  # README, "Compilation cache": a second run of a shape compiles nothing
    try:
        return COMMANDS[args.command](args)
    except (ValueError, io.CheckpointError, OSError) as e:
        # OSError: a path the system refuses (permissions, /proc, a file where a folder is
        # needed) is the user's to fix, so it gets one line too.
        print(f"ufmjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except io.TrainingDiverged as e:  # not the user's typing: the run itself failed
        print(f"ufmjax {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ufmjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
