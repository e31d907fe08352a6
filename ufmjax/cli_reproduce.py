"""`ufmjax reproduce`: the main job."""

from __future__ import annotations

HELP = "train, sweep, check every law of the theory, optimise alpha; write figures and report.md"


def add_args(p) -> None:
    p.add_argument("--out", default="results/reproduce", help="folder for runs, figures and report.md")
    p.add_argument("--quick", action="store_true", help="small version (under 2 minutes)")
    p.add_argument("--force", action="store_true", help="retrain instead of reusing finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from ufmjax.reproduce import reproduce

    summary = reproduce(args.out, quick=args.quick, force=args.force, progress=not args.quiet)
    print(f"{summary['passed']}/{summary['total']} laws pass in {summary['seconds']:.0f} s; "
          f"report: {args.out}/report.md")
    if summary["failed_sections"]:
        print(f"sections that failed to run: {', '.join(summary['failed_sections'])}")
    return 0 if summary["all_passed"] else 1
