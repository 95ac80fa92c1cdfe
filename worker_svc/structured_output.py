"""Structured outputs on the worker: grammars compiled off the step loop, one matcher per
request, token bitmasks for the sampler.

The worker sees every sampled token first, so it holds each constrained request's grammar
matcher (xgrammar): a token is fed to it when its id reaches the host, and before a step
samples, every constrained row's matcher fills that row's bitmask of allowed tokens. A
request rebuilt from scratch (after a preemption, or on another worker after a migration)
arrives with its generated tokens, which are replayed into a fresh matcher.

Grammars compile on a background thread as soon as a request arrives, once per distinct
spec (an LRU of compiled grammars bounded in bytes), while its prompt is computed; only the
step that samples its first token waits, and only if the compile is still running then.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams
from worker_svc.staging import HostToDevice

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (their token-mask caches dominate: ~0.1-10 MiB each).
DEFAULT_CACHE_BYTES = 512 << 20
# Rows filled per step before the fill is spread over xgrammar's threads.
_MIN_ROWS_FOR_THREADS = 8
# xgrammar's errors start with "[time] /path/file.cc:line: ".
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
# Bit k of an int32 word (bit 31 reads as a negative number).
_BITS = (np.uint32(1) << np.arange(32, dtype=np.uint32)).view(np.int32)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return -(-vocab_size // 32)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, off the caller's thread, once per spec.

    Args:
        load_tokenizer: returns the model's transformers tokenizer (or None); called on the
            compile thread, so loading it never delays the caller. None: structured outputs
            are refused.
        vocab_size: columns of the model's logits (bitmasks cover them all; ids past the
            tokenizer's vocabulary are never allowed).
        max_cache_bytes: compiled grammars kept for reuse, in bytes.
        max_cache_entries: specs remembered (failed compiles included).
        num_threads: compiles at once (a long one does not hold up the next).
    """

    def __init__(self, load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_cache_entries: int = 4096, num_threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self.max_cache_bytes = max_cache_bytes
        self.max_cache_entries = max_cache_entries
        self._executor = ThreadPoolExecutor(max_workers=num_threads,
                                            thread_name_prefix="grammar")
        self._lock = threading.Lock()
        # spec key -> compile (done or running), least recently used first.
        self._cache: collections.OrderedDict[tuple, Future] = collections.OrderedDict()
        self._cache_bytes = 0
        self._sizes: dict[tuple, int] = {}  # bytes of each finished compile in the cache
        self.num_compiles = 0
        self._compiler: Future | None = None
        if load_tokenizer is not None:
            self._compiler = self._executor.submit(self._build_compiler, load_tokenizer)

    @property
    def is_available(self) -> bool:
        return self._compiler is not None

    def _build_compiler(self, load_tokenizer: Callable[[], Any]) -> Any:
        import xgrammar as xgr

        start = time.perf_counter()
        tokenizer = load_tokenizer()
        if tokenizer is None:
            raise ValueError("structured_outputs need the model's tokenizer; the worker "
                             "found none in the model directory.")
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        # The compiled grammars are cached here (whole, with their matchers' masks).
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        logger.info("grammar compiler ready in %.2fs (%s vocabulary of %d)",
                    time.perf_counter() - start, info.vocab_type.name, info.vocab_size)
        return compiler

    def compile(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar of ``params`` (a Future; done at once when cached).

        A spec that does not compile resolves to a ValueError naming the field.
        """
        key = params.cache_key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            if self._compiler is None:
                future = Future()
                future.set_exception(ValueError(
                    "structured_outputs need the model's tokenizer; this worker has none "
                    "(a random-weight model, or no tokenizer files in the model directory)."))
                return future
            future = self._executor.submit(self._compile, params)
            self._cache[key] = future
        return future

    def _compile(self, params: StructuredOutputsParams) -> Any:
        assert self._compiler is not None
        size = 0
        try:
            compiler = self._compiler.result()
            start = time.perf_counter()
            compiled = _compile_spec(compiler, params)
            size = compiled.memory_size_bytes
            with self._lock:
                self.num_compiles += 1
            logger.debug("compiled a %s grammar in %.1f ms", params.kind,
                         1000 * (time.perf_counter() - start))
            return compiled
        except RuntimeError as exc:  # xgrammar's parse errors
            message = _CPP_PREFIX.sub("", str(exc).strip())
            raise ValueError(f"structured_outputs.{params.kind} does not compile: "
                             f"{message}") from None
        finally:
            self._account(params.cache_key, size)

    def _account(self, key: tuple, size: int) -> None:
        """Count a finished compile (failed ones too) and evict beyond the budgets. Runs on
        the compile thread before the Future resolves, so whoever sees it done sees the cache
        already trimmed."""
        with self._lock:
            if key not in self._cache:
                return
            self._sizes[key] = size
            self._cache_bytes += size
            # Evict the least recently used finished compiles (this one included).
            while ((self._cache_bytes > self.max_cache_bytes
                    or len(self._cache) > self.max_cache_entries) and len(self._cache) > 1):
                old_key = next(iter(self._cache))
                if old_key not in self._sizes:
                    break  # still compiling
                del self._cache[old_key]
                self._cache_bytes -= self._sizes.pop(old_key, 0)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _compile_spec(compiler: Any, params: StructuredOutputsParams) -> Any:
    kind = params.kind
    any_whitespace = not params.disable_any_whitespace
    if kind == "json":
        return compiler.compile_json_schema(params.spec, any_whitespace=any_whitespace)
    if kind == "json_object":
        # An object, as OpenAI's json_object promises (xgrammar's builtin grammar takes
        # any JSON value).
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
    if kind == "regex":
        return compiler.compile_regex(params.regex)
    if kind == "choice":
        # One literal per choice; EBNF string literals take JSON's escapes.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice or [])
        return compiler.compile_grammar(f"root ::= {alternatives}")
    return compiler.compile_grammar(params.grammar)


class RequestGrammar:
    """One request's grammar matcher, fed every token the request samples.

    Args:
        compiled: the grammar's compile (``GrammarCompiler.compile``).
        stop_token_ids: the tokens that may end the completion once the grammar is matched
            (EOS and the request's stop_token_ids).
        token_ids: tokens generated before (a rebuilt request), replayed into the matcher.
    """

    def __init__(self, compiled: Future, stop_token_ids: list[int],
                 token_ids: list[int] | None = None) -> None:
        self._compiled = compiled
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))
        # Accepted before the matcher existed (replayed when it is built).
        self._backlog = list(token_ids or [])
        self._matcher: Any = None
        self.num_accepted = 0
        # Set once the grammar rejected a token (or a replayed one): the request is refused.
        self.failure: str | None = None

    @property
    def is_ready(self) -> bool:
        """True once the compile has finished (successfully or not)."""
        return self._compiled.done()

    def error(self) -> str | None:
        """Why the grammar is unusable for this request (waits for the compile and builds
        the matcher); None while it is fine."""
        exc = self._compiled.exception()
        if exc is not None:
            return str(exc)
        if self._matcher is None:
            self._build()
        return self.failure

    def _build(self) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(self._compiled.result(),
                                           override_stop_tokens=self.stop_token_ids or None)
        backlog, self._backlog = self._backlog, []
        for position, token_id in enumerate(backlog):
            if self.accept(token_id) is not None:
                self.failure = f"replaying generated token {position}: {self.failure}"
                return

    @property
    def matcher(self) -> Any:
        return self._matcher

    @property
    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()

    def accept(self, token_id: int) -> str | None:
        """Advance by one sampled token; the reason, once, if the grammar does not allow it
        (the request is then refused; later tokens are ignored)."""
        if self._matcher is None:
            self._backlog.append(token_id)
            return None
        if self.failure is not None or self._matcher.is_terminated():
            return None  # past a stop token (ignore_eos): only stop tokens are allowed now
        if not self._matcher.accept_token(token_id):
            self.failure = (f"the grammar does not allow token {token_id} after "
                            f"{self.num_accepted} tokens (is min_tokens past its end?)")
            return self.failure
        self.num_accepted += 1
        return None


class BitmaskFiller:
    """Fills the token bitmasks of a step's constrained rows on the host.

    Args:
        vocab_size: columns of the logits.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self._host = np.zeros((0, self.width), dtype=np.int32)
        self._batch_matcher: Any = None

    def fill(self, grammars: list[RequestGrammar]) -> np.ndarray:
        """``[len(grammars), width]`` int32 bitmasks (a view reused by the next call)."""
        num_rows = len(grammars)
        if self._host.shape[0] < num_rows:
            self._host = np.zeros((max(num_rows, 2 * self._host.shape[0]), self.width),
                                  dtype=np.int32)
        host = self._host[:num_rows]
        live = [g for g in grammars if not g.is_terminated]
        live_rows = [i for i, g in enumerate(grammars) if not g.is_terminated]
        if len(live) >= _MIN_ROWS_FOR_THREADS:
            self._batch().batch_fill_next_token_bitmask([g.matcher for g in live], host,
                                                        live_rows)
        else:
            for row, grammar in zip(live_rows, live, strict=True):
                grammar.matcher.fill_next_token_bitmask(host, row)
        for row, grammar in enumerate(grammars):
            if grammar.is_terminated:
                # Matched and stopped (a stop token was ignored): only stop tokens follow.
                host[row] = 0
                for token_id in grammar.stop_token_ids:
                    host[row, token_id // 32] |= _BITS[token_id % 32]
        return host

    def _batch(self) -> Any:
        if self._batch_matcher is None:
            import xgrammar as xgr

            self._batch_matcher = xgr.BatchGrammarMatcher()
        return self._batch_matcher


class StructuredOutputManager:
    """The runner's structured outputs: compiles, per-request matchers, each step's masks.

    Args:
        load_tokenizer: as for ``GrammarCompiler``.
        vocab_size: columns of the logits.
        device: where the sampler's logits live.
    """

    def __init__(self, load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                 device: torch.device) -> None:
        self.compiler = GrammarCompiler(load_tokenizer, vocab_size)
        self.filler = BitmaskFiller(vocab_size)
        self.staging = HostToDevice(device)
        # Steps that waited for a compile, and how long in all (a new spec whose compile
        # outlasted its request's prompt).
        self.num_compile_waits = 0
        self.compile_wait_seconds = 0.0
        # Steps with masked rows, those rows, and the host time filling and sending masks.
        self.num_masked_steps = 0
        self.num_masked_rows = 0
        self.mask_seconds = 0.0

    def new_request(self, params: SamplingParams, eos_token_id: int | None,
                    output_token_ids: list[int]) -> RequestGrammar:
        """Start (or reuse) the compile of a request's grammar; its generated tokens so far
        are replayed once the matcher is built."""
        assert params.structured_outputs is not None
        stop_ids = ([] if eos_token_id is None else [eos_token_id]) + list(
            params.stop_token_ids or [])
        return RequestGrammar(self.compiler.compile(params.structured_outputs), stop_ids,
                              output_token_ids)

    def check(self, params: StructuredOutputsParams) -> None:
        """Compile ``params`` now (cached for the request that follows); ValueError naming
        the field if it does not compile or this worker has no tokenizer."""
        exc = self.compiler.compile(params).exception()
        if exc is not None:
            raise ValueError(str(exc))

    def prepare(self, grammars: list[RequestGrammar], rows: list[int]
                ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[int, str]]:
        """The bitmasks of one step's constrained sampling ``rows`` (their matchers up to
        date), waiting for compiles still running.

        Returns:
            ``(bitmask [R, W] int32, rows [R] int64)`` on the device (None if no row is
            masked) and the rows whose grammar failed (their reasons): left unmasked.
        """
        failures: dict[int, str] = {}
        if not all(g.is_ready for g in grammars):
            start = time.perf_counter()
            for grammar in grammars:
                grammar.error()
            self.num_compile_waits += 1
            self.compile_wait_seconds += time.perf_counter() - start
        masked, masked_rows = [], []
        for grammar, row in zip(grammars, rows, strict=True):
            error = grammar.error()
            if error is not None:
                failures[row] = error
            else:
                masked.append(grammar)
                masked_rows.append(row)
        if not masked:
            return None, None, failures
        start = time.perf_counter()
        host = self.filler.fill(masked)
        dev = self.staging.send({"bitmask": host,
                                 "rows": np.asarray(masked_rows, dtype=np.int64)})
        self.mask_seconds += time.perf_counter() - start
        self.num_masked_steps += 1
        self.num_masked_rows += len(masked)
        return dev["bitmask"], dev["rows"], failures

    def close(self) -> None:
        self.compiler.close()
