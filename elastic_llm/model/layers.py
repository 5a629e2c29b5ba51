"""Llama-family building blocks over a flat batch of tokens from many requests.

Every matrix is stored as the slice a tensor-parallel rank holds (`TensorShard`): q/k/v and gate/up
keep a range of output rows (column-parallel), o and down keep a range of input columns
(row-parallel) and their partial outputs are summed by the injected `reduce` (identity on one
process, an all-reduce across ranks). Layers read their own slices from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from elastic_llm.model import cpu_ops
from elastic_llm.model.kv_cache import KVCache, KVPool, PooledKVCache
from elastic_llm.model.linear import Linear
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights

Reduce = Callable[[torch.Tensor], torch.Tensor]

#: A decode group's members are gathered out of the pool, instead of attending over the range of
#: slots that holds them, once that range is this many times the members. Per decode step, 30 layers
#: of SmolLM2 at 200 positions, one thread (`benchmarks/decode_span_gather.py`): 4 members over 8
#: slots 11.0 ms gathered and 12.9 ms over the range; over 30 slots, 11.7 and 40.2 ms; 16 members
#: over 24 slots, 41.8 and 32.2 ms.
GATHER_SPAN_FACTOR = 2


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
    cache: KVCache | PooledKVCache  #: its KV cache (already `reserve`d for `num_new` more positions)


@dataclass
class DecodeGroup:
    """Single-token rows of requests whose caches share one `KVPool`: their KV writes and their
    attention are a few batched ops per layer instead of a loop over requests.

    The attention runs over the pool's slots ``[lo, lo + span)`` (a view, no gather); slots in that
    range that are not in the batch get a dummy query whose output is dropped. Where that range is
    at least `GATHER_SPAN_FACTOR` times the members (a preemptive scheduler keeps paused requests'
    KV in slots between the running ones), the members' slots are gathered instead (`gather`):
    a copy of n slots is cheaper than attending over the whole range.
    """

    pool: KVPool
    rows: torch.Tensor | None  #: flat-batch row of each member; None: rows 0..n-1 in order
    slots: torch.Tensor  #: pool slot of each member [n]
    write_positions: torch.Tensor  #: position each member's new key/value goes to [n]
    lo: int  #: first slot of the attended range
    span: int  #: slots in the attended range
    span_index: torch.Tensor | None  #: member -> index in the range; None: identity (span == n)
    masked: torch.Tensor  #: True where a key is hidden [span, 1, 1, max_len]
    max_len: int  #: longest member (keys attended per slot)
    gather: bool = False  #: attend over the members' slots, gathered (then span = n, lo unused)
    _biases: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def score_bias(self, kv_heads: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
        """0 where a key is seen, -inf where hidden, laid out as the batched scores
        ``[span * kv_heads, group_size, max_len]``; built once per pass, shared by every layer."""
        key = (kv_heads, group_size, dtype)
        bias = self._biases.get(key)
        if bias is None:
            hidden = torch.zeros(self.masked.shape, dtype=dtype, device=self.masked.device)
            hidden.masked_fill_(self.masked, float("-inf"))
            bias = hidden.expand(self.span, kv_heads, group_size, self.max_len).reshape(
                self.span * kv_heads, group_size, self.max_len)
            self._biases[key] = bias
        return bias

    @classmethod
    def build(cls, members: Sequence[SequenceSlice], window: int | None, total_rows: int,
              device: torch.device) -> DecodeGroup:
        pool = members[0].cache.pool  # type: ignore[union-attr]
        slots = [m.cache.slot for m in members]  # type: ignore[union-attr]
        lengths = [m.cache.length + 1 for m in members]
        starts = [m.start for m in members]
        lo, span = min(slots), max(slots) - min(slots) + 1
        max_len = max(lengths)
        gather = span >= GATHER_SPAN_FACTOR * len(members)
        identity = gather or (span == len(members) and all(s == lo + i for i, s in enumerate(slots)))
        rows = None if (total_rows == len(members) and starts == list(range(total_rows))) else starts
        if gather:
            span, span_lengths = len(members), list(lengths)
        else:
            span_lengths = [1] * span  # dummy slots see one (zero-initialised or stale, finite) key
            for slot, length in zip(slots, lengths, strict=True):
                span_lengths[slot - lo] = length
        key_pos = torch.arange(max_len, device=device)
        ends = torch.tensor(span_lengths, device=device).unsqueeze(1)
        masked = key_pos.unsqueeze(0) >= ends
        if window is not None:
            masked |= key_pos.unsqueeze(0) <= ends - 1 - window
        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)
        return cls(pool, None if rows is None else as_tensor(rows), as_tensor(slots),
                   as_tensor([n - 1 for n in lengths]), lo, span,
                   None if identity else as_tensor([s - lo for s in slots]),
                   masked.view(span, 1, 1, max_len), max_len, gather)


@dataclass
class AttentionBatch:
    """How one forward pass attends: computed once per pass, shared by every layer."""

    loop: Sequence[SequenceSlice]  #: requests attended one by one (prefill chunks, lone caches)
    decode: DecodeGroup | None  #: single-token requests of one pool, attended together
    cos: torch.Tensor | None = None  #: rotary cos per row [T, 1, D] (None: computed per layer)
    sin: torch.Tensor | None = None  #: rotary sin per row [T, 1, D]

    @classmethod
    def build(cls, seqs: Sequence[SequenceSlice], window: int | None, total_rows: int,
              device: torch.device, min_group: int = 2) -> AttentionBatch:
        """Group the single-token requests of the first pool seen; the rest go to the loop."""
        pool = next((s.cache.pool for s in seqs
                     if s.num_new == 1 and isinstance(s.cache, PooledKVCache)), None)
        members = [s for s in seqs if s.num_new == 1 and isinstance(s.cache, PooledKVCache)
                   and s.cache.pool is pool]
        if len(members) < min_group:
            return cls(list(seqs), None)
        chosen = {id(m) for m in members}
        loop = [s for s in seqs if id(s) not in chosen]
        return cls(loop, DecodeGroup.build(members, window, total_rows, device))


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
        if x.dtype == torch.float32:
            fused = cpu_ops.rms_norm(x, self.weight, self.eps)  # None off the CPU or without kernels
            if fused is not None:
                return fused
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention) with a cos/sin table grown on demand.

    The sin table carries the rotate-half sign (its first half negated), so a rotation is
    ``x * cos + swap_halves(x) * sin``: the same products and sums as
    ``x * cos + rotate_half(x) * sin``, one negation fewer.
    """

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
            sin = (emb.sin() * self.attention_scaling).to(dtype)
            half = sin.shape[-1] // 2
            self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each row's position, shaped [T, 1, D] (computed once per pass)."""
        if positions.numel() == 0:
            cos_table, sin_table = self._table(1, dtype)
        else:
            cos_table, sin_table = self._table(int(positions.max()) + 1, dtype)
        return cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate `q` [T, Hq, D] and `k` [T, Hkv, D] by each row's position (new tensors)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return q * cos + _swap_halves(q) * sin, k * cos + _swap_halves(k) * sin

    @staticmethod
    def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `x` [T, H, D] in place by precomputed `cos_sin` rows; returns `x`."""
        if cpu_ops.rotate_(x, cos, sin):  # one pass, the same sums (False off the CPU, without kernels)
            return x
        turned = _swap_halves(x).mul_(sin)
        return x.mul_(cos).add_(turned)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


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
                seqs: Sequence[SequenceSlice] | AttentionBatch,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output projected back to the hidden size, plus `residual` when given."""
        batch = seqs if isinstance(seqs, AttentionBatch) else AttentionBatch(list(seqs), None)
        tokens = x.shape[0]
        qkv = self.qkv(x)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_width = hq * d
        if batch.cos is not None and batch.sin is not None:
            cos, sin = batch.cos, batch.sin
        else:
            cos, sin = rotary.cos_sin(positions, x.dtype)
        # q and k rotated together, in place: keys and values stay side by side in `qkv`
        qk = Rotary.rotate_(qkv[:, : q_width + hkv * d].view(tokens, hq + hkv, d), cos, sin)
        q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, q_width + hkv * d:].view(tokens, hkv, d)
        kv = qkv[:, q_width:].view(tokens, 2, hkv, d)  # each row's keys then values
        group = batch.decode
        if group is not None and group.rows is None and not batch.loop:
            out = self._attend_decode(group, layer, q, kv)
        else:
            out = q.new_empty(tokens, hq, d)
            if group is not None:
                rows = group.rows
                attended = (self._attend_decode(group, layer, q, kv) if rows is None
                            else self._attend_decode(group, layer, q[rows], kv[rows]))
                if rows is None:
                    out[: attended.shape[0]] = attended
                else:
                    out[rows] = attended
            # head-major views of the whole batch: one transpose here, plain slices per request below
            q_heads, k_heads, v_heads = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            for seq in batch.loop:
                rows_ = slice(seq.start, seq.start + seq.num_new)
                keys, values = seq.cache.write_and_read(layer, k_heads[:, rows_], v_heads[:, rows_])
                out[rows_] = self._attend(q_heads[:, rows_], keys, values).transpose(0, 1)
        return _project(self.o, self.reduce, out.reshape(tokens, q_width), residual)

    def _attend_decode(self, group: DecodeGroup, layer: int, q: torch.Tensor, kv: torch.Tensor
                       ) -> torch.Tensor:
        """One new token per member: q [n, H, D], kv [n, 2, Hkv, D] (keys, values) -> [n, H, D]."""
        n, hkv, d = q.shape[0], self.num_kv_heads, self.head_dim
        size = self.num_heads // hkv  # query heads per KV head
        pool_kv = group.pool.kv(layer)  # [2, slots, Hkv, capacity, D]
        if not cpu_ops.store_rows(pool_kv, group.slots, group.write_positions, kv):
            pool_kv[:, group.slots, :, group.write_positions] = kv
        length, batched = group.max_len, group.span * hkv
        span_slots = group.slots if group.gather else slice(group.lo, group.lo + group.span)
        keys = pool_kv[0, span_slots, :, :length].reshape(batched, length, d)  # views unless gathered
        values = pool_kv[1, span_slots, :, :length].reshape(batched, length, d)
        grouped = q.reshape(n, hkv, size, d)  # query heads of one KV head together
        if group.span_index is not None:
            grouped = grouped.new_zeros(group.span, hkv, size, d).index_copy_(0, group.span_index, grouped)
        scores = torch.baddbmm(group.score_bias(hkv, size, q.dtype), grouped.reshape(batched, size, d),
                               keys.transpose(1, 2), alpha=d ** -0.5)  # [span * Hkv, G, L]
        out = torch.bmm(torch.softmax(scores, dim=-1), values).view(group.span, hkv, size, d)
        if group.span_index is not None:
            out = out.index_select(0, group.span_index)
        return out.reshape(n, self.num_heads, d)

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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output, plus `residual` when given."""
        fused = self.gate_up(x)
        gate, up = fused[..., : self.width], fused[..., self.width:]  # width 0: an empty AutoTP rank
        return _project(self.down, self.reduce, F.silu(gate) * up, residual)


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
                seqs: Sequence[SequenceSlice] | AttentionBatch) -> torch.Tensor:
        x = self.attn(self.input_norm(x), positions, rotary, self.index, seqs, residual=x)
        return self.mlp(self.post_attn_norm(x), residual=x)


def _project(linear: Linear, reduce: Reduce, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + reduce(linear(x))``; on one rank the residual is added inside the matrix
    multiply. With several ranks it is added once, after the partial outputs are summed."""
    if residual is None:
        return reduce(linear(x))
    if reduce is no_reduce:
        return linear(x, residual)
    return residual + reduce(linear(x))
