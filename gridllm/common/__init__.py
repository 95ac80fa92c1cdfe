"""The ground floor: what the router, the scheduler, the workers and the in-process engine
share, importing none of them.

Sampling parameters, configs, outputs, the scheduler <-> runner contract, block versions, the
prefix-block hash, Redis key names, protobuf <-> dataclass conversion, gRPC plumbing,
tokenizer / detokenizer / chat template and output processing. Nothing here imports torch
(the client and the router load without it); the generated protobuf stubs live beside it in
``gridllm.v1``.
"""
