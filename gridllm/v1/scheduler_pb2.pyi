from gridllm.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AbortReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORT_REASON_UNSPECIFIED: _ClassVar[AbortReason]
    ABORT_REASON_CLIENT: _ClassVar[AbortReason]
    ABORT_REASON_STOP: _ClassVar[AbortReason]
ABORT_REASON_UNSPECIFIED: AbortReason
ABORT_REASON_CLIENT: AbortReason
ABORT_REASON_STOP: AbortReason

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "priority", "extra_stop_token_ids", "eos_token_id", "cache_salt", "output_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling_params: _generate_pb2.SamplingParams
    priority: int
    extra_stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    eos_token_id: int
    cache_salt: str
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling_params: _Optional[_Union[_generate_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., extra_stop_token_ids: _Optional[_Iterable[int]] = ..., eos_token_id: _Optional[int] = ..., cache_salt: _Optional[str] = ..., output_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "logprobs", "prompt_logprobs", "finish_reason", "stop_token_id", "num_cached_tokens", "worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_generate_pb2.TokenLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_generate_pb2.TokenLogprobs]
    finish_reason: _generate_pb2.FinishReason
    stop_token_id: int
    num_cached_tokens: int
    worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_generate_pb2.TokenLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_generate_pb2.TokenLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[_generate_pb2.FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., worker_id: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("submit", "abort")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    submit: SessionSubmit
    abort: SessionAbort
    def __init__(self, submit: _Optional[_Union[SessionSubmit, _Mapping]] = ..., abort: _Optional[_Union[SessionAbort, _Mapping]] = ...) -> None: ...

class SessionSubmit(_message.Message):
    __slots__ = ("request", "tenant", "client_request_id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request: SubmitRequest
    tenant: str
    client_request_id: str
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[SubmitRequest, _Mapping]] = ..., tenant: _Optional[str] = ..., client_request_id: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SessionAbort(_message.Message):
    __slots__ = ("request_ids", "reason", "tenant")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: AbortReason
    tenant: str
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[_Union[AbortReason, str]] = ..., tenant: _Optional[str] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("request_id", "code", "message", "retry_after_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: str
    message: str
    retry_after_ms: int
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("updates", "errors")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SubmitResponse]
    errors: _containers.RepeatedCompositeFieldContainer[SessionError]
    def __init__(self, updates: _Optional[_Iterable[_Union[SubmitResponse, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[SessionError, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_ids", "reason")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: AbortReason
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[_Union[AbortReason, str]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted_request_ids",)
    ABORTED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    aborted_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, aborted_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSchedulerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerInfo(_message.Message):
    __slots__ = ("scheduler_id", "model", "max_model_len", "vocab_size", "eos_token_id", "block_size", "num_workers", "request_limits", "supports_session")
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_LIMITS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_SESSION_FIELD_NUMBER: _ClassVar[int]
    scheduler_id: str
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int
    block_size: int
    num_workers: int
    request_limits: RequestLimits
    supports_session: bool
    def __init__(self, scheduler_id: _Optional[str] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., block_size: _Optional[int] = ..., num_workers: _Optional[int] = ..., request_limits: _Optional[_Union[RequestLimits, _Mapping]] = ..., supports_session: _Optional[bool] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_n", "max_logprobs", "max_num_stop_strings", "max_stop_string_len", "max_num_stop_token_ids", "max_num_logit_bias")
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRING_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    max_n: int
    max_logprobs: int
    max_num_stop_strings: int
    max_stop_string_len: int
    max_num_stop_token_ids: int
    max_num_logit_bias: int
    def __init__(self, max_n: _Optional[int] = ..., max_logprobs: _Optional[int] = ..., max_num_stop_strings: _Optional[int] = ..., max_stop_string_len: _Optional[int] = ..., max_num_stop_token_ids: _Optional[int] = ..., max_num_logit_bias: _Optional[int] = ...) -> None: ...
