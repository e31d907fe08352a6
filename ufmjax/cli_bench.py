"""`ufmjax bench`: the performance benchmark (ratios measured side by side on this machine)."""

from __future__ import annotations

HELP = "benchmark the sweep kernel (ratios against exp, NumPy, full GPT passes, grids); write bench.md"


def add_args(p) -> None:
    p.add_argument("--out", default="results", help="folder for bench.md and bench.json (default results)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke test, under a minute (ratios not meaningful)")
    mode.add_argument("--full", action="store_true",
                      help="also the full 20,000 alphas x 32 contexts x 50,257 tokens memory run")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: ufm_exp, ufm_numpy, gpt, optimize, scaling, memory, precision")
    p.add_argument("--quiet", action="store_true", help="no per-section progress lines")


def run(args) -> int:
    from ufmjax.bench import run_bench

    mode = "quick" if args.quick else "full" if args.full else "default"
    sections = None if args.sections is None else [s.strip() for s in args.sections.split(",") if s.strip()]
    report = run_bench(mode, args.out, sections=sections, progress=not args.quiet)
    rows = [r for s in report["sections"] for r in s["rows"] if r["met"] is not None]
    failed = [s["name"] for s in report["sections"] if s["error"]]
    print(f"targets met: {sum(r['met'] for r in rows)} of {len(rows)} ({report['seconds']:.0f} s); "
          f"report: {args.out}/bench.md")
    for r in rows:
        if not r["met"]:
            print(f"  not met: {r['name']} = {r['value']:.3g} (target {r['target']})")
    if failed:
        print(f"sections that failed to run: {', '.join(failed)}")
    return 1 if failed else 0
