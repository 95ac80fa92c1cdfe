"""Structured outputs on the worker: grammars compiled off the step loop, one matcher per
request, token bitmasks for the sampler.

The worker sees every sampled token first, so it holds each constrained request's grammar
matcher (xgrammar): a token is fed to it when its id reaches the host, and before a step
samples, every constrained row's matcher fills that row's bitmask of allowed tokens. Both
happen on a background thread as soon as the step's ids land, so the next step usually
finds its masks ready (worker_svc/mask_pipeline.py). A request rebuilt from scratch (after
a preemption, or on another worker after a migration) arrives with its generated tokens,
which are replayed into a fresh matcher.

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

import torch

from gridllm.common.sampling_params import SamplingParams
from gridllm.common.structured_outputs import StructuredOutputsParams
from worker_svc.grammar_matcher import BitmaskFiller, RequestGrammar, bitmask_width
from worker_svc.mask_pipeline import MaskPipeline, MaskTimings, StepAdvance

logger = logging.getLogger(__name__)

# Compiled grammars kept for reuse (their token-mask caches dominate: ~0.1-10 MiB each).
DEFAULT_CACHE_BYTES = 512 << 20
# xgrammar's errors start with "[time] /path/file.cc:line: ".
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")

__all__ = ["BitmaskFiller", "GrammarCompiler", "MaskTimings", "RequestGrammar", "StepAdvance",
           "StructuredOutputManager", "bitmask_width"]


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


class StructuredOutputManager:
    """The runner's structured outputs: compiles, per-request matchers, each step's masks.

    Args:
        load_tokenizer: as for ``GrammarCompiler``.
        vocab_size: columns of the logits.
        device: where the sampler's logits live.
        is_overlapped: feed each step's tokens to the matchers and fill the next masks on a
            background thread as soon as the ids land (``MaskPipeline``); False does both on
            the step loop when they are needed (same masks, same outputs).
    """

    def __init__(self, load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                 device: torch.device, is_overlapped: bool = True) -> None:
        self.compiler = GrammarCompiler(load_tokenizer, vocab_size)
        self.filler = BitmaskFiller(vocab_size)
        self.pipeline = MaskPipeline(self.filler, device, is_overlapped)
        # Steps that waited for a compile, and how long in all (a new spec whose compile
        # outlasted its request's prompt).
        self.num_compile_waits = 0
        self.compile_wait_seconds = 0.0
        # Steps with masked rows, those rows, and the step loop's host time for their masks
        # (waiting for the background thread, filling what it did not, sending).
        self.num_masked_steps = 0
        self.num_masked_rows = 0
        self.mask_seconds = 0.0
        # The grammars and rows the last prepare masked (their tokens go to advance).
        self._masked: tuple[list[RequestGrammar], list[int]] = ([], [])

    def set_overlapped(self, is_overlapped: bool) -> None:
        """Switch between the background and the on-the-loop mask pipeline (between steps;
        the timings start over)."""
        self.pipeline.wait()
        self.pipeline.close()
        self.pipeline = MaskPipeline(self.filler, self.pipeline.buffers.device, is_overlapped)

    @property
    def timings(self) -> MaskTimings:
        """Where the host time of accepting tokens and filling masks went."""
        return self.pipeline.timings

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
        """The bitmasks of one step's constrained sampling ``rows``, after every token
        sampled before (waits for the background thread and for compiles still running).

        Returns:
            ``(bitmask [R, W] int32, rows [R] int64)`` on the device (None if no row is
            masked) and the rows whose grammar failed (their reasons): left unmasked.
        """
        start = time.perf_counter()
        # The matchers are the background thread's until its advances are done.
        self.pipeline.wait()
        self.mask_seconds += time.perf_counter() - start
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
        self._masked = (masked, masked_rows)
        if not masked:
            return None, None, failures
        start = time.perf_counter()
        bitmask, dev_rows = self.pipeline.masks(masked, masked_rows)
        self.mask_seconds += time.perf_counter() - start
        self.num_masked_steps += 1
        self.num_masked_rows += len(masked)
        return bitmask, dev_rows, failures

    def advance(self, token_ids: torch.Tensor, event: torch.cuda.Event | None
                ) -> StepAdvance | None:
        """Hand the step's sampled ids (host, landed once ``event`` has) to the grammars of
        the rows the last ``prepare`` masked; None if it masked none.
        ``pipeline.errors(advance)`` says which rows' tokens a grammar refused."""
        masked, rows = self._masked
        self._masked = ([], [])
        if not masked:
            return None
        return self.pipeline.advance(masked, rows, token_ids, event)

    def errors(self, advance: StepAdvance | None) -> dict[int, str]:
        """The rows of ``advance`` whose grammar refused its token, with the reasons."""
        return {} if advance is None else self.pipeline.errors(advance)

    def close(self) -> None:
        self.pipeline.close()
        self.compiler.close()
