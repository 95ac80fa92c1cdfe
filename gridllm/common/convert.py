"""``to_pb`` / ``from_pb`` between the gridllm.v1 messages and the engine dataclasses.

Protobuf stays at the service edges: the scheduler core, block manager and model runner
see only the dataclasses built here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf import json_format, struct_pb2

from gridllm.common.config import RequestLimits
from gridllm.common.contract import (
    CachedRequestData,
    FinishReason,
    ModelLimits,
    ModelRunnerOutput,
    NewRequestData,
    RequestUpdate,
    SchedulerOutput,
    TokenLogprobs,
)
from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams
from gridllm.v1 import generate_pb2, scheduler_pb2, worker_pb2

# Optional proto fields whose absence means the Python default.
_OPTIONAL_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "seed", "min_tokens",
                    "logprobs", "prompt_logprobs", "skip_special_tokens")
_PLAIN_FIELDS = ("ignore_eos", "include_stop_str_in_output")

FINISH_REASON_TO_PB = {
    None: generate_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: generate_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: generate_pb2.FINISH_REASON_ABORT,
}
FINISH_REASON_FROM_PB = {v: k for k, v in FINISH_REASON_TO_PB.items()}


# ----------------------------------------------------------------------- SamplingParams
def sampling_params_from_pb(msg: generate_pb2.SamplingParams | None,
                            limits: RequestLimits | None = None) -> SamplingParams:
    """Build (and so validate) SamplingParams; ValueError names the bad field.

    Args:
        limits: checked on the message first, before its lists are copied.
    """
    if msg is None:
        return SamplingParams()
    if limits is not None:
        limits.check(msg)  # the message has SamplingParams' field names
    kwargs: dict[str, Any] = {}
    for name in _OPTIONAL_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    for name in _PLAIN_FIELDS:
        kwargs[name] = getattr(msg, name)
    if msg.unbounded_max_tokens:
        kwargs["max_tokens"] = None
    elif msg.HasField("max_tokens"):
        kwargs["max_tokens"] = msg.max_tokens
    kwargs["stop"] = list(msg.stop)
    kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.allowed_token_ids:
        kwargs["allowed_token_ids"] = list(msg.allowed_token_ids)
    kwargs["logits_processors"] = list(msg.logits_processors)
    if msg.HasField("extra_args"):
        try:
            extra_args = json_format.MessageToDict(msg.extra_args)
        except (ValueError, json_format.Error) as exc:  # e.g. NaN or Infinity in a value
            raise ValueError(f"extra_args must hold JSON values: {exc}") from None
        kwargs["extra_args"] = _ints_back(extra_args)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_outputs_from_pb(msg.structured_outputs)
    return SamplingParams(**kwargs)


def check_max_tokens(params: SamplingParams, msg: generate_pb2.SamplingParams | None,
                     num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """``params`` (built from ``msg``) checked against the context: a max_tokens the message
    sets past what the prompt leaves is a ValueError naming it (as vLLM refuses it); the
    default one, left unset, is cut to fit."""
    if msg is not None and (msg.HasField("max_tokens") or msg.unbounded_max_tokens):
        params.verify_max_tokens(num_prompt_tokens, max_model_len)
        return params
    return params.fit_max_tokens(num_prompt_tokens, max_model_len)


def sampling_params_to_pb(params: SamplingParams) -> generate_pb2.SamplingParams:
    msg = generate_pb2.SamplingParams()
    for name in _OPTIONAL_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    for name in _PLAIN_FIELDS:
        setattr(msg, name, getattr(params, name))
    if params.max_tokens is None:
        msg.unbounded_max_tokens = True
    else:
        msg.max_tokens = params.max_tokens
    msg.stop.extend(params.stop or [])
    msg.stop_token_ids.extend(params.stop_token_ids or [])
    for token_id, bias in (params.logit_bias or {}).items():
        msg.logit_bias[token_id] = bias
    msg.allowed_token_ids.extend(params.allowed_token_ids or [])
    msg.logits_processors.extend(params.logits_processors or [])
    if params.extra_args is not None:
        struct = struct_pb2.Struct()
        struct.update(params.extra_args)
        msg.extra_args.CopyFrom(struct)
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_outputs_to_pb(params.structured_outputs))
    return msg


def structured_outputs_from_pb(msg: generate_pb2.StructuredOutputs) -> StructuredOutputsParams:
    """ValueError naming ``structured_outputs`` (or its field) if no kind is set or the
    value is bad."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set one of json, regex, choice, grammar, "
                         "json_object.")
    value: Any = getattr(msg, kind)
    if kind == "choice":
        value = list(value.values)
    return StructuredOutputsParams(**{kind: value},
                                   disable_any_whitespace=msg.disable_any_whitespace)


