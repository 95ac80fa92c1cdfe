"""ModelIdentity: what a scheduler compares before it links a worker, field by field."""

from __future__ import annotations

import dataclasses

from gridllm.v1 import worker_pb2
from scheduler_svc.model_identity import ModelIdentity

BASE = dict(model="m", model_config_hash="h", dtype="bfloat16", block_size=16,
            quantization="fp8", kv_cache_dtype="float8_e4m3fn", kv_cache_scales="calculated")


def test_every_field_that_changes_outputs_is_compared():
    first = ModelIdentity.of(worker_pb2.WorkerInfo(**BASE))
    assert first.differences(ModelIdentity.of(worker_pb2.WorkerInfo(**BASE))) == []
    changed = dict(model="n", model_config_hash="g", dtype="float16", block_size=32,
                   quantization="", kv_cache_dtype="float8_e5m2", kv_cache_scales="checkpoint")
    for name, value in changed.items():
        other = ModelIdentity.of(worker_pb2.WorkerInfo(**dict(BASE, **{name: value})))
        [difference] = first.differences(other)
        assert repr(value) in difference, (name, difference)
    assert {f.name for f in dataclasses.fields(ModelIdentity)} == {
        "model", "config_hash", "dtype", "block_size", "quantization", "kv_cache_dtype",
        "kv_cache_scales"}
