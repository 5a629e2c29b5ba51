"""Tensor serializer: every dtype bit-exact, and bf16 moving worker to worker on a real cluster."""

from __future__ import annotations

import pytest
import torch
from distributed.protocol import deserialize, serialize

from elastic_llm.cluster.serialization import (
    TensorSerializerPlugin,
    register_tensor_serializer,
    serialize_tensor,
    tensor_serializer_registered,
)

from .helpers import local_cluster


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _round_trip(tensor: torch.Tensor) -> torch.Tensor:
    header, frames = serialize(tensor, serializers=("dask",))
    assert header["serializer"] == "dask"
    out = deserialize(header, [bytes(f) for f in frames])  # bytes: read-only frames, as received
    assert isinstance(out, torch.Tensor)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                   torch.int8, torch.uint8, torch.int64, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn])
def test_round_trip_is_bit_identical(dtype: torch.dtype) -> None:
    register_tensor_serializer()
    source = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 7).to(dtype)
    out = _round_trip(source)
    assert out.dtype == dtype and out.shape == source.shape and _bits(out) == _bits(source)


def test_shapes_views_and_flags() -> None:
    register_tensor_serializer()
    base = torch.randn(4, 6, dtype=torch.bfloat16)
    for tensor in (base.t(), base[:, 1::2], torch.tensor(3.5, dtype=torch.bfloat16),
                   torch.empty(0, 8, dtype=torch.bfloat16)):
        out = _round_trip(tensor)
        assert out.shape == tensor.shape and torch.equal(out, tensor)
    grad = _round_trip(torch.ones(2, requires_grad=True))
    assert grad.requires_grad
    param = _round_trip(torch.nn.Parameter(base))
    assert isinstance(param, torch.nn.Parameter) and torch.equal(param, base)
    out = _round_trip(base)
    out.add_(1)  # the result owns writable memory
    assert not torch.equal(out, base)


def test_sparse_tensors_fall_back_to_pickle() -> None:
    register_tensor_serializer()
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(NotImplementedError):
        serialize_tensor(sparse)
    header, frames = serialize(sparse)
    assert header["serializer"] == "pickle"
    assert torch.equal(deserialize(header, frames).to_dense(), torch.eye(3))


def test_registration_is_idempotent_and_survives_dask_lazy_registration() -> None:
    register_tensor_serializer()
    register_tensor_serializer()
    import distributed.protocol.torch  # noqa: F401  (what Dask's lazy hook would import)

    assert tensor_serializer_registered()


def _make_bf16(seed: int) -> torch.Tensor:
    return torch.randn(64, 33, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _bf16_sum_bits(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    return str(tensor.dtype), list(tensor.shape), _bits(tensor)


@pytest.mark.timeout(120)
def test_bf16_moves_worker_to_worker_bit_identical() -> None:
    register_tensor_serializer()
    with local_cluster(2, processes=True) as (cluster, client):
        client.register_plugin(TensorSerializerPlugin())
        assert all(client.run(tensor_serializer_registered).values())
        a, b = sorted(cluster.scheduler_info["workers"])
        made = client.submit(_make_bf16, 7, workers=[a], pure=False)
        # Runs on b, so the tensor crosses from a's process to b's over Dask comms.
        seen = client.submit(_bf16_sum_bits, made, workers=[b], allow_other_workers=False)
        dtype, shape, bits = seen.result(timeout=60)
        expected = _make_bf16(7)
        assert (dtype, shape, bits) == (str(expected.dtype), list(expected.shape), _bits(expected))
        assert set(client.who_has(made)[made.key]) >= {a}
        # And back to the client, also through our serializer.
        assert _bits(made.result(timeout=60)) == _bits(expected)
