"""The cluster simulator behind benchmarks/simulate.py: the cost model (``cost``), the fleet
and its event loop (``cluster``) and the shared-prefix workloads (``workloads``)."""
