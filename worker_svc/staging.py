"""One host-to-device copy per step for all of its small arrays."""

from __future__ import annotations

import numpy as np
import torch

# Every array starts at a multiple of this many bytes, so any dtype can view it.
_ALIGN = 16


class HostToDevice:
    """Packs a step's host arrays into one pinned buffer and sends it in one async copy.

    Buffers rotate, and each is reused only after its copy has run, so the host may pack
    step N+1 while step N's copy is still queued. Each pinned buffer has its device twin,
    reused in stream order (a step's kernels read it before a later copy overwrites it), and
    the tensors viewing a twin are kept while the arrays' names, dtypes and shapes repeat
    (every decode step of a steady batch): a view costs more host time than its bytes.
    A returned tensor is valid until ``num_buffers`` more sends.

    Args:
        device: where the arrays go; on the CPU they are wrapped without a copy.
        num_buffers: pinned buffers in rotation.
    """

    def __init__(self, device: torch.device, num_buffers: int = 3) -> None:
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._device_buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        # Per buffer: the layout its views were made for, and the views.
        self._views: list[tuple[tuple, dict[str, torch.Tensor]] | None] = [None] * num_buffers
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
            size = max(total, 1 << 16) * 2
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._buffers[index] = buffer
            self._device_buffers[index] = torch.empty(size, dtype=torch.uint8,
                                                      device=self.device)
            self._views[index] = None
        device_buffer = self._device_buffers[index]
        assert device_buffer is not None
        host = buffer.numpy()
        for name, a in arrays.items():
            start = offsets[name]
            host[start:start + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        num_bytes = max(total, 1)
        device_buffer[:num_bytes].copy_(buffer[:num_bytes], non_blocking=True)
        if event is None:
            event = torch.cuda.Event()
            self._events[index] = event
        event.record()
        layout = tuple((name, a.dtype, a.shape) for name, a in arrays.items())
        cached = self._views[index]
        if cached is not None and cached[0] == layout:
            return dict(cached[1])
        views = {}
        for name, a in arrays.items():
            start = offsets[name]
            dtype = _TORCH_DTYPES[a.dtype]
            views[name] = device_buffer[start:start + a.nbytes].view(dtype).view(a.shape)
        self._views[index] = (layout, views)
        return dict(views)


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
