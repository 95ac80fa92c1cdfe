import pytest
import torch

from kernels import torch_ref
from kernels.step_inputs import decode_graph_inputs, scatter_sampled
from tests.kernels.conftest import DEVICE, needs_gpu


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("num_pending", [0, 1, 5, 1500])  # 1500: two programs
def test_scatter_sampled_matches_torch(ids_dtype, num_pending):
    g = torch.Generator().manual_seed(num_pending)
    num_tokens = num_pending + 7
    ids = torch.randint(0, 50_000, (num_tokens,), generator=g, dtype=ids_dtype)
    sampled = torch.randint(0, 2 ** 31 - 1, (num_pending + 3,), generator=g)
    dst = torch.randperm(num_tokens, generator=g)[:num_pending]
    src = torch.randint(0, num_pending + 3, (num_pending,), generator=g, dtype=torch.int32)
    expected = ids.clone()
    torch_ref.scatter_sampled(expected, dst, src, sampled)
    out = ids.to(DEVICE)
    scatter_sampled(out, dst.to(DEVICE), src.to(DEVICE), sampled.to(DEVICE))
    assert torch.equal(out.cpu(), expected)


def test_scatter_sampled_rejects_bad_arguments():
    ids = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    index = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="src"):
        scatter_sampled(ids, index, index[:1], index)
    with pytest.raises(ValueError, match="sampled"):
        scatter_sampled(ids, index, index, index.float())
    with pytest.raises(ValueError, match="input_ids"):
        scatter_sampled(ids.view(2, 2), index, index, index)


def _graph_buffers(capacity: int, width: int) -> dict[str, torch.Tensor]:
    # Dtypes and fill values as worker_svc.cuda_graph.CudaGraphRunner allocates them,
    # made distinct so a missed write shows.
    return {"input_ids": torch.full((capacity,), 7, dtype=torch.long, device=DEVICE),
            "positions": torch.full((capacity,), 8, dtype=torch.int32, device=DEVICE),
            "slot_mapping": torch.full((capacity,), 9, dtype=torch.long, device=DEVICE),
            "seq_lens": torch.full((capacity,), 10, dtype=torch.int32, device=DEVICE),
            "block_tables": torch.full((capacity, width), 11, dtype=torch.int32,
                                       device=DEVICE)}


