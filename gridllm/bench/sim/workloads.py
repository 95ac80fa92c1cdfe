"""Shared-prefix traffic for the cluster simulator, scaled with the fleet.

- ``fewshot``: requests start with one of ``prefixes_per_worker * workers`` long templates
  (few-shot prompts, tenants' system prompts) then a unique suffix; a fraction are unique
  prompts; Poisson arrivals at ``rate_per_worker * workers`` per second.
- ``chat``: ``sessions_per_worker * workers`` conversations of several turns; each turn's
  prompt is the session's whole history (a system prompt from a small shared pool, every
  earlier user turn and answer) plus a new user message, sent a think time after the
  previous answer ended. Sessions start as a Poisson process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gridllm.bench.sim.cluster import VOCAB_SIZE, SimRequest, Simulation

WORKLOADS = ("fewshot", "chat")


@dataclass
class WorkloadConfig:
    # fewshot
    requests_per_worker: int = 24
    prefixes_per_worker: float = 2.0
    prefix_len: int = 1024
    suffix_len: int = 64
    shared_fraction: float = 0.8
    rate_per_worker: float = 2.0
    # chat
    sessions_per_worker: int = 4
    turns_per_session: int = 6
    num_system_prompts: int = 8
    system_len: int = 512
    user_len_range: tuple[int, int] = (32, 256)
    think_s: float = 4.0
    session_rate_per_worker: float = 1.0
    # both
    output_len_range: tuple[int, int] = (32, 256)
    seed: int = 0


def _tokens(rng: random.Random, num: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(num)]


def add_fewshot(sim: Simulation, config: WorkloadConfig) -> None:
    rng = random.Random(config.seed)
    num_workers = len(sim.workers)
    prefixes = [_tokens(rng, config.prefix_len)
                for _ in range(max(1, round(config.prefixes_per_worker * num_workers)))]
    rate = config.rate_per_worker * num_workers
    now = 0.0
    for i in range(config.requests_per_worker * num_workers):
        now += rng.expovariate(rate)
        if rng.random() < config.shared_fraction:
            prompt = rng.choice(prefixes) + _tokens(rng, config.suffix_len)
        else:
            prompt = _tokens(rng, config.prefix_len + config.suffix_len)
        sim.submit(SimRequest(f"f{i}", now, prompt, rng.randint(*config.output_len_range)))


def add_chat(sim: Simulation, config: WorkloadConfig) -> None:
    rng = random.Random(config.seed)
    num_workers = len(sim.workers)
    systems = [_tokens(rng, config.system_len) for _ in range(config.num_system_prompts)]
    rate = config.session_rate_per_worker * num_workers
    start = 0.0
    for s in range(config.sessions_per_worker * num_workers):
        start += rng.expovariate(rate)
        _Session(sim, config, random.Random(rng.random()), f"c{s}",
                 rng.choice(systems)).send(start)


class _Session:
    def __init__(self, sim: Simulation, config: WorkloadConfig, rng: random.Random,
                 name: str, system: list[int]):
        self.sim, self.config, self.rng, self.name = sim, config, rng, name
        self.history = list(system)
        self.turn = 0

    def send(self, at_s: float) -> None:
        self.history += _tokens(self.rng, self.rng.randint(*self.config.user_len_range))
        self.sim.submit(SimRequest(f"{self.name}.{self.turn}", at_s, list(self.history),
                                   self.rng.randint(*self.config.output_len_range),
                                   on_finish=self.answered))

    def answered(self, output_token_ids: list[int], now_s: float) -> None:
        self.history += output_token_ids
        self.turn += 1
        if self.turn < self.config.turns_per_session:
            self.send(now_s + self.rng.expovariate(1.0 / self.config.think_s))


def add_workload(sim: Simulation, name: str, config: WorkloadConfig) -> None:
    if name == "fewshot":
        add_fewshot(sim, config)
    elif name == "chat":
        add_chat(sim, config)
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}.")