def structured_outputs_to_pb(params: StructuredOutputsParams) -> generate_pb2.StructuredOutputs:
    msg = generate_pb2.StructuredOutputs(disable_any_whitespace=params.disable_any_whitespace)
    kind = params.kind
    if kind == "choice":
        msg.choice.values.extend(params.choice or [])
    elif kind == "json_object":
        msg.json_object = True
    else:
        setattr(msg, kind, params.spec)
    return msg


def _ints_back(value: Any) -> Any:
    # Struct stores every number as a double; processors expect ints where ints were sent.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints_back(v) for v in value]
    return value


# ----------------------------------------------------------------------- ModelLimits
# WorkerInfo, SchedulerInfo and GetModelInfoResponse carry the limits as flat fields of these
# names (max_model_len, vocab_size, block_size, optional eos_token_id; kv_window, 0 for none,
# and kv_group_windows where the scheduler needs them).
def model_limits_from_pb(msg: Any) -> ModelLimits:
    """The limits in a WorkerInfo, SchedulerInfo or GetModelInfoResponse."""
    return ModelLimits(max_model_len=msg.max_model_len, vocab_size=msg.vocab_size,
                       block_size=msg.block_size,
                       eos_token_id=msg.eos_token_id if msg.HasField("eos_token_id") else None,
                       kv_window=getattr(msg, "kv_window", 0) or None,
                       kv_group_windows=tuple(getattr(msg, "kv_group_windows", ())))


def model_limits_to_pb(limits: ModelLimits, msg: Any) -> Any:
    """Write ``limits`` into ``msg`` (one of the messages above); returns ``msg``."""
    msg.max_model_len = limits.max_model_len
    msg.vocab_size = limits.vocab_size
    msg.block_size = limits.block_size
    if limits.eos_token_id is None:
        msg.ClearField("eos_token_id")
    else:
        msg.eos_token_id = limits.eos_token_id
    if hasattr(msg, "kv_window"):
        msg.kv_window = limits.kv_window or 0
    if hasattr(msg, "kv_group_windows"):
        del msg.kv_group_windows[:]
        msg.kv_group_windows.extend(limits.kv_group_windows)
    return msg


# ----------------------------------------------------------------------- RequestLimits
def request_limits_to_pb(limits: RequestLimits) -> scheduler_pb2.RequestLimits:
    return scheduler_pb2.RequestLimits(**dataclasses.asdict(limits))


def request_limits_from_pb(msg: scheduler_pb2.RequestLimits) -> RequestLimits:
    """The limits a scheduler reported; a field it left at zero keeps the default."""
    return RequestLimits(**{f.name: getattr(msg, f.name)
                            for f in dataclasses.fields(RequestLimits) if getattr(msg, f.name)})


# ----------------------------------------------------------------------- logprobs
def logprobs_to_pb(items: list[TokenLogprobs] | None) -> list[generate_pb2.TokenLogprobs]:
    return [generate_pb2.TokenLogprobs(token_ids=t.token_ids, logprobs=t.logprobs, ranks=t.ranks)
            for t in items or []]


def logprobs_from_pb(items) -> list[TokenLogprobs]:
    return [TokenLogprobs(list(t.token_ids), list(t.logprobs), list(t.ranks)) for t in items]


# ----------------------------------------------------------------------- SchedulerOutput
def scheduler_output_to_pb(out: SchedulerOutput, step_id: int = 0) -> worker_pb2.StepRequest:
    msg = worker_pb2.StepRequest(step_id=step_id)
    for new in out.scheduled_new_reqs:
        msg.scheduled_new_reqs.append(worker_pb2.NewRequest(
            req_id=new.req_id, prompt_token_ids=new.prompt_token_ids,
            sampling_params=sampling_params_to_pb(new.sampling_params),
            output_token_ids=new.output_token_ids, block_ids=new.block_ids,
            num_computed_tokens=new.num_computed_tokens,
            num_scheduled_tokens=out.num_scheduled_tokens.get(new.req_id, 0),
            group_block_ids=[worker_pb2.BlockIds(ids=ids) for ids in new.group_block_ids]))
    # One entry per running request per step: built in place (append would copy it), the
    # group tables only for models that have them.
    num_scheduled = out.num_scheduled_tokens
    add_cached = msg.scheduled_cached_reqs.add
    for cached in out.scheduled_cached_reqs:
        entry = add_cached(req_id=cached.req_id, new_block_ids=cached.new_block_ids,
                           num_computed_tokens=cached.num_computed_tokens,
                           num_scheduled_tokens=num_scheduled.get(cached.req_id, 0))
        for ids in cached.new_group_block_ids:
            entry.new_group_block_ids.add(ids=ids)
    msg.finished_req_ids.extend(sorted(out.finished_req_ids))
    return msg


