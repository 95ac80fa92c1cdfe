"""The structured outputs' mask pipeline (a real tokenizer and real grammars): masks
filled on the background thread equal masks filled on the step loop and masks filled
from scratch, whatever the batch does between steps; tokens are read only once they
have landed; a refused token refuses only its row."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from gridllm.common.structured_outputs import StructuredOutputsParams
from gridllm.common.tokenizer import load_tokenizer
from tests.e2e.tiny_model import build_tiny_served_model
from worker_svc.grammar_matcher import BitmaskFiller, RequestGrammar
from worker_svc.mask_pipeline import MaskPipeline
from worker_svc.structured_output import GrammarCompiler

pytest.importorskip("xgrammar")

VOCAB = 320
EOS = 1
SCHEMA = {"type": "object", "properties": {
    "city": {"enum": ["Paris", "Rome"]}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["city", "tags"]}
TEXTS = ['{"city": "Rome", "tags": ["quick", "brown fox", "hello world"]}',
         '{"city": "Paris", "tags": ["café", "naïve"]}',
         '{"city": "Rome", "tags": []}']
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_served_model(tmp_path_factory.mktemp("tiny-masks")))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler(lambda: tokenizer, VOCAB)
    yield compiler
    compiler.close()


def _grammars(compiler, count: int) -> list[RequestGrammar]:
    spec = StructuredOutputsParams(json=SCHEMA)
    grammars = [RequestGrammar(compiler.compile(spec), [EOS]) for _ in range(count)]
    assert all(g.error() is None for g in grammars)
    return grammars


def _fresh_masks(grammars: list[RequestGrammar]) -> np.ndarray:
    return BitmaskFiller(VOCAB).fill(grammars).copy()


class _LateEvent:
    """Stands in for a CUDA event: the sampled ids land in ``token_ids`` only when the
    reader synchronizes (as the device's copy would, behind the step)."""

    def __init__(self, token_ids: torch.Tensor, values: list[int]) -> None:
        self.token_ids, self.values = token_ids, values
        self.num_syncs = 0
        self._lock = threading.Lock()

    def synchronize(self) -> None:
        with self._lock:
            if self.num_syncs == 0:
                self.token_ids.copy_(torch.tensor(self.values))
            self.num_syncs += 1


@pytest.mark.parametrize("num_threads", [1, 3])
def test_accept_many_equals_one_token_at_a_time(compiler, tokenizer, num_threads):
    """Serially and split over threads (rows in shares of 8: 24 rows, 3 threads)."""
    token_lists = [tokenizer.encode(t, add_special_tokens=False) + [EOS]
                   for t in TEXTS * 8]
    one, many = _grammars(compiler, len(token_lists)), _grammars(compiler, len(token_lists))
    for position in range(max(map(len, token_lists)) + 2):
        # Past its end a row's grammar is terminated (ignore_eos): EOS is ignored.
        ids = [ts[position] if position < len(ts) else EOS for ts in token_lists]
        assert [g.accept(t) for g, t in zip(one, ids, strict=True)] == \
            RequestGrammar.accept_many(many, ids, num_threads)
        assert [g.num_accepted for g in one] == [g.num_accepted for g in many]
        assert [g.is_terminated for g in many] == [g.matcher.is_terminated() for g in many]
        assert np.array_equal(_fresh_masks(one), _fresh_masks(many))
    assert all(g.is_terminated for g in many)
    # A refused token: the same reason, once, and later tokens ignored.
    one, many = _grammars(compiler, 2), _grammars(compiler, 2)
    bad = tokenizer.encode('{"town"', add_special_tokens=False)
    good = tokenizer.encode('{"city"', add_special_tokens=False)
    for position in range(min(len(bad), len(good))):
        ids = [good[position], bad[position]]
        assert [g.accept(t) for g, t in zip(one, ids, strict=True)] == \
            RequestGrammar.accept_many(many, ids)
    assert many[0].failure is None and many[1].failure is not None
    assert many[1].failure == one[1].failure
    assert RequestGrammar.accept_many(many, good[:1] * 2)[1] is None


def _until_done(future, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not future.done():
        assert time.monotonic() < deadline, "the grammar thread did not finish"
        time.sleep(0.001)


@pytest.mark.parametrize("mode", ["thread", "race", "loop"])
def test_masks_equal_fresh_fills_as_the_batch_changes(compiler, tokenizer, mode):
    """Each step samples rows of a batch that changes: a row leaves, rows swap places, a
    new grammar joins, one is advanced behind the pipeline's back. Every mask sent equals
    one filled from scratch after every accepted token, whether the grammar thread did the
    work ("thread": the loop asks once it is done), the loop took over what the thread had
    not started ("race": the loop asks at once) or there is no thread ("loop")."""
    pipeline = MaskPipeline(BitmaskFiller(VOCAB), CPU, is_overlapped=mode != "loop")
    try:
        token_lists = [tokenizer.encode(TEXTS[k % 3], add_special_tokens=False)
                       for k in range(5)]
        grammars = _grammars(compiler, 5)
        positions = [0] * 5  # tokens each request has sampled
        batch = list(range(4))  # request k sits at row batch.index(k)
        for step in range(12):
            if step == 3:
                batch.remove(1)          # finished
            if step == 5:
                batch[0], batch[1] = batch[1], batch[0]  # rows reordered
            if step == 7:
                batch.append(4)          # a new request (nothing prefilled for it)
            if step == 9:
                pipeline.wait()
                # Moved outside the pipeline: its prefilled mask is stale.
                assert grammars[2].accept(token_lists[2][positions[2]]) is None
                positions[2] += 1
            active = [grammars[k] for k in batch]
            rows = list(range(len(batch)))
            bitmask, dev_rows = pipeline.masks(active, rows)
            assert dev_rows.tolist() == rows
            assert np.array_equal(bitmask.numpy(), _fresh_masks(active)), f"step {step}"
            ids = torch.zeros(len(batch), dtype=torch.int64)
            values = [token_lists[k][positions[k]] for k in batch]
            for k in batch:
                positions[k] += 1
            event = _LateEvent(ids, values)
            advance = pipeline.advance(active, rows, ids, event)
            if mode == "thread":
                _until_done(advance.prefilled)
            assert pipeline.errors(advance) == {}
            assert event.num_syncs == 1
        pipeline.wait()
        timings = pipeline.timings
        if mode == "thread":
            # Most rows came prefilled; the new and the moved grammar were filled here.
            assert timings.num_prefilled_rows > timings.num_loop_filled_rows > 0
            assert timings.accept_on_loop == 0 and timings.accept_off_loop > 0
        elif mode == "loop":
            assert timings.num_prefilled_rows == 0 and timings.accept_off_loop == 0
    finally:
        pipeline.close()


@pytest.mark.parametrize("is_overlapped", [True, False])
def test_a_refused_token_refuses_only_its_row(compiler, tokenizer, is_overlapped):
    pipeline = MaskPipeline(BitmaskFiller(VOCAB), CPU, is_overlapped)
    try:
        grammars = _grammars(compiler, 3)
        good = tokenizer.encode('{"city"', add_special_tokens=False)
        bad = tokenizer.encode('{"town"', add_special_tokens=False)
        rows = [5, 2, 7]
        refused = None
        for position in range(len(good)):
            live = [g for g in grammars if g.failure is None]
            live_rows = [r for g, r in zip(grammars, rows, strict=True) if g.failure is None]
            pipeline.masks(live, live_rows)
            ids = torch.zeros(8, dtype=torch.int64)
            ids[5], ids[7] = good[position], good[position]
            ids[2] = bad[position] if refused is None else good[position]
            errors = pipeline.errors(pipeline.advance(live, live_rows, ids, None))
            if errors:
                assert list(errors) == [2] and refused is None
                refused = position
        assert refused is not None and grammars[1].failure is not None
        assert grammars[0].failure is None and grammars[2].failure is None
        bitmask, _ = pipeline.masks([grammars[0], grammars[2]], [5, 7])
        assert np.array_equal(bitmask.numpy(), _fresh_masks([grammars[0], grammars[2]]))
    finally:
        pipeline.close()


def test_a_failure_on_the_background_thread_reaches_the_loop(compiler):
    pipeline = MaskPipeline(BitmaskFiller(VOCAB), CPU, is_overlapped=True)
    try:
        grammars = _grammars(compiler, 2)
        pipeline.masks(grammars, [0, 1])

        class BrokenEvent:
            def synchronize(self):
                raise RuntimeError("device lost")

        advance = pipeline.advance(grammars, [0, 1], torch.zeros(2, dtype=torch.int64),
                                   BrokenEvent())
        with pytest.raises(RuntimeError, match="device lost"):
            pipeline.errors(advance)
        with pytest.raises(RuntimeError, match="device lost"):
            pipeline.masks(grammars, [0, 1])
    finally:
        pipeline.close()
