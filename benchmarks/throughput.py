"""``gridllm bench throughput`` as a script: ``python benchmarks/throughput.py --help``.

A thin wrapper over ``gridllm.bench.throughput`` so the benchmark runs from a checkout without
installing the package; results are recorded in docs/performance.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["throughput", *sys.argv[1:]]))
