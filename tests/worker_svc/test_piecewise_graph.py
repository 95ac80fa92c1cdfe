"""Which token counts the runner captures graphs cut at attention for (the captures and
replays themselves: tests/gridllm/test_gpu.py)."""

import pytest

from worker_svc.piecewise_graph import token_ladder


def test_token_ladder():
    assert token_ladder(15) == []
    assert token_ladder(16) == [16]
    assert token_ladder(40) == [16, 32]
    assert token_ladder(200) == list(range(16, 201, 16))
    assert token_ladder(600)[-4:] == [480, 512, 576, 592]
    assert token_ladder(2048)[-3:] == [1792, 1920, 2048]
    assert len(token_ladder(2048)) == 40


@pytest.mark.parametrize("max_tokens", [16, 100, 512, 777, 1024, 2048, 3000, 8192])
def test_every_step_pads_to_a_size_at_most_an_eighth_larger_past_128(max_tokens):
    sizes = token_ladder(max_tokens)
    assert sizes == sorted(set(sizes)) and all(s % 16 == 0 for s in sizes)
    assert sizes[-1] == max_tokens // 16 * 16
    for tokens in range(1, sizes[-1] + 1):
        size = next(s for s in sizes if s >= tokens)
        assert size - tokens < 16 or (size - tokens) * 8 <= tokens


@pytest.mark.parametrize("name, value", [("GRIDLLM_PIECEWISE_GRAPHS", "yes"),
                                         ("GRIDLLM_PIECEWISE_GRAPHS", "2"),
                                         ("GRIDLLM_PIECEWISE_MAX_TOKENS", "-5"),
                                         ("GRIDLLM_PIECEWISE_MAX_TOKENS", "2k")])
def test_a_bad_switch_is_refused_by_name(monkeypatch, name, value):
    import importlib

    from worker_svc import piecewise_graph

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        importlib.reload(piecewise_graph)
    monkeypatch.undo()  # the environment as it was, and the module read from it again
    importlib.reload(piecewise_graph)
