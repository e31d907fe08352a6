"""The `ufmjax` command: parses arguments and calls the library; user errors exit with status 2."""

from __future__ import annotations

import argparse
import sys


def _add_train(sub):
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
    try:
        from ufmjax import gptrun
    except ImportError:
        return
    gptrun.add_train_args(models.add_parser("gpt", help="a small GPT on concept data or bundled text"))


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="sweep a trained run over an alpha grid into an .npz")
    p.add_argument("run", help="run folder")
    p.add_argument("--target", type=int, required=True, help="target concept index")
    p.add_argument("--negatives", choices=["contrastive", "random"], default="contrastive")
    p.add_argument("--negative-concept", type=int, default=None, help="concept of N (contrastive)")
    p.add_argument("--q", type=int, default=None, help="|P| = |N| (default: as many as possible)")
    p.add_argument("--alphas", default="-20:20:401", help="START:STOP:NUM (default -20:20:401)")
    p.add_argument("--top-k", type=int, default=None, help="track only the k most likely tokens at max |alpha|")
    p.add_argument("--ce-against", choices=["data", "model"], default="data",
                   help="CE reference: data = p(z|c) (concept data) or the observed next character (text); "
                        "model = the unsteered model itself")
    p.add_argument("--layer", type=int, default=None, help="GPT: residual layer to steer (0..L)")
    p.add_argument("--positions", choices=["all", "last"], default="all", help="GPT: positions steered")
    p.add_argument("--chunk-size", type=int, default=None, help="alphas per compiled call")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--out", required=True, help=".npz file to write")


def cmd_train(args) -> dict:
    if args.model == "gpt":
        from ufmjax import gptrun

        return gptrun.cli_train(args)
    from ufmjax.data import DataConfig
    from ufmjax.runs import train_ufm_run
    from ufmjax.train import TrainConfig

    def floats(name, text):
        if text is None:
            return None
        try:
            return tuple(float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None

    data_cfg = DataConfig(vocab=args.vocab, concepts=args.concepts, eps=args.eps,
                          context_len=args.context_len, contexts_per_concept=args.contexts_per_concept,
                          gamma=floats("gamma", args.gamma), omega=floats("omega", args.omega), seed=args.seed)
    train_cfg = TrainConfig(steps=args.steps, lr=args.lr, clip=0.0, ckpt_every=args.ckpt_every)
    metrics = train_ufm_run(args.out, data_cfg, dim=args.dim, seed=args.seed, train_config=train_cfg,
                            progress=not args.quiet, force=args.force)
    print(f"final_ce={metrics['final_ce']:.6f} entropy={metrics['entropy']:.6f} "
          f"gap={metrics['gap']:.2e} nats  ({args.out})")
    return metrics


def cmd_sweep(args):
    import contextlib

    import jax

    # A scoped switch, not a global one: the CLI is also called in-process (tests, notebooks).
    with jax.enable_x64(True) if args.float64 else contextlib.nullcontext():
        _sweep(args)


def _sweep(args):
    import jax.numpy as jnp

    from ufmjax import io
    from ufmjax.runs import load_run, save_sweep, ufm_sweep
    from ufmjax.sweep import parse_alphas

    alphas = parse_alphas(args.alphas)
    if not args.out.endswith(".npz"):
        raise ValueError(f"out must be a .npz file, got {args.out!r}")
    cfg = io.load_run_config(args.run)
    dtype = jnp.float64 if args.float64 else jnp.float32
    if cfg["model"] == "gpt":
        from ufmjax import gptrun

        arrays, meta = gptrun.cli_sweep(args, alphas, dtype)
    else:
        if args.layer is not None:
            raise ValueError("layer applies to GPT runs only")
        run = load_run(args.run)
        arrays, meta = ufm_sweep(run, alphas, target=args.target, negatives=args.negatives,
                                 negative_concept=args.negative_concept, q=args.q, seed=args.seed,
                                 ce_against=args.ce_against, top_k=args.top_k, chunk_size=args.chunk_size,
                                 dtype=dtype)
    save_sweep(args.out, arrays, meta)
    print(f"wrote {args.out}: {arrays['alphas'].size} alphas x {arrays['probs_base'].shape[0]} contexts, "
          f"max delta_ce={arrays['delta_ce'].max():.4g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ufmjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sweep(sub)
    for name in ("optimize", "reproduce", "bench"):
        try:
            mod = __import__(f"ufmjax.cli_{name}", fromlist=["add_args"])
        except ImportError:
            continue
        mod.add_args(sub.add_parser(name, help=mod.HELP))
    return parser


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let `--alphas -20:20:401` through: argparse would read '-20:20:401' as an option."""
    out = []
    for arg in argv:
        if out and out[-1] in VALUE_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


VALUE_OPTIONS = {"--alphas", "--alpha-range", "--level", "--lam", "--budget"}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    from ufmjax.io import CheckpointError

    handlers = {"train": cmd_train, "sweep": cmd_sweep}
    try:
        if args.command in handlers:
            handlers[args.command](args)
            rc = 0
        else:
            rc = __import__(f"ufmjax.cli_{args.command}", fromlist=["run"]).run(args)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"ufmjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ufmjax: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
