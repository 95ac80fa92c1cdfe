"""Which decode graphs the runner captures (tests/gridllm/test_gpu.py captures them)."""

import pytest
import torch

from kernels.paged_decode_attention import pick_num_splits
from worker_svc.cuda_graph import batch_size_ladder, context_classes

CPU = torch.device("cpu")


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_ladder(32)[-3:] == [16, 24, 32]


@pytest.mark.parametrize("one_warp", [False, True])
def test_context_classes_cover_every_split_count_the_kernel_picks(one_warp):
    """For the tl.dot kernel's split counts and for the Gluon kernel's (``one_warp``)."""
    for size in (1, 2, 3, 8, 64):
        for num_kv_heads, max_seq_len in ((1, 4096), (2, 3000), (8, 300), (8, 40000)):
            classes = context_classes(size, num_kv_heads, max_seq_len, CPU, one_warp)
            assert 1 in classes
            for context in range(1, max_seq_len + 1, 7):
                num_splits = pick_num_splits(size, num_kv_heads, context, CPU, one_warp)
                # The class's capture context picks the same count and is no longer.
                assert num_splits in classes and classes[num_splits] <= context
                assert pick_num_splits(size, num_kv_heads, classes[num_splits],
                                       CPU, one_warp) == num_splits
    # A short context on a big GPU-sized grid: one split, so no reduce pass.
    assert context_classes(1, 1, 31, CPU) == {1: 1}
