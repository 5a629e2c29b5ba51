"""Our packed fp32 matrix multiply (`cpu_ops.linear`, csrc/linear.cpp): right to float64
rounding for every shape, each row independent of the rest of the batch, and what `Linear` uses."""

from __future__ import annotations

import pytest
import torch

from elastic_llm.model import cpu_ops
from elastic_llm.model.linear import Linear


def _available() -> bool:
    module = cpu_ops.kernels()
    return module is not None and bool(module.packed_linear_available())


needs_panels = pytest.mark.skipif(not _available(), reason="kernels not built or no AVX2+FMA on this CPU")


@needs_panels
@pytest.mark.parametrize(("rows", "out_features", "in_features"),
                         [(1, 12, 8), (8, 7, 33), (9, 13, 64), (16, 96, 40), (17, 25, 5), (40, 576, 576),
                          (3, 1, 1)])
def test_packed_linear_matches_a_float64_product(rows: int, out_features: int, in_features: int) -> None:
    """Rows not a multiple of the 16-row block, outputs not a multiple of the 6-row panel, with
    and without bias and residual."""
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    residual = torch.randn(rows, out_features, generator=generator)
    panels = cpu_ops.pack_linear(weight)
    assert panels is not None and panels.shape == (-(-out_features // 6), in_features, 6)
    exact = x.double() @ weight.double().T
    tolerance = 1e-5 * in_features ** 0.5 * (1 + exact.abs().max().item())
    for b, r in ((None, None), (bias, None), (None, residual), (bias, residual)):
        y = cpu_ops.linear(x, panels, out_features, b, r)
        assert y is not None and y.shape == (rows, out_features) and y.dtype == torch.float32
        expected = exact + (0 if b is None else b.double()) + (0 if r is None else r.double())
        assert (y.double() - expected).abs().max().item() < tolerance


@needs_panels
def test_a_strided_input_gives_what_its_contiguous_copy_gives() -> None:
    """The kernel reads x at its strides (transposed and column-sliced views, no copy first)."""
    generator = torch.Generator().manual_seed(3)
    panels = cpu_ops.pack_linear(torch.randn(20, 24, generator=generator))
    assert panels is not None
    for x in (torch.randn(24, 19, generator=generator).t(), torch.randn(19, 48, generator=generator)[:, ::2]):
        assert not x.is_contiguous()
        assert torch.equal(cpu_ops.linear(x, panels, 20), cpu_ops.linear(x.contiguous(), panels, 20))


@needs_panels
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch() -> None:
    """Alone, in batches of 5, 16 and 37 at any position, on one thread or two: bit for bit the
    same row (so batching, preemption and resume never change a request's numbers)."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(50, 96, generator=generator)
    panels = cpu_ops.pack_linear(weight)
    assert panels is not None
    row = torch.randn(1, 96, generator=generator)
    alone = cpu_ops.linear(row, panels, 50)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for size, at in ((5, 4), (16, 0), (16, 9), (37, 33)):
                batch = torch.randn(size, 96, generator=generator)
                batch[at] = row[0]
                out = cpu_ops.linear(batch, panels, 50)
                assert out is not None and torch.equal(out[at], alone[0])  # type: ignore[index]
    finally:
        torch.set_num_threads(threads)


@needs_panels
def test_linear_packs_into_panels_and_refuses_a_mismatched_input() -> None:
    layer = Linear(40, 30, bias=True)
    layer.weight.data = torch.randn(30, 40)
    layer.bias.data = torch.randn(30)  # type: ignore[union-attr]
    x = torch.randn(20, 40)
    unpacked = layer(x)
    assert layer.pack() and layer.packed_kind == "panels"
    torch.testing.assert_close(layer(x), unpacked, rtol=1e-5, atol=1e-5)
    panels = cpu_ops.pack_linear(layer.weight)
    assert panels is not None
    with pytest.raises(RuntimeError, match="K = x's width"):
        cpu_ops.linear(torch.randn(2, 41), panels, 30)
    with pytest.raises(RuntimeError, match="residual must be"):
        cpu_ops.linear(x, panels, 30, None, torch.randn(20, 31))


def test_without_the_kernels_linear_falls_back_to_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_ops, "kernels", lambda: None)  # e.g. no compiler on this machine
    assert cpu_ops.pack_linear(torch.randn(6, 4)) is None
    layer = Linear(16, 12)
    layer.weight.data = torch.randn(12, 16)
    x = torch.randn(3, 16)
    packed = layer.pack()
    assert layer.packed_kind == ("onednn" if packed else None)
    torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)
    assert cpu_ops.pack_linear(torch.randn(6, 4, dtype=torch.float64)) is None
