"""``gridllm bench serve`` as a script: ``python benchmarks/serve.py --help``.

A thin wrapper over ``gridllm.bench.serve`` so the benchmark runs from a checkout without
installing the package; results are recorded in docs/performance.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gridllm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
