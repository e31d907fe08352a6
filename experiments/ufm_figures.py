"""Regenerate the paper's UFM figures (Figs. 3, B.1, 4, 5) from the alpha-sweep kernel.

Taimeskhanov, Vaiter, Garreau, "Towards Understanding Steering Strength" (arXiv 2602.02712).
Trains (or loads) two UFMs, the reference point (V=9, G=3, eps=0.05, uniform profiles) and
one with Dirichlet profiles (every token its own log-odds, so bumps differ), sweeps each
with the kernel, overlays the closed forms of ufmjax.theory, and writes under --out:

  <label>/fig3_token_bumps.png  <label>/figB1_token_bumps_negative.png
  <label>/fig4_concept_curves.png  <label>/fig5_delta_ce.png
  ufm_figures.json   every number checked, pass/fail per check, runtimes

Exit status 1 if a check fails.

    python experiments/ufm_figures.py [--out results/ufm_figures] [--run RUN] [--float64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/ufm_figures", help="output folder (default results/ufm_figures)")
    p.add_argument("--run", default=None,
                   help="existing UFM run folder to draw instead of training the reference UFM into OUT/run")
    p.add_argument("--target", type=int, default=0, help="target concept (default 0)")
    p.add_argument("--negatives", choices=["contrastive", "random"], default="contrastive")
    p.add_argument("--float64", action="store_true", help="sweep in float64 (tolerances tighten to 1e-9)")
    p.add_argument("--no-dirichlet", action="store_true",
                   help="skip the second UFM with Dirichlet profiles (trained into OUT/run_dirichlet)")
    p.add_argument("--dirichlet-seed", type=int, default=0, help="seed of the Dirichlet profiles")
    p.add_argument("--alpha-step", type=float, default=0.02, help="alpha grid step (default 0.02)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    if args.float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from ufmjax.common import jsonable
    from ufmjax.data import dirichlet_config, reference_config
    from ufmjax.report.figures import check_summary, train_or_load, ufm_figures
    from ufmjax.runs import io, load_run

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    if args.run is not None:
        runs[Path(args.run).name or "run"] = lambda: load_run(args.run)
    else:
        runs["reference"] = lambda: train_or_load(out / "run", reference_config())
    if not args.no_dirichlet:
        runs["dirichlet"] = lambda: train_or_load(out / "run_dirichlet", dirichlet_config(seed=args.dirichlet_seed))

    dtype = jnp.float64 if args.float64 else jnp.float32
    report = {"args": vars(args), "results": {}, "checks": {}, "seconds": {}}
    ok = True
    for label, get_run in runs.items():
        t = time.perf_counter()
        run = get_run()
        t_train = time.perf_counter() - t
        result = ufm_figures(run, out / label, target=args.target, negatives=args.negatives, dtype=dtype,
                             alpha_step=args.alpha_step)
        checks = check_summary(result, args.float64)
        ok &= all(checks.values())
        report["results"][label] = result
        report["checks"][label] = checks
        report["seconds"][label] = {"train_or_load": t_train, **result["seconds"]}
        f3, f4, f5 = result["fig3"], result["fig4"], result["fig5"]
        print(f"[{label}] bumps(alpha>=0)={f3['n_bumps']} bumps(alpha<=0)={result['figB1']['n_bumps']} "
              f"off-target-first={f3['off_target_before_target']} "
              f"max|kernel-tanh|={f4['max_abs_err_vs_tanh']:.2e} "
              f"c={f5['curvature']:.5g} (kernel {f5['kernel_curvature']:.5g}) "
              f"quadratic rel.err |a|<=0.1: {f5['max_rel_err_quadratic_within_0.1']:.3g}, "
              f"departs at a={_fmt(f5['departure_alpha_neg'])}/{_fmt(f5['departure_alpha_pos'])}")
        failed = [k for k, v in checks.items() if not v]
        print(f"[{label}] checks: {'all pass' if not failed else 'FAILED ' + ', '.join(failed)}  -> {out / label}")
    report["seconds"]["total"] = time.perf_counter() - t0
    report["all_checks_pass"] = bool(ok)
    io.write_json_atomic(out / "ufm_figures.json", jsonable(report))
    print(f"wrote {out / 'ufm_figures.json'} in {report['seconds']['total']:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
