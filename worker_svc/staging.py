"""One host-to-device copy per step for all of its small arrays."""

from __future__ import annotations

import numpy as np
import torch

# Every array starts at a multiple of this many bytes, so any dtype can view it.
_ALIGN = 16


class HostToDevice:
    """Packs a step's host arrays into one pinned buffer and sends it in one async copy.

    Buffers rotate, and each is reused only after its copy has run, so the host may pack
    step N+1 while step N's copy is still queued.

    Args:
        device: where the arrays go; on the CPU they are wrapped without a copy.
        num_buffers: pinned buffers in rotation.
    """

    def __init__(self, device: torch.device, num_buffers: int = 3) -> None:
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0

    def send(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Returns:
            The arrays as tensors on the device, by name (same dtypes and shapes).
        """
        if self.device.type == "cpu":
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        offsets, total = {}, 0
        for name, a in arrays.items():
            offsets[name] = total
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        index = self._next
        self._next = (index + 1) % len(self._buffers)
        buffer, event = self._buffers[index], self._events[index]
        if event is not None:
            event.synchronize()  # its previous copy has run: safe to overwrite
        if buffer is None or buffer.numel() < total:
            buffer = torch.empty(max(total, 1 << 16) * 2, dtype=torch.uint8, pin_memory=True)
            self._buffers[index] = buffer
        host = buffer.numpy()
        for name, a in arrays.items():
            start = offsets[name]
            host[start:start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        packed = torch.empty(max(total, 1), dtype=torch.uint8, device=self.device)
        packed.copy_(buffer[:max(total, 1)], non_blocking=True)
        if event is None:
            event = torch.cuda.Event()
            self._events[index] = event
        event.record()
        result = {}
        for name, a in arrays.items():
            start = offsets[name]
            dtype = _TORCH_DTYPES[a.dtype]
            result[name] = packed[start:start + a.nbytes].view(dtype).view(a.shape)
        return result


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
