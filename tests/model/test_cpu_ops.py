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
