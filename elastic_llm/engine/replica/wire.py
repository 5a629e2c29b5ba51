"""Packing messages with tensors for a pipe between processes.

Tensors become `WireTensor`s (raw bytes + dtype + shape, any dtype including bf16, CUDA tensors
copied to the host), walking tuples, lists, dicts and dataclasses. This keeps pipe traffic plain
bytes rather than torch's shared-memory file descriptors, one per tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WireTensor:
    """A tensor as raw bytes."""

    data: bytes  #: the elements, contiguous, native byte order
    dtype: str  #: torch dtype name without the "torch." prefix
    shape: tuple[int, ...]  #: tensor shape

    @classmethod
    def pack(cls, tensor: torch.Tensor) -> WireTensor:
        """Copy `tensor` into bytes."""
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        return cls(flat.view(torch.uint8).numpy().tobytes(), str(flat.dtype).removeprefix("torch."),
                   tuple(tensor.shape))

    def unpack(self) -> torch.Tensor:
        """The tensor again (CPU)."""
        dtype = getattr(torch, self.dtype)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8) if self.data else \
            torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(self.shape)


def to_wire(obj: Any) -> Any:
    """`obj` with every tensor inside replaced by a `WireTensor`."""
    if isinstance(obj, torch.Tensor):
        return WireTensor.pack(obj)
    return _walk(obj, to_wire)


def from_wire(obj: Any) -> Any:
    """Inverse of `to_wire`."""
    if isinstance(obj, WireTensor):
        return obj.unpack()
    return _walk(obj, from_wire)


def _walk(obj: Any, fn: Any) -> Any:
    if isinstance(obj, tuple):
        return tuple(fn(x) for x in obj)
    if isinstance(obj, list):
        return [fn(x) for x in obj]
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj
