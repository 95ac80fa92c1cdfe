"""The pipelined step loop of one scheduler core, without I/O.

With two steps in flight, step N+1 is scheduled (the tokens step N samples count as
placeholders, ``Request.num_output_placeholders``) and handed to the runner before step N's
output is applied: the runner works on N+1, feeding it N's samples itself, while the host
applies N. The in-process engine (``gridllm.engine``) and the scheduler service
(``WorkerLink``) drive this one loop; they differ only in how a step reaches the runner
and how its output comes back::

    while True:
        step = pipeline.schedule_next()
        if step is not None:
            step.handle = send(step.output)          # to the runner, without waiting
        elif pipeline.num_in_flight:
            pipeline.complete(receive(pipeline.oldest().handle))
        else:
            wait_for_requests()
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from gridllm.common.contract import ModelRunnerOutput, RequestUpdate, SchedulerOutput
from scheduler_svc.scheduler import Scheduler


@dataclass
class InFlightStep:
    """A step handed to the runner whose output is not applied yet."""

    output: SchedulerOutput
    # What the driver needs to collect the answer (a runner's pending output, a step id).
    handle: Any = None


class StepPipeline:
    """Args:
        scheduler: the core whose steps this loop runs.
        max_steps_in_flight: 2 pipelines the steps (a request that finishes at step N
            costs one wasted slot at N+1); 1 applies each step's output before the next.
    """

    def __init__(self, scheduler: Scheduler, max_steps_in_flight: int = 2) -> None:
        if max_steps_in_flight not in (1, 2):
            raise ValueError(f"max_steps_in_flight must be 1 or 2, got {max_steps_in_flight}.")
        self.scheduler = scheduler
        self.max_steps_in_flight = max_steps_in_flight
        self._in_flight: collections.deque[InFlightStep] = collections.deque()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def schedule_next(self) -> InFlightStep | None:
        """Schedule the next step if the pipeline has room.

        Returns:
            The step to hand to the runner (set its ``handle``), or None when the pipeline
            is full or there is nothing to run (no tokens and nothing to drop).
        """
        if len(self._in_flight) >= self.max_steps_in_flight:
            return None
        output = self.scheduler.schedule()
        if output.is_empty and not output.finished_req_ids:
            return None
        step = InFlightStep(output)
        self._in_flight.append(step)
        return step

    def oldest(self) -> InFlightStep:
        """The step whose output is applied next."""
        return self._in_flight[0]

    def complete(self, runner_output: ModelRunnerOutput
                 ) -> tuple[SchedulerOutput, list[RequestUpdate]]:
        """Apply the oldest step's output.

        Returns:
            That step's SchedulerOutput and the request updates it produced.
        """
        step = self._in_flight.popleft()
        return step.output, self.scheduler.update_from_output(step.output, runner_output)

    def discard(self, step: InFlightStep) -> None:
        """Forget a step that never reached the runner (its send failed)."""
        self._in_flight.remove(step)

    def clear(self) -> list[InFlightStep]:
        """Forget every step in flight (the runner is gone); returns them, oldest first."""
        steps = list(self._in_flight)
        self._in_flight.clear()
        return steps
