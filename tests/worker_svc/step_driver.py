"""A minimal stand-in for the scheduler: feeds hand-built SchedulerOutputs to a ModelRunner."""

from __future__ import annotations

from gridllm.common.contract import CachedRequestData, NewRequestData, SchedulerOutput
from gridllm.common.sampling_params import SamplingParams


def run_requests(runner, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 max_new_tokens: int, chunk_budget: int | None = None,
                 max_steps: int = 1000, resumed_outputs: list[list[int]] | None = None):
    """Generate ``max_new_tokens`` for every prompt, all in one running batch.

    Each step schedules every unfinished request's remaining known tokens, cut by the
    shared ``chunk_budget`` (chunked prefill); blocks come from a simple counter (in every
    KV group of the runner's model).
    ``resumed_outputs`` sends each request with tokens generated before (a resubmission);
    they count towards ``max_new_tokens`` but are not returned.

    Returns:
        ``(outputs, runner_outputs)``: per prompt the generated token ids, and every step's
        ``ModelRunnerOutput``.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    block_size = runner.block_size
    ids = [f"req-{i}" for i in range(len(prompts))]
    before = resumed_outputs or [[] for _ in prompts]
    tokens = {r: list(p) + list(b) for r, p, b in zip(ids, prompts, before, strict=True)}
    outputs = {r: [] for r in ids}
    num_before = {r: len(b) for r, b in zip(ids, before, strict=True)}
    computed = dict.fromkeys(ids, 0)
    blocks: dict[str, list[int]] = {}
    # A stand-in runner without KV groups has one.
    num_groups = runner.kv_groups.num_groups if hasattr(runner, "kv_groups") else 1
    next_block = 0
    finished: set[str] = set()
    to_drop: set[str] = set()
    steps = []
    for _ in range(max_steps):
        running = [r for r in ids if r not in finished]
        if not running:
            break
        out = SchedulerOutput(finished_req_ids=to_drop)
        to_drop = set()
        budget = chunk_budget
        for i, r in enumerate(ids):
            if r in finished:
                continue
            n = len(tokens[r]) - computed[r]
            if budget is not None:
                n = min(n, budget)
                budget -= n
            if n <= 0:
                continue
            needed = -(-(computed[r] + n) // block_size)
            num_new_blocks = needed - len(blocks.get(r, []))
            group_blocks = [list(range(next_block + g * num_new_blocks,
                                       next_block + (g + 1) * num_new_blocks))
                            for g in range(num_groups)]
            next_block += num_groups * num_new_blocks
            new_blocks = group_blocks[0]
            if r not in blocks:
                blocks[r] = new_blocks
                out.scheduled_new_reqs.append(NewRequestData(
                    req_id=r, prompt_token_ids=list(prompts[i]), sampling_params=params[i],
                    output_token_ids=list(before[i]), block_ids=list(new_blocks),
                    num_computed_tokens=computed[r], group_block_ids=group_blocks[1:]))
            else:
                blocks[r] += new_blocks
                out.scheduled_cached_reqs.append(CachedRequestData(
                    req_id=r, new_block_ids=new_blocks, num_computed_tokens=computed[r],
                    new_group_block_ids=group_blocks[1:]))
            out.num_scheduled_tokens[r] = n
            computed[r] += n
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        result = runner.execute_model(out)
        steps.append(result)
        for r, new_ids in result.sampled_token_ids.items():
            tokens[r] += new_ids
            outputs[r] += new_ids
            if num_before[r] + len(outputs[r]) >= max_new_tokens:
                finished.add(r)
                to_drop.add(r)
    return [outputs[r] for r in ids], steps
