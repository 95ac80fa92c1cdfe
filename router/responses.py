"""``CompletionDelta`` -> ``GenerateResponse``: the router's edge of the shared output path."""

from __future__ import annotations

from gridllm.common.completion import CompletionDelta, DecodedLogprobs
from gridllm.common.convert import FINISH_REASON_TO_PB
from gridllm.v1 import generate_pb2


def logprobs_to_pb(items: list[DecodedLogprobs]) -> list[generate_pb2.TokenLogprobs]:
    return [generate_pb2.TokenLogprobs(token_ids=e.token_ids, logprobs=e.logprobs, ranks=e.ranks,
                                       tokens=e.tokens or [])
            for e in items]


def generate_response(request_id: str, delta: CompletionDelta,
                      return_token_ids: bool) -> generate_pb2.GenerateResponse | None:
    """The response streamed for ``delta``; None when it carries nothing to send."""
    # Lists are filled only when non-empty: this runs once per streamed token.
    response = generate_pb2.GenerateResponse(request_id=request_id, index=delta.index,
                                             text=delta.text)
    if return_token_ids and delta.new_token_ids:
        response.token_ids.extend(delta.new_token_ids)
    if delta.new_logprobs:
        response.logprobs.extend(logprobs_to_pb(delta.new_logprobs))
    if delta.new_prompt_logprobs:
        response.prompt_logprobs.extend(logprobs_to_pb(delta.new_prompt_logprobs))
    if not delta.finished:
        is_empty = not (delta.text or response.token_ids or delta.new_logprobs
                        or delta.new_prompt_logprobs)
        return None if is_empty else response
    response.finish_reason = FINISH_REASON_TO_PB[delta.finish_reason]
    assert delta.usage is not None
    response.usage.CopyFrom(generate_pb2.Usage(
        prompt_tokens=delta.usage.prompt_tokens, completion_tokens=delta.usage.completion_tokens,
        cached_tokens=delta.usage.cached_tokens))
    if isinstance(delta.stop_reason, str):
        response.stop_str = delta.stop_reason
    elif delta.stop_reason is not None:
        response.stop_token_id = delta.stop_reason
    return response