def _inputs(num_reqs: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Dtypes as worker_svc.input_batch stages them; the table a view of a wider one.
    wide = torch.randint(0, 10_000, (num_reqs, width + 5), generator=g, dtype=torch.int32)
    inputs = {"input_ids": torch.randint(0, 50_000, (num_reqs,), generator=g,
                                         dtype=torch.int32),
              "positions": torch.randint(0, 4096, (num_reqs,), generator=g, dtype=torch.int32),
              "slot_mapping": torch.randint(0, 2 ** 40, (num_reqs,), generator=g),
              "seq_lens": torch.randint(1, 4096, (num_reqs,), generator=g, dtype=torch.int32),
              "block_tables": wide[:, :width]}
    return {name: t.to(DEVICE) for name, t in inputs.items()}


def _expected(graph: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
              size: int) -> dict[str, torch.Tensor]:
    out = {name: t.clone() for name, t in graph.items()}
    torch_ref.decode_graph_inputs(inputs, out, size)
    return out


@pytest.mark.parametrize("num_reqs,size,width", [(1, 1, 3), (3, 4, 300), (5, 8, 16),
                                                 (2, 2, 513)])
def test_decode_graph_inputs_match_the_torch_copies(num_reqs, size, width):
    capacity, graph_width = 8, 520
    graph = _graph_buffers(capacity, graph_width)
    inputs = _inputs(num_reqs, width, seed=size * 1000 + width)
    expected = _expected(graph, inputs, size)
    decode_graph_inputs(inputs, graph, size)
    for name, t in graph.items():
        assert torch.equal(t.cpu(), expected[name].cpu()), name
    # The reference's layout, spelled out.
    assert torch.equal(graph["input_ids"][:num_reqs].cpu(), inputs["input_ids"].long().cpu())
    assert torch.equal(graph["block_tables"][:num_reqs, :width].cpu(),
                       inputs["block_tables"].cpu())
    assert (graph["slot_mapping"][num_reqs:size] == -1).all()
    assert (graph["seq_lens"][num_reqs:size] == 0).all()
    assert (graph["slot_mapping"][size:] == 9).all()  # past the replayed rows: untouched


def test_decode_graph_inputs_rejects_what_does_not_fit():
    graph = _graph_buffers(4, 16)
    inputs = _inputs(3, 8, seed=0)
    with pytest.raises(ValueError, match="size"):
        decode_graph_inputs(inputs, graph, 2)
    with pytest.raises(ValueError, match="size"):
        decode_graph_inputs(inputs, graph, 5)
    with pytest.raises(ValueError, match="block_tables"):
        decode_graph_inputs(_inputs(3, 17, seed=0), graph, 4)
    with pytest.raises(ValueError, match="positions"):
        decode_graph_inputs({**inputs, "positions": inputs["positions"][:2]}, graph, 4)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_graph_inputs({**inputs, "seq_lens": inputs["seq_lens"].float()}, graph, 4)
    with pytest.raises(ValueError, match="slot_mapping"):
        decode_graph_inputs(inputs, {**graph, "slot_mapping": graph["slot_mapping"][:3]}, 3)


@pytest.mark.gpu
@needs_gpu
def test_decode_graph_inputs_at_the_largest_graph():
    capacity, graph_width = 256, 8192
    graph = _graph_buffers(capacity, graph_width)
    inputs = _inputs(200, 2049, seed=1)
    expected = _expected(graph, inputs, 256)
    decode_graph_inputs(inputs, graph, 256)
    for name, t in graph.items():
        assert torch.equal(t, expected[name]), name


class _Replay:
    """A captured graph's stand-in: keeps what the static buffers held at replay."""

    def __init__(self, runner):
        self.runner, self.seen = runner, None

    def replay(self) -> None:
        self.seen = {name: t.clone() for name, t in self.runner._static.items()}


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("num_reqs", [1, 3])
def test_graph_runner_fills_its_buffers_with_the_batch(monkeypatch, num_reqs, kernel):
    """CudaGraphRunner.run, with the kernel (here in the interpreter) and with its torch
    copies: at replay the static buffers hold the batch, padding rows included."""
    import numpy as np

    from worker_svc import cuda_graph
    from worker_svc.input_batch import BatchInputs
    from worker_svc.layers import ops
    from worker_svc.layers.attention import AttentionMetadata

    inputs = _inputs(num_reqs, 16, seed=num_reqs)
    meta = AttentionMetadata(
        inputs["slot_mapping"], torch.arange(num_reqs + 1, dtype=torch.int32, device=DEVICE),
        inputs["seq_lens"], inputs["block_tables"], max_query_len=1, max_seq_len=64)
    batch = BatchInputs(input_ids=inputs["input_ids"], positions=inputs["positions"],
                        attn_metadata=meta, starts=np.zeros(num_reqs, dtype=np.int64),
                        num_tokens=np.ones(num_reqs, dtype=np.int64),
                        logits_indices=torch.arange(num_reqs, device=DEVICE),
                        is_sampling=np.ones(num_reqs, dtype=bool), sampling={})
    monkeypatch.setattr(ops, "uses_triton", lambda x: kernel)
    runner = cuda_graph.CudaGraphRunner(None, [], max_batch_size=8, max_blocks_per_seq=32,
                                        max_seq_len=64, device=DEVICE, num_kv_heads=2)
    for t in runner._static.values():
        t.fill_(5)  # stale values a missed write would leave
    graphs = {(s, n): _Replay(runner) for s in runner.sizes for n in range(1, 65)}
    runner.graphs = graphs
    runner.outputs = {key: torch.zeros(key[0], 4, device=DEVICE) for key in graphs}
    size = runner.graph_key(num_reqs, 64)[0]
    assert size > num_reqs or num_reqs == 1
    expected = _expected(runner._static, inputs, size)
    assert runner.run(batch).shape == (num_reqs, 4)
    (replayed,) = [g.seen for g in graphs.values() if g.seen is not None]
    for name, t in expected.items():
        assert torch.equal(replayed[name].cpu(), t.cpu()), name
