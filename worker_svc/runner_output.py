"""A step's output whose device results reach the host in the background."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gridllm.common.contract import ModelRunnerOutput


class AsyncRunnerOutput:
    """What ``ModelRunner.execute_model_async`` returns once a step is queued on the device.

    The sampled ids (and logprobs) are copied to pinned host memory behind the step's
    kernels; ``get_output`` waits for that copy only, so the caller can queue the next
    step first (the device feeds it the sampled ids itself).

    Args:
        output: the parts known on the host already (failed requests, ...).
        finalize: fills ``output`` from the host copies and tells the runner the ids;
            None if ``output`` is complete.
        event: recorded after the copies (None: nothing to wait for, e.g. on the CPU).
    """

    def __init__(self, output: ModelRunnerOutput,
                 finalize: Callable[[ModelRunnerOutput], None] | None = None,
                 event: torch.cuda.Event | None = None) -> None:
        self._output = output
        self._finalize = finalize
        self._event = event

    @property
    def is_read(self) -> bool:
        """True once ``get_output`` has run."""
        return self._finalize is None

    def is_ready(self) -> bool:
        """True if ``get_output`` would not wait for the device."""
        return self._finalize is None or self._event is None or self._event.query()

    def wait(self) -> None:
        """Block until the host copies have landed (any thread; touches no runner state)."""
        if self._finalize is not None and self._event is not None:
            self._event.synchronize()

    def get_output(self) -> ModelRunnerOutput:
        """The step's ``ModelRunnerOutput`` (waits for the copies; call it from the
        runner's thread: it updates the runner's per-request state once)."""
        finalize, self._finalize = self._finalize, None
        if finalize is not None:
            if self._event is not None:
                self._event.synchronize()
            finalize(self._output)
        return self._output
