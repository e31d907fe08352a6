"""`ufmjax optimize RUN`: the optimal steering strength of a trained run, by gradients in alpha.

Builds the steered model of a UFM or GPT run exactly as `ufmjax sweep` does (same steering
sets, rows, CE reference and weights), hands it to `ufmjax.optimize`, and writes the answer as
JSON (atomically). See `ufmjax.optimize` for what each objective maximises.
"""

from __future__ import annotations

import functools
import sys

HELP = "solve for the best steering strength alpha (penalised, budgeted or target level) by gradients"


def add_args(p) -> None:
    p.add_argument("run", help="run folder (UFM or GPT)")
    p.add_argument("--objective", choices=["penalised", "budget", "level"], default="penalised",
                   help="penalised: max dp - lam*D; budget: max dp - lam*D s.t. D <= budget; "
                        "level: min |alpha| s.t. target-concept probability >= level")
    p.add_argument("--lam", type=float, default=None, help="penalty weight (penalised: default 0.1; budget: 0)")
    p.add_argument("--budget", type=float, default=None, help="distortion budget in nats (objective budget)")
    p.add_argument("--level", type=float, default=None, help="target-concept probability in (0, 1) (objective level)")
    p.add_argument("--metric", choices=["ce", "kl"], default="ce",
                   help="distortion D: ΔCE (Def. 3.7) or mean KL to the unsteered model")
    p.add_argument("--per-context", action="store_true", help="one alpha per evaluation context (a vector)")
    p.add_argument("--target", required=True,
                   help="target concept index (text GPT runs: also a class name, e.g. uppercase)")
    p.add_argument("--contexts", default=None,
                   help="evaluation contexts: comma-separated row indices (default: all rows)")
    p.add_argument("--negatives", choices=["contrastive", "random"], default="contrastive")
    p.add_argument("--negative-concept", type=int, default=None, help="concept of N (contrastive)")
    p.add_argument("--q", type=int, default=None, help="|P| = |N| (default: as many as possible)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives")
    p.add_argument("--ce-against", choices=["data", "model"], default="data",
                   help="CE reference: the data (table or next tokens) or the unsteered model")
    p.add_argument("--layer", type=int, default=None, help="GPT: residual layer to steer (0..L)")
    p.add_argument("--positions", choices=["all", "last"], default="all", help="GPT: positions steered")
    p.add_argument("--method", choices=["newton", "lbfgs", "adam", "gd"], default="newton",
                   help="newton: kernel second derivatives; lbfgs/adam/gd: optax on reverse-mode gradients")
    p.add_argument("--tol", type=float, default=None, help="gradient tolerance (default 1e-10; float32 1e-5)")
    p.add_argument("--max-iter", type=int, default=None, help="iterations per inner solve")
    p.add_argument("--alpha-max", type=float, default=1e3, help="largest |alpha| searched (default 1000)")
    p.add_argument("--lr", type=float, default=None, help="adam / gd learning rate")
    p.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    p.add_argument("--out", required=True, help="JSON file to write")


def _contexts(text):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"contexts must be comma-separated row indices, got {text!r}") from None


def problem_from_run(run, target, *, negatives="contrastive", negative_concept=None, q=None, seed=0,
                     ce_against="data", contexts=None, layer=None, positions="all", dtype=None):
    """The optimisation problem of a loaded run: (Problem, meta), with the rows of `ufmjax sweep`.

    UFM: the m contexts, CE against p(z|c_j) (or the model) with weights pi. GPT (ufmjax.gptrun):
    concept data as the UFM; text: the sweep's held-out prompts, CE against their next characters.
    """
    import numpy as np

    from ufmjax.optimize import Problem, register_rowwise
    from ufmjax.runs import UFMRun, versions

    if ce_against not in ("data", "model"):
        raise ValueError(f"ce_against must be 'data' or 'model', got {ce_against!r}")
    if isinstance(run, UFMRun):
        from ufmjax.data import select_steering_sets
        from ufmjax.steering import ufm_steered, ufm_steering_vector

        if layer is not None:
            raise ValueError("layer applies to GPT runs only")
        target = _int_target(target)
        data = run.data
        _check_target(target, data.num_concepts)
        P, N = select_steering_sets(data.context_concept, target, negatives, negative_concept, q, seed)
        steered = ufm_steered(run.model, ufm_steering_vector(run.model, P, N))
        problem = Problem(steered, concept_of=data.concept_of, target=target,
                          ce_target=data.p_MxV if ce_against == "data" else None, weights=data.pi,
                          contexts=contexts, dtype=dtype)
        meta = {"model": "ufm", "run": str(run.path), "target": target, "negatives": negatives,
                "negative_concept": negative_concept, "q": int(P.size), "seed": seed, "ce_against": ce_against,
                "context_concept": data.context_concept[problem.contexts].tolist()}
    else:
        from ufmjax import gptrun
        from ufmjax.gpt import check_layer, check_positions, steered_closure

        model = run.model
        if run.corpus == "text":
            from ufmjax.text import concept_index

            target = concept_index(target if not str(target).isdigit() else int(target))
        else:
            target = _int_target(target)
            _check_target(target, run.source.num_concepts)
        layer = gptrun.default_layer(model) if layer is None else check_layer(model, layer)
        positions = check_positions(positions)
        steer_prompts, P, N = gptrun.steering_sets(run, target, negatives, negative_concept, q, seed)
        v = gptrun.gpt_steering_vector(model, steer_prompts, P, N, layer)
        # The rows of gptrun.gpt_sweep, so that `optimize` and `sweep` measure the same thing.
        if run.corpus == "concept":
            data = run.source
            prompts, weights, concept_of = data.contexts, data.pi, data.concept_of
            ce_target = data.p_MxV if ce_against == "data" else None
            extra = {"context_concept": None}
        else:
            corpus = run.source
            windows = corpus.spaced_windows(gptrun.text_prompt_len(model) + 1, gptrun.TEXT_ROWS, "val")
            prompts, weights, concept_of = windows[:, :-1], None, corpus.concept_of
            ce_target = windows[:, -1] if ce_against == "data" else None
            extra = {}
        steered = steered_closure(model, prompts, v, layer, positions)
        register_rowwise(steered.fn, gpt_rowwise(steered.fn))
        problem = Problem(steered, concept_of=concept_of, target=target, ce_target=ce_target, weights=weights,
                          contexts=contexts, dtype=dtype)
        meta = {"model": "gpt", "corpus": run.corpus, "run": str(run.path), "target": int(target),
                "negatives": negatives, "negative_concept": negative_concept, "q": int(len(P)), "seed": seed,
                "layer": layer, "positions": positions, "ce_against": ce_against}
        if run.corpus == "concept":
            extra["context_concept"] = run.source.context_concept[problem.contexts].tolist()
        meta.update(extra)
    meta["dtype"] = str(np.dtype(problem.dtype))
    meta["versions"] = versions()
    return problem, meta


