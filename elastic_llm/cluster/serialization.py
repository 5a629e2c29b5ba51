"""A Dask serializer for torch tensors that handles every dtype (bf16 too) and CUDA tensors.

Dask's own (``distributed.protocol.torch``) goes through ``Tensor.numpy()``, which fails for
bfloat16 and for CUDA tensors; a worker-to-worker transfer of one then hangs (ANCHORS.md). Ours
sends the raw bytes as one uint8 frame plus dtype, shape and device in the header:

* CUDA (or any non-CPU) tensors are copied to the CPU on send; the header records the device
  type, and the receiver puts the tensor back on its current device of that type when it has one
  (CPU otherwise). Device indices are not kept: they mean nothing on another machine.
* Non-contiguous tensors are made contiguous; ``requires_grad`` is kept, ``.grad`` is not.
* Sparse, quantized and other non-strided layouts raise ``NotImplementedError``, so Dask falls back
  to pickle for them.

Registration must run in every process that sends or receives tensors (client and workers):
`register_tensor_serializer` (idempotent) here, or `TensorSerializerPlugin` for the workers. It
imports ``distributed.protocol.torch`` first, so Dask's lazy registration has already run and
cannot overwrite ours later; ``torch.nn.Parameter`` keeps Dask's handler, which serializes
``p.detach()`` through ours.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.serialize import dask_deserialize, dask_serialize

if TYPE_CHECKING:
    from distributed import Worker

_lock = threading.Lock()


def serialize_tensor(tensor: torch.Tensor) -> tuple[dict[str, Any], list[memoryview]]:
    """Header and frames of ``tensor`` (Dask's ``dask_serialize`` contract)."""
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise NotImplementedError(f"tensors with layout {tensor.layout} go through pickle")
    header: dict[str, Any] = {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
        "device": tensor.device.type,
        "requires_grad": bool(tensor.requires_grad),
    }
    data = tensor.detach().to("cpu").contiguous()
    if data.numel() == 0:
        return header, []
    raw = data.reshape(-1).view(torch.uint8).numpy()
    return header, [memoryview(raw)]


def deserialize_tensor(header: dict[str, Any], frames: list[Any]) -> torch.Tensor:
    """Inverse of `serialize_tensor`."""
    dtype = getattr(torch, header["dtype"])
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"not a torch dtype: {header['dtype']!r}")
    shape = tuple(header["shape"])
    if frames:
        buffer = memoryview(frames[0]) if len(frames) == 1 else memoryview(b"".join(frames))
        if buffer.readonly:
            buffer = memoryview(bytearray(buffer))
        tensor = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)
    else:
        tensor = torch.empty(shape, dtype=dtype)
    device = header.get("device", "cpu")
    if device == "cuda" and torch.cuda.is_available():
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    if header.get("requires_grad"):
        tensor.requires_grad_(True)
    return tensor


def register_tensor_serializer() -> None:
    """Make `serialize_tensor` / `deserialize_tensor` Dask's handlers for ``torch.Tensor``
    in this process (idempotent, thread-safe)."""
    with _lock:
        import distributed.protocol.torch as dask_torch  # runs Dask's registration first

        for dispatch, theirs, ours in (
            (dask_serialize, dask_torch.serialize_torch_Tensor, serialize_tensor),
            (dask_deserialize, dask_torch.deserialize_torch_Tensor, deserialize_tensor),
        ):
            # torch.Tensor, and any subclass whose lookup was already cached to Dask's handler
            stale = [cls for cls, impl in dispatch._lookup.items() if impl is theirs]
            for cls in {torch.Tensor, *stale}:
                dispatch.register(cls, ours)


def tensor_serializer_registered() -> bool:
    """True when this process uses our tensor serializer."""
    return (dask_serialize.dispatch(torch.Tensor) is serialize_tensor
            and dask_deserialize.dispatch(torch.Tensor) is deserialize_tensor)


class TensorSerializerPlugin(WorkerPlugin):
    """Worker plugin registering the tensor serializer on every worker (present and future).

    ``client.register_plugin(TensorSerializerPlugin())`` and `register_tensor_serializer` in the
    client process.
    """

    name = "elastic_llm.tensor_serializer"
    idempotent = True

    def setup(self, worker: Worker) -> None:
        """Register in the worker's process."""
        register_tensor_serializer()