def scheduler_output_from_pb(msg: worker_pb2.StepRequest) -> SchedulerOutput:
    out = SchedulerOutput()
    # num_scheduled_tokens keeps the scheduler's order: running (cached) requests first.
    for cached in msg.scheduled_cached_reqs:
        out.scheduled_cached_reqs.append(CachedRequestData(
            cached.req_id, list(cached.new_block_ids), cached.num_computed_tokens,
            [list(g.ids) for g in cached.new_group_block_ids]))
        out.num_scheduled_tokens[cached.req_id] = cached.num_scheduled_tokens
    for new in msg.scheduled_new_reqs:
        out.scheduled_new_reqs.append(NewRequestData(
            new.req_id, list(new.prompt_token_ids),
            sampling_params_from_pb(new.sampling_params), list(new.output_token_ids),
            list(new.block_ids), new.num_computed_tokens,
            [list(g.ids) for g in new.group_block_ids]))
        out.num_scheduled_tokens[new.req_id] = new.num_scheduled_tokens
    out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
    out.finished_req_ids = set(msg.finished_req_ids)
    return out


# ----------------------------------------------------------------------- ModelRunnerOutput
def runner_output_to_pb(out: ModelRunnerOutput, step_id: int = 0,
                        execute_seconds: float = 0.0) -> worker_pb2.StepResponse:
    msg = worker_pb2.StepResponse(step_id=step_id, req_ids=out.req_ids,
                                  execute_seconds=execute_seconds)
    req_ids = list(dict.fromkeys([*out.sampled_token_ids, *out.logprobs, *out.prompt_logprobs,
                                  *out.failed]))
    add = msg.outputs.add
    for req_id in req_ids:
        item = add(req_id=req_id, sampled_token_ids=out.sampled_token_ids.get(req_id, ()))
        if out.logprobs and req_id in out.logprobs:
            item.logprobs.extend(logprobs_to_pb(out.logprobs[req_id]))
        if out.prompt_logprobs and req_id in out.prompt_logprobs:
            item.prompt_logprobs.extend(logprobs_to_pb(out.prompt_logprobs[req_id]))
        if out.failed and req_id in out.failed:
            item.error = out.failed[req_id]
    return msg


def runner_output_from_pb(msg: worker_pb2.StepResponse) -> ModelRunnerOutput:
    out = ModelRunnerOutput(req_ids=list(msg.req_ids))
    for item in msg.outputs:
        if item.sampled_token_ids:
            out.sampled_token_ids[item.req_id] = list(item.sampled_token_ids)
        if item.logprobs:
            out.logprobs[item.req_id] = logprobs_from_pb(item.logprobs)
        if item.prompt_logprobs:
            out.prompt_logprobs[item.req_id] = logprobs_from_pb(item.prompt_logprobs)
        if item.error:
            out.failed[item.req_id] = item.error
    return out


# ----------------------------------------------------------------------- RequestUpdate
def request_update_to_pb(update: RequestUpdate, worker_id: str = "",
                         into: scheduler_pb2.SubmitResponse | None = None
                         ) -> scheduler_pb2.SubmitResponse:
    """The update as a SubmitResponse; written into ``into`` (e.g. a repeated field's new
    entry, which saves a copy) when given."""
    msg = scheduler_pb2.SubmitResponse() if into is None else into
    msg.request_id = update.req_id
    msg.token_ids.extend(update.new_token_ids)
    if update.new_logprobs:
        msg.logprobs.extend(logprobs_to_pb(update.new_logprobs))
    if update.new_prompt_logprobs:
        msg.prompt_logprobs.extend(logprobs_to_pb(update.new_prompt_logprobs))
    if update.finish_reason is not None:
        msg.finish_reason = FINISH_REASON_TO_PB[update.finish_reason]
    if update.num_cached_tokens > 0:
        msg.num_cached_tokens = update.num_cached_tokens
    if worker_id:
        msg.worker_id = worker_id
    if isinstance(update.stop_reason, int):
        msg.stop_token_id = update.stop_reason
    return msg


def request_update_from_pb(msg: scheduler_pb2.SubmitResponse) -> RequestUpdate:
    # Runs per request per step in the router: empty repeated fields are not converted.
    logprobs, prompt_logprobs = msg.logprobs, msg.prompt_logprobs
    finish_reason = msg.finish_reason
    return RequestUpdate(
        req_id=msg.request_id, new_token_ids=list(msg.token_ids),
        new_logprobs=logprobs_from_pb(logprobs) if logprobs else None,
        new_prompt_logprobs=logprobs_from_pb(prompt_logprobs) if prompt_logprobs else None,
        finish_reason=FINISH_REASON_FROM_PB[finish_reason] if finish_reason else None,
        stop_reason=msg.stop_token_id if msg.HasField("stop_token_id") else None,
        num_cached_tokens=msg.num_cached_tokens)