@functools.lru_cache(maxsize=64)
def gpt_rowwise(fn):
    """One-pass per-prompt alphas for a `gpt.steered_closure` fn (rows = prompts).

    The closure adds `alpha * params["steer"]` to the cached residual (`h` [B, T, D], or `x`
    [B, D] for last-position steering); scaling the steering vector per prompt and calling it at
    alpha = 1 steers prompt j by alpha_j in one model evaluation instead of B.
    (tests/test_optimize.py checks it against one evaluation per row.)
    """
    import jax.numpy as jnp

    def rowwise(params, alpha_M):
        lead = params["h"] if "h" in params else params["x"]
        scale = alpha_M.reshape((-1,) + (1,) * (lead.ndim - 1))
        return fn({**params, "steer": scale * params["steer"]}, jnp.ones((), alpha_M.dtype))

    return rowwise


def _int_target(target) -> int:
    try:
        return int(target)
    except (TypeError, ValueError):
        raise ValueError(f"unknown target concept {target!r}: give a concept index") from None


def _check_target(target: int, G: int) -> None:
    if not 0 <= target < G:
        raise ValueError(f"unknown target concept {target}: this run has concepts 0..{G - 1}")


def run(args) -> int:
    import contextlib

    import jax

    # A scoped switch, not a global one: the CLI is also called in-process (tests, notebooks).
    with jax.enable_x64(True) if not args.float32 else contextlib.nullcontext():
        return _run(args)


def _run(args) -> int:
    import jax.numpy as jnp

    from ufmjax import io
    from ufmjax.optimize import Objective, optimize
    from ufmjax.runs import load_run

    if not args.out.endswith(".json"):
        raise ValueError(f"out must be a .json file, got {args.out!r}")
    objective = Objective(args.objective, lam=args.lam, budget=args.budget, level=args.level, metric=args.metric)
    loaded = load_run(args.run)
    problem, meta = problem_from_run(
        loaded, args.target, negatives=args.negatives, negative_concept=args.negative_concept, q=args.q,
        seed=args.seed, ce_against=args.ce_against, contexts=_contexts(args.contexts), layer=args.layer,
        positions=args.positions, dtype=jnp.float32 if args.float32 else jnp.float64)
    result = optimize(problem, objective, per_context=args.per_context, method=args.method, tol=args.tol,
                      max_iter=args.max_iter, alpha_max=args.alpha_max, lr=args.lr)
    out = {**result.to_dict(), **{k: v for k, v in meta.items() if k not in ("target",)}}
    io.write_json_atomic(args.out, out)
    alpha = result.alpha if not args.per_context else f"[{min(result.alpha):.4g} .. {max(result.alpha):.4g}]"
    alpha = f"{alpha:.6g}" if isinstance(alpha, float) else alpha
    line = (f"alpha={alpha} objective={result.objective:.6g} delta_p_target={result.delta_p_target:.4g} "
            f"delta_ce={result.delta_ce:.4g} kl={result.kl:.4g} iterations={result.iterations} "
            f"evaluations={result.evaluations} ({args.out})")
    if result.converged:
        print(line)
        return 0
    print(line)
    print(f"ufmjax optimize: NOT CONVERGED: {result.message}", file=sys.stderr)
    return 1
