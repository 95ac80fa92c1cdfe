"""``python -m gridllm.bench throughput | serve | latency ...``."""

import sys

from gridllm.bench import main

sys.exit(main())
