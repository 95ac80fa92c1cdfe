"""deploy/grafana/gridllm.json reads only metrics the services export."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exported_families() -> set[str]:
    from router.metrics import RouterMetrics
    from scheduler_svc.metrics import SchedulerMetrics
    from worker_svc.metrics import WorkerMetrics

    registries = [RouterMetrics().registry, WorkerMetrics().registry,
                  SchedulerMetrics(SimpleNamespace(links={})).registry]
    return {family.name for registry in registries for family in registry.collect()}


def test_every_dashboard_query_names_an_exported_metric():
    with open(os.path.join(ROOT, "deploy", "grafana", "gridllm.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {re.sub(r"_(bucket|count|sum)$", "", m)
             for e in exprs for m in re.findall(r"gridllm:[a-z0-9_]+", e)}
    assert len(names) >= 15
    families = _exported_families()
    missing = [n for n in names if n not in families and n.removesuffix("_total") not in families]
    assert not missing
