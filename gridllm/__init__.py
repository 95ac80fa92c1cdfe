"""gridllm: an LLM inference server (gRPC services) and a vLLM-style in-process engine."""

from gridllm.common.outputs import CompletionOutput, Logprob, RequestOutput
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "Client", "AsyncClient", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the engine is used.
    if name == "LLM":
        from gridllm.llm import LLM

        return LLM
    # grpc only when a client is used.
    if name in ("Client", "AsyncClient"):
        from gridllm import client

        return getattr(client, name)
    raise AttributeError(name)
