"""Run the normgrad benchmarks: `python benchmarks/run.py [--quick] [--out DIR] ...`
(`make bench`, and `normgrad bench` from a source checkout).

Results go to benchmarks/results/ (git-ignored): bench.json, bench.md and bench.png. Without
--quick or --sizes, the checker's cost follows (benchmarks/bench_checker.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_checker
import bench_kernels

if __name__ == "__main__":
    args = bench_kernels.parse_args()
    code = bench_kernels.run(args)
    if not args.quick and not args.sizes:  # the checker's cost: evaluations of f and time
        print("\nChecker cost (benchmarks/bench_checker.py):")
        bench_checker.main()
    sys.exit(code)
