"""A model of the Gluon prefill kernel's barrier protocol (``kernels/gluon_prefill_attention.py``,
persistent launch: a program walking several items), run under random interleavings of its
three partitions. It is not the kernel: it replays, by hand, the order of the partitions'
mbarrier waits and arrivals and the phase arithmetic the kernel uses (ring position
``g = t + j``, stage ``g % STAGES``, turn section ``g + done + 1``, the query tile's
parity ``done & 1``), so a change to that protocol can be reasoned about without a GPU.
It checks that no interleaving deadlocks and that every product reads the tile it should
(no stage or query tile is overwritten before both consumers release it). A program of
the served launch is the one-item case."""

from __future__ import annotations

import random

import pytest


class _Barrier:
    """An mbarrier: a phase completes after ``count`` arrivals; a wait on parity ``p``
    passes unless the phase in progress has parity ``p`` (a fresh barrier counts as having
    completed the phase before phase 0)."""

    def __init__(self, count: int):
        self.count = self.pending = count
        self.phase = 0

    def arrive(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count

    def passes(self, parity: int) -> bool:
        return parity != self.phase & 1


def _run(items: list[int], stages: int, seed: int, q_releases: int = 2) -> None:
    """Items of ``items[i]`` key tiles (0: an empty slot, skipped by every partition);
    ``q_releases``: the arrivals that free the query tile (the kernel's: one a consumer)."""
    k_full, v_full = [_Barrier(1) for _ in range(stages)], [_Barrier(1) for _ in range(stages)]
    k_empty, v_empty = [_Barrier(2) for _ in range(stages)], [_Barrier(2) for _ in range(stages)]
    q_bar, q_empty, turn = _Barrier(1), _Barrier(q_releases), [_Barrier(1), _Barrier(1)]
    k_tile, v_tile, q_item = [None] * stages, [None] * stages, [None]

    def load():
        t = done = 0
        for item, tiles in enumerate(items):
            if not tiles:
                continue
            for j in range(tiles):
                g = t + j
                stage, phase = g % stages, (g // stages & 1) ^ 1
                yield k_empty[stage], phase
                k_tile[stage] = g
                k_full[stage].arrive()
                if j == 0:
                    yield q_empty, (done & 1) ^ 1
                    q_item[0] = item
                    q_bar.arrive()
                yield v_empty[stage], phase
                v_tile[stage] = g
                v_full[stage].arrive()
            t, done = t + tiles, done + 1

    def consume(wg: int):
        t = done = 0
        for item, tiles in enumerate(items):
            if not tiles:
                continue
            yield q_bar, done & 1
            yield k_full[t % stages], t // stages & 1
            yield turn[wg], (t + done + 1 + wg) & 1
            turn[1 - wg].arrive()
            yield None  # the first scores in flight
            assert q_item[0] == item and k_tile[t % stages] == t
            k_empty[t % stages].arrive()
            for j in range(tiles - 1):
                g = t + j
                stage, nxt = g % stages, (g + 1) % stages
                yield k_full[nxt], (g + 1) // stages & 1
                yield v_full[stage], g // stages & 1
                yield turn[wg], (g + done + 1 + 1 + wg) & 1
                turn[1 - wg].arrive()
                yield None  # S_{j+1} and P_j V_j in flight
                assert q_item[0] == item and k_tile[nxt] == g + 1
                k_empty[nxt].arrive()
                yield None  # the softmax, under P_j V_j
                assert v_tile[stage] == g
                v_empty[stage].arrive()
            q_empty.arrive()  # every product that reads the query tile is retired
            g = t + tiles - 1
            yield v_full[g % stages], g // stages & 1
            yield turn[wg], (g + done + 1 + 1 + wg) & 1
            turn[1 - wg].arrive()
            yield None
            assert v_tile[g % stages] == g
            v_empty[g % stages].arrive()
            t, done = t + tiles, done + 1

    rng = random.Random(seed)
    parts = [load(), consume(0), consume(1)]
    waiting = [next(p, "done") for p in parts]
    while True:
        ready = [i for i, w in enumerate(waiting)
                 if w != "done" and (w is None or w[0].passes(w[1]))]
        if not ready:
            assert all(w == "done" for w in waiting), f"deadlock: {items}, {stages} stages"
            return
        i = rng.choice(ready)
        waiting[i] = next(parts[i], "done")


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_the_persistent_protocol_neither_deadlocks_nor_overwrites_a_tile_in_use(stages):
    rng = random.Random(stages)
    for seed in range(300):
        items = [rng.choice([0, 0, 1, 1, 2, 3, 5, 8]) for _ in range(rng.randint(1, 7))]
        _run(items, stages, seed)


def test_the_model_catches_a_query_tile_released_by_one_consumer():
    """The model fails where the protocol is wrong: a query tile freed by one consumer's
    arrival lets the load warp overwrite it under the other, or the phases fall out of
    step."""
    with pytest.raises(AssertionError):
        for seed in range(50):
            _run([3, 2, 5, 1], 2, seed, q_releases=1)
