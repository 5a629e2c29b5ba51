"""Llama-family building blocks over a flat batch of tokens from many requests.

Every matrix is stored as the slice a tensor-parallel rank holds (`TensorShard`): q/k/v and gate/up
keep a range of output rows (column-parallel), o and down keep a range of input columns
(row-parallel) and their partial outputs are summed by the injected `reduce` (identity on one
process, an all-reduce across ranks). Layers read their own slices from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic_llm.model.kv_cache import KVCache
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The reduction of a single tensor-parallel rank: nothing to sum."""
    return tensor


@dataclass(frozen=True)
class TensorShard:
    """The head and MLP ranges one tensor-parallel rank holds (half-open ranges)."""

    heads: tuple[int, int]  #: query heads [start, stop)
    kv_heads: tuple[int, int]  #: key/value heads [start, stop)
    intermediate: tuple[int, int]  #: MLP inner columns [start, stop)
    vocab: tuple[int, int] | None = None  #: LM-head vocabulary rows [start, stop); None: all

    @classmethod
    def full(cls, spec: ModelSpec) -> TensorShard:
        """The whole model (tensor degree 1)."""
        return cls((0, spec.num_heads), (0, spec.num_kv_heads), (0, spec.intermediate_size))

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """LM-head rows held: `vocab`, or every row when it is None."""
        return self.vocab if self.vocab is not None else (0, vocab_size)

    @property
    def num_heads(self) -> int:
        """Query heads held."""
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads held."""
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass
class SequenceSlice:
    """One request's rows in a flat batch: rows [start, start + num_new) are its new tokens."""

    start: int  #: first row of this request in the flat batch
    num_new: int  #: tokens computed for it in this pass
    cache: KVCache  #: its KV cache (already `reserve`d for `num_new` more positions)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are allocated empty and filled by a loader, never initialised."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Token embedding table, allocated empty and filled by a loader."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (computed in fp32)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) with a cos/sin table grown on demand."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.inv_freq = inv_freq.float()  # plain attribute: survives `to_empty` of the network
        self.attention_scaling = attention_scaling
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)

    def _table(self, needed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < needed or self._cos.dtype != dtype:
            length = max(needed, 2 * self._cos.shape[0], 256)
            t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self.attention_scaling).to(dtype)
            self._sin = (emb.sin() * self.attention_scaling).to(dtype)
        return self._cos, self._sin

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate `q` [T, Hq, D] and `k` [T, Hkv, D] by each row's position."""
        cos_table, sin_table = self._table(int(positions.max()) + 1, q.dtype)
        cos = cos_table[positions].unsqueeze(1)
        sin = sin_table[positions].unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _causal_mask(num_new: int, total: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [num_new, total] mask: query i (at position total-num_new+i) sees keys allowed."""
    query_pos = torch.arange(total - num_new, total, device=device).unsqueeze(1)
    key_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


class Attention(nn.Module):
    """Grouped-query self-attention over per-request KV caches."""

    def __init__(self, spec: ModelSpec, shard: TensorShard, reduce: Reduce) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.shard = shard
        self.window = spec.sliding_window
        self.reduce = reduce
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = Linear(spec.hidden_size, qkv_out, bias=spec.attention_bias)
        self.o = Linear(self.num_heads * self.head_dim, spec.hidden_size, bias=False)

    def load(self, weights: SafetensorsWeights, prefix: str) -> None:
        """Read this rank's q/k/v rows and o columns from `prefix` (e.g. 'model.layers.3.self_attn.')."""
        d = self.head_dim
        parts = [("q_proj", self.shard.heads), ("k_proj", self.shard.kv_heads),
                 ("v_proj", self.shard.kv_heads)]
        rows = [weights.get(f"{prefix}{name}.weight", 0, lo * d, hi * d) for name, (lo, hi) in parts]
        self.qkv.weight.data = torch.cat(rows, 0).contiguous()
        if self.qkv.bias is not None:
            biases = [weights.get(f"{prefix}{name}.bias", 0, lo * d, hi * d) for name, (lo, hi) in parts]
            self.qkv.bias.data = torch.cat(biases, 0).contiguous()
        lo, hi = self.shard.heads
        self.o.weight.data = weights.get(f"{prefix}o_proj.weight", 1, lo * d, hi * d).contiguous()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, layer: int,
                seqs: Sequence[SequenceSlice]) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(x)
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :q_width].view(tokens, self.num_heads, self.head_dim)
        k = qkv[:, q_width:q_width + kv_width].view(tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_width + kv_width:].view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary(q, k, positions)
        # head-major views of the whole batch: one transpose here, plain slices per request below
        q_heads, k_heads, v_heads = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out_heads = q.new_empty(self.num_heads, tokens, self.head_dim)
        for seq in seqs:
            rows = slice(seq.start, seq.start + seq.num_new)
            keys, values = seq.cache.write_and_read(layer, k_heads[:, rows], v_heads[:, rows])
            out_heads[:, rows] = self._attend(q_heads[:, rows], keys, values)
        return self.reduce(self.o(out_heads.transpose(0, 1).reshape(tokens, q_width)))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q [H, n, D] against keys/values [Hkv, L, D] -> [H, n, D]."""
        num_new, total = q.shape[1], keys.shape[1]
        windowed = self.window is not None and total > self.window
        mask, causal = None, False
        if windowed or 1 < num_new < total:
            mask = _causal_mask(num_new, total, self.window, q.device)
        elif num_new == total and num_new > 1:
            causal = True
        out = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
            is_causal=causal, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0)


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, spec: ModelSpec, shard: TensorShard, reduce: Reduce) -> None:
        super().__init__()
        self.shard = shard
        self.reduce = reduce
        width = shard.intermediate[1] - shard.intermediate[0]
        self.width = width
        self.gate_up = Linear(spec.hidden_size, 2 * width, bias=False)
        self.down = Linear(width, spec.hidden_size, bias=False)

    def load(self, weights: SafetensorsWeights, prefix: str) -> None:
        """Read this rank's gate/up rows and down columns from `prefix` (e.g. 'model.layers.3.mlp.')."""
        lo, hi = self.shard.intermediate
        gate = weights.get(f"{prefix}gate_proj.weight", 0, lo, hi)
        up = weights.get(f"{prefix}up_proj.weight", 0, lo, hi)
        self.gate_up.weight.data = torch.cat((gate, up), 0).contiguous()
        self.down.weight.data = weights.get(f"{prefix}down_proj.weight", 1, lo, hi).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up(x)
        gate, up = fused[..., : self.width], fused[..., self.width:]  # width 0: an empty AutoTP rank
        return self.reduce(self.down(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec, index: int, shard: TensorShard, reduce: Reduce) -> None:
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, shard, reduce)
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, shard, reduce)

    def load(self, weights: SafetensorsWeights) -> None:
        """Read this layer's slices from the checkpoint."""
        prefix = f"model.layers.{self.index}."
        self.input_norm.weight.data = weights.get(f"{prefix}input_layernorm.weight")
        self.post_attn_norm.weight.data = weights.get(f"{prefix}post_attention_layernorm.weight")
        self.attn.load(weights, prefix + "self_attn.")
        self.mlp.load(weights, prefix + "mlp.")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary,
                seqs: Sequence[SequenceSlice]) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), positions, rotary, self.index, seqs)
        return x + self.mlp(self.post_attn_norm(x))
