"""Page-locked (pinned) host buffers for the CUDA backends' copies to and from the device.

A copy from pageable memory is staged by the driver through its own pinned buffer and cannot
overlap anything; a copy from a pinned buffer is one DMA that can run on a stream. Each engine
keeps one buffer per role ("in", "out", ...) and grows it when a larger batch arrives, so steady
state allocates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


class PinnedStaging:
    def __init__(self):
        import torch

        self._torch = torch
        self._bufs: dict[str, torch.Tensor] = {}

    def host(self, role: str, shape: Sequence[int], dtype=None):
        """A pinned float32 (or ``dtype``) CPU tensor of ``shape``; its memory is reused by the next
        call for the same role, so read it before asking again."""
        torch = self._torch
        dtype = dtype or torch.float32
        numel = 1
        for s in shape:
            numel *= int(s)
        buf = self._bufs.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            # Grow by doubling so a slowly rising batch size does not reallocate every call.
            size = max(numel, 2 * buf.numel() if buf is not None and buf.dtype == dtype else numel)
            buf = torch.empty(size, dtype=dtype, pin_memory=True)
            self._bufs[role] = buf
        return buf[:numel].view(*shape)
