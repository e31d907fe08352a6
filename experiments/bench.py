"""The performance benchmark of issue #6: writes results/bench.md and results/bench.json.

    python experiments/bench.py            # every target (a few minutes on 2 cores)
    python experiments/bench.py --quick    # smoke test, under a minute
    python experiments/bench.py --full     # plus the 20,000 x 32 x 50,257 memory run
"""

import argparse
import sys

from ufmjax import cli_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_bench.add_args(parser)
    sys.exit(cli_bench.run(parser.parse_args()))
