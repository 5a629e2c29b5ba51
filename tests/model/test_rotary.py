"""Rotary embedding: the sign-folded sin table rotates exactly as the rotate-half formula."""

from __future__ import annotations

import torch

from elastic_llm.model.layers import Rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_rotation_equals_the_rotate_half_formula_bit_for_bit() -> None:
    dim = 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rotary = Rotary(inv_freq, attention_scaling=0.9)
    positions = torch.tensor([0, 3, 300, 7])  # 300: past the first table (grown on demand)
    x = torch.randn(4, 3, dim)
    angles = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = (emb.cos() * 0.9).unsqueeze(1), (emb.sin() * 0.9).unsqueeze(1)
    want = x * cos + _rotate_half(x) * sin
    table_cos, table_sin = rotary.cos_sin(positions, torch.float32)
    assert torch.equal(Rotary.rotate_(x.clone(), table_cos, table_sin), want)
    q, k = rotary(x, x[:, :1], positions)
    assert torch.equal(q, want) and torch.equal(k, want[:, :1])
