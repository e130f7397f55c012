"""CUDA streams and events behind one small object, so that the same engine code runs on a
machine without CUDA: there every call here is a no-op and work simply runs in order.

Two streams: the compute stream (PyTorch's current stream) runs the model; the copy stream
moves q/k/v rows down to the host, attention outputs back up, and KV blocks between tiers.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


class Streams:
    def __init__(self, device: torch.device):
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.pin = self.is_cuda                      # pinned host memory only helps with CUDA
        self.copy = torch.cuda.Stream(device) if self.is_cuda else None

    def record(self, stream=None):
        """An event marking the work queued so far on `stream` (default: compute); None on CPU."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    @contextmanager
    def copy_after_compute(self):
        """Run the body on the copy stream, after everything queued on the compute stream."""
        if not self.is_cuda:
            yield
            return
        self.copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy):
            yield

    def on_copy(self):
        return torch.cuda.stream(self.copy) if self.is_cuda else nullcontext()

    def copy_waits_for(self, event) -> None:
        if event is not None:
            self.copy.wait_event(event)

    def compute_waits_for(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def compute_waits_for_copy(self) -> None:
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy)

    def copy_stream_sync(self) -> None:
        if self.is_cuda:
            self.copy.synchronize()


def wait_event(event) -> None:
    """Block the calling (host) thread until `event` has happened; no-op for None."""
    if event is not None:
        event.synchronize()
