"""Run the normgrad benchmarks: `python benchmarks/run.py [--quick] [--out DIR] ...`.

The same runner as `normgrad bench` (src/normgrad/_bench.py); results go to
benchmarks/results/ (git-ignored): bench.json, bench.md and bench.png.
"""

import sys

from normgrad import _bench

if __name__ == "__main__":
    sys.exit(_bench.run(_bench.parse_args()))
