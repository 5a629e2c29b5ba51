"""The fused CPU kernels (`cpu_ops`): built on this machine, equal to the eager ops, and skipped
where they do not apply."""

from __future__ import annotations

import shutil

import pytest
import torch

from elastic_llm.model import cpu_ops
from elastic_llm.model.layers import RMSNorm


def _eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_kernels_build_on_this_machine() -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here: the eager ops run (checked below)")
    assert cpu_ops.enabled() and cpu_ops.kernels() is not None


@pytest.mark.parametrize(("rows", "width"), [(1, 576), (32, 576), (3, 37), (700, 64), (5, 16)])
def test_rms_norm_matches_the_eager_ops(rows: int, width: int) -> None:
    if cpu_ops.kernels() is None:
        pytest.skip("fused CPU kernels unavailable on this machine")
    generator = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=generator) * 3
    weight = torch.rand(width, generator=generator) + 0.5
    fused = cpu_ops.rms_norm(x, weight, 1e-5)
    assert fused is not None and fused.shape == x.shape
    torch.testing.assert_close(fused, _eager(x, weight, 1e-5), rtol=2e-6, atol=1e-6)
    strided = torch.randn(rows, 2 * width, generator=generator)[:, ::2]  # non-contiguous rows
    torch.testing.assert_close(cpu_ops.rms_norm(strided, weight, 1e-5), _eager(strided, weight, 1e-5),
                               rtol=2e-6, atol=1e-6)


def test_rms_norm_leaves_other_tensors_to_the_eager_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.ones(8)
    assert cpu_ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), weight, 1e-5) is None
    assert cpu_ops.rms_norm(torch.randn(2, 3, 8), weight, 1e-5) is None
    monkeypatch.setattr(cpu_ops, "kernels", lambda: None)  # e.g. no compiler on this machine
    assert cpu_ops.rms_norm(torch.randn(2, 8), weight, 1e-5) is None
    norm = RMSNorm(8, 1e-5)
    x = torch.randn(4, 8)
    assert torch.equal(norm(x), _eager(x, norm.weight, 1e-5))  # the eager path


def test_the_environment_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTIC_LLM_CPU_KERNELS", "0")
    assert not cpu_ops.enabled()
    monkeypatch.setenv("ELASTIC_LLM_CPU_KERNELS", "1")
    assert cpu_ops.enabled()


def test_a_built_library_loads_in_a_new_process_without_build_tools() -> None:
    """Worker processes import the library built at set-up; with no compiler or ninja on PATH
    they still get it (nothing is rebuilt at run time)."""
    if cpu_ops.kernels() is None:
        pytest.skip("fused CPU kernels unavailable on this machine")
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": "/nonexistent"}
    code = "from elastic_llm.model import cpu_ops; print(cpu_ops.kernels() is not None)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr[-500:]


def _rotary_tables(rows: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from elastic_llm.model.layers import Rotary

    rotary = Rotary(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
    positions = torch.randint(0, 300, (rows,), generator=generator)
    return rotary.cos_sin(positions, torch.float32)


@pytest.mark.parametrize(("rows", "heads", "dim"), [(32, 12, 64), (1, 3, 64), (7, 5, 10)])
def test_rotation_in_place_is_the_eager_rotation_bit_for_bit(rows: int, heads: int, dim: int) -> None:
    if cpu_ops.kernels() is None:
        pytest.skip("fused CPU kernels unavailable on this machine")
    from elastic_llm.model.layers import _swap_halves

    generator = torch.Generator().manual_seed(rows * heads * dim)
    cos, sin = _rotary_tables(rows, dim, generator)
    qkv = torch.randn(rows, (heads + 3) * dim, generator=generator) * 4  # rows wider than the heads
    x = qkv[:, : heads * dim].view(rows, heads, dim)
    expected = x * cos + _swap_halves(x) * sin
    untouched = qkv[:, heads * dim:].clone()
    assert cpu_ops.rotate_(x, cos, sin)
    assert torch.equal(x, expected)
    assert torch.equal(qkv[:, heads * dim:], untouched)  # only the view's heads changed


def test_kv_rows_land_where_the_indexed_write_puts_them() -> None:
    if cpu_ops.kernels() is None:
        pytest.skip("fused CPU kernels unavailable on this machine")
    generator = torch.Generator().manual_seed(0)
    layers = torch.zeros(4, 2, 6, 3, 16, 8)
    pool = layers[2]  # one layer of a pool: a strided view
    qkv = torch.randn(5, 10 * 8, generator=generator)
    rows = qkv[:, 4 * 8:].view(5, 2, 3, 8)
    slots, positions = torch.tensor([4, 0, 5, 2, 1]), torch.tensor([0, 15, 7, 3, 9])
    expected = pool.clone()
    expected[:, slots, :, positions] = rows
    assert cpu_ops.store_rows(pool, slots, positions, rows)
    assert torch.equal(pool, expected)
    assert torch.equal(layers[1], torch.zeros_like(layers[1]))  # other layers untouched
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_ops.store_rows(pool, torch.tensor([6, 0, 0, 0, 0]), positions, rows)


def test_rotation_and_kv_write_leave_other_tensors_to_the_eager_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    cos, sin = torch.ones(2, 1, 8), torch.zeros(2, 1, 8)
    assert not cpu_ops.rotate_(torch.randn(2, 3, 8, dtype=torch.float64), cos.double(), sin.double())
    assert not cpu_ops.rotate_(torch.randn(2, 8, 3).transpose(1, 2), cos, sin)  # heads not contiguous
    pool = torch.zeros(2, 4, 1, 8, 8)
    assert not cpu_ops.store_rows(pool, torch.tensor([0]), torch.tensor([0]), torch.randn(1, 1, 2, 8).transpose(1, 2))
    monkeypatch.setattr(cpu_ops, "kernels", lambda: None)
    assert not cpu_ops.rotate_(torch.randn(2, 3, 8), cos, sin)
    assert not cpu_ops.store_rows(pool, torch.tensor([0]), torch.tensor([0]), torch.randn(1, 2, 1, 8))
