"""Run the normgrad benchmarks: `python benchmarks/run.py [--quick] [--out DIR] ...`
(`make bench`, and `normgrad bench` from a source checkout).

Results go to benchmarks/results/ (git-ignored): bench.json, bench.md and bench.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels

if __name__ == "__main__":
    sys.exit(bench_kernels.run(bench_kernels.parse_args()))
