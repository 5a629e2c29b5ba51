"""Weights by slice: the planning core's weight `Slice`s as pieces of named checkpoint tensors.

A `Slice` names units of a part (q rows + o columns, k/v rows, MLP columns, ...); `slice_pieces`
turns it into `TensorPiece`s, ranges of HF-named tensors along one dimension. `WeightPieces` is a
store of such pieces with the `get(name, dim, start, stop)` interface of `SafetensorsWeights`, so a
`LlamaNetwork` loads from it exactly as from the checkpoint: that is how a shard is assembled from
slices that other processes sent (an M=3 shard from M=2 shards' tensors) plus its own.

Tied embeddings: the embedding and the LM head are one tensor, ``model.embed_tokens.weight``
(`lm_head.weight` is an alias), so a process holding the embedding already holds every LM-head row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from elastic_llm.errors import ModelLoadError
from elastic_llm.model.llama import LlamaNetwork
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights
from elastic_llm.planning.slices import Part, Slice

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"


@dataclass(frozen=True)
class TensorPiece:
    """Elements ``[start, stop)`` along `dim` of tensor `name`; `dim` None: the whole tensor."""

    name: str  #: HF tensor name ("model.layers.3.self_attn.q_proj.weight")
    dim: int | None  #: dimension cut, None for the whole tensor
    start: int = 0  #: first index along `dim`
    stop: int = 0  #: one past the last index along `dim`


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full shape of every tensor a Llama-family checkpoint holds (LM head always listed)."""
    h, q, kv, inner = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {EMBED: (spec.vocab_size, h), HEAD: (spec.vocab_size, h),
                                          FINAL_NORM: (h,)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inner, h), p + "mlp.up_proj.weight": (inner, h),
            p + "mlp.down_proj.weight": (h, inner),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if spec.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def slice_pieces(spec: ModelSpec, piece: Slice) -> tuple[TensorPiece, ...]:
    """The tensor pieces of weight slice `piece` (their bytes add up to `SliceAlgebra.nbytes`)."""
    a, b = piece.start, piece.stop
    attn, mlp = f"model.layers.{piece.layer}.self_attn.", f"model.layers.{piece.layer}.mlp."
    bias = spec.attention_bias
    if piece.part is Part.Q:
        out = [TensorPiece(attn + "q_proj.weight", 0, a, b), TensorPiece(attn + "o_proj.weight", 1, a, b)]
        return tuple(out + ([TensorPiece(attn + "q_proj.bias", 0, a, b)] if bias else []))
    if piece.part is Part.KV:
        out = [TensorPiece(attn + f"{n}_proj.weight", 0, a, b) for n in "kv"]
        return tuple(out + ([TensorPiece(attn + f"{n}_proj.bias", 0, a, b) for n in "kv"] if bias else []))
    if piece.part is Part.MLP:
        return (TensorPiece(mlp + "gate_proj.weight", 0, a, b), TensorPiece(mlp + "up_proj.weight", 0, a, b),
                TensorPiece(mlp + "down_proj.weight", 1, a, b))
    if piece.part is Part.NORM:
        p = f"model.layers.{piece.layer}."
        return (TensorPiece(p + "input_layernorm.weight", None),
                TensorPiece(p + "post_attention_layernorm.weight", None))
    if piece.part is Part.EMBED:
        return (TensorPiece(EMBED, None),)
    if piece.part is Part.HEAD:
        return (TensorPiece(HEAD, 0, a, b),)
    if piece.part is Part.FINAL_NORM:
        return (TensorPiece(FINAL_NORM, None),)
    raise ValueError(f"{piece.part} is not a weight part")


def piece_shape(shapes: dict[str, tuple[int, ...]], piece: TensorPiece) -> tuple[int, ...]:
    """Shape of `piece` given the full `tensor_shapes`."""
    shape = list(shapes[piece.name])
    if piece.dim is not None:
        shape[piece.dim] = piece.stop - piece.start
    return tuple(shape)


class WeightPieces:
    """Pieces of named tensors, served through `SafetensorsWeights`' `get` interface.

    Each tensor is stored as pieces cut along one dimension (whole tensors as one piece); `get`
    concatenates the pieces covering the asked range (views when one piece covers it).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.shapes = tensor_shapes(spec)
        self._pieces: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}

    def canonical(self, name: str) -> str:
        """`name`, with the LM head mapped onto the embedding when they are tied."""
        return EMBED if name == HEAD and self.spec.tie_word_embeddings else name

    def add(self, piece: TensorPiece, tensor: torch.Tensor) -> None:
        """Store `tensor` as `piece` (ranges already covered are served by the earlier piece)."""
        name = self.canonical(piece.name)
        dim, start, stop = ((0, 0, self.shapes[name][0]) if piece.dim is None
                            else (piece.dim, piece.start, piece.stop))
        if stop > start:
            self._pieces.setdefault(name, []).append((dim, start, stop, tensor))

    def items(self) -> Iterator[tuple[TensorPiece, torch.Tensor]]:
        """Every stored piece and its tensor."""
        for name, pieces in self._pieces.items():
            for dim, start, stop, tensor in pieces:
                yield TensorPiece(name, dim, start, stop), tensor

    def merge(self, other: WeightPieces) -> None:
        """Add every piece `other` holds (views, no copies)."""
        for piece, tensor in other.items():
            self.add(piece, tensor)

    def discard(self, piece: TensorPiece) -> None:
        """Stop holding `piece` (ranges not held are ignored). What stays of a stored piece that
        `piece` cuts into is copied into storage of its own, so the cut part's memory is freed."""
        name = self.canonical(piece.name)
        entries = self._pieces.get(name)
        if not entries:
            return
        if piece.dim is None:
            del self._pieces[name]
            return
        full = self.shapes[name]
        kept = []
        for dim, lo, hi, tensor in entries:
            if dim != piece.dim:
                if (lo, hi) != (0, full[dim]):
                    raise ModelLoadError(f"{name}: cut along dim {dim}, discarded along {piece.dim}")
                dim, lo, hi = piece.dim, 0, full[piece.dim]  # a whole tensor: cut it along piece.dim
            a, b = max(lo, piece.start), min(hi, piece.stop)
            if a >= b:
                kept.append((dim, lo, hi, tensor))
                continue
            for start, stop in ((lo, a), (b, hi)):
                if stop > start:
                    kept.append((dim, start, stop, tensor.narrow(dim, start - lo, stop - start).clone()))
        if kept:
            self._pieces[name] = kept
        else:
            del self._pieces[name]

    def own(self) -> None:
        """Give every stored piece storage of its own (copies of views into larger tensors, e.g.
        the q / k / v rows of a fused qkv), so that discarding one frees its bytes."""
        for name, entries in self._pieces.items():
            self._pieces[name] = [(dim, lo, hi, tensor if _owns_storage(tensor) else tensor.clone())
                                  for dim, lo, hi, tensor in entries]

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every stored tensor (a storage may back several)."""
        for entries in self._pieces.values():
            for *_, tensor in entries:
                yield tensor

    def __contains__(self, name: str) -> bool:
        return self.canonical(name) in self._pieces

    def names(self) -> list[str]:
        """Tensor names with at least one piece."""
        return list(self._pieces)

    def covers(self, piece: TensorPiece) -> bool:
        """Whether every element of `piece` is held."""
        try:
            self._ranges(self.canonical(piece.name), piece.dim, piece.start, piece.stop)
        except ModelLoadError:
            return False
        return True

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name`, or ``[start:stop]`` along `dim`; raises `ModelLoadError` if not held."""
        name = self.canonical(name)
        cut, parts = self._ranges(name, dim, start, stop)
        if not parts:
            shape = list(self.shapes[name])
            shape[cut] = 0
            return torch.empty(shape, dtype=dtype or torch.float32)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, cut)
        return out if dtype is None else out.to(dtype)

    def _ranges(self, name: str, dim: int | None, start: int, stop: int | None
                ) -> tuple[int, list[torch.Tensor]]:
        pieces = sorted(self._pieces.get(name, ()), key=lambda p: p[1])
        full = self.shapes.get(name)
        if full is None:
            raise ModelLoadError(f"unknown tensor {name!r}")
        cut = pieces[0][0] if pieces else (dim or 0)
        if dim is None:
            dim, start, stop = cut, 0, full[cut]
        stop = full[dim] if stop is None else stop
        if dim != cut:  # asked along another dimension: needs one piece spanning the stored one
            whole = [p for p in pieces if p[1] == 0 and p[2] == full[cut]]
            if not whole:
                raise ModelLoadError(f"{name}: cut along dim {cut}, asked along dim {dim}")
            return dim, [whole[0][3].narrow(dim, start, stop - start)]
        parts, cursor = [], start
        for _, lo, hi, tensor in pieces:
            if cursor >= stop:
                break
            if lo <= cursor < hi:
                end = min(hi, stop)
                parts.append(tensor.narrow(dim, cursor - lo, end - cursor))
                cursor = end
        if cursor < stop:
            raise ModelLoadError(f"{name}[{start}:{stop}] along dim {dim} is not held "
                                 f"(missing from {cursor})")
        return dim, parts

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_network(cls, network: LlamaNetwork) -> WeightPieces:
        """Views of every parameter a `LlamaNetwork` holds, cut the way its slices are named.

        This is the one place that knows the network's fused layout: qkv rows are q, then k,
        then v; gate_up rows are gate, then up; o and down keep input columns.
        """
        store = cls(network.spec)
        for piece, tensor in _network_views(network):
            store.add(piece, tensor)
        return store

    def read_checkpoint(self, weights: SafetensorsWeights, pieces: Iterable[TensorPiece],
                        dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
        """Read `pieces` from the checkpoint into the store (on `device`); returns the bytes read."""
        nbytes = 0
        for piece in pieces:
            source = piece.name
            if source == HEAD and HEAD not in weights:
                source = EMBED  # tied checkpoints carry the embedding only
            tensor = (weights.get(source, dtype=dtype) if piece.dim is None else
                      weights.get(source, piece.dim, piece.start, piece.stop, dtype=dtype))
            self.add(piece, tensor.to(device))
            nbytes += tensor.numel() * tensor.element_size()
        return nbytes


def _owns_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is all of its storage (a contiguous tensor nothing else shares)."""
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _network_views(network: LlamaNetwork) -> Iterator[tuple[TensorPiece, torch.Tensor]]:
    spec, shard, d = network.spec, network.shard, network.spec.head_dim
    (hlo, hhi), (klo, khi), (ilo, ihi) = shard.heads, shard.kv_heads, shard.intermediate
    if network.embed is not None:
        yield TensorPiece(EMBED, None), network.embed.weight.data
    for layer in network.layers:
        p = f"model.layers.{layer.index}."
        attn, mlp = layer.attn, layer.mlp  # type: ignore[union-attr]
        sizes = [(hhi - hlo) * d, (khi - klo) * d, (khi - klo) * d]
        ranges = [(hlo * d, hhi * d), (klo * d, khi * d), (klo * d, khi * d)]
        tensors = [("weight", attn.qkv.weight.data)]
        if attn.qkv.bias is not None:
            tensors.append(("bias", attn.qkv.bias.data))
        for kind, fused in tensors:
            for name, part, (lo, hi) in zip("qkv", fused.split(sizes), ranges, strict=True):
                yield TensorPiece(f"{p}self_attn.{name}_proj.{kind}", 0, lo, hi), part
        yield TensorPiece(p + "self_attn.o_proj.weight", 1, hlo * d, hhi * d), attn.o.weight.data
        gate, up = mlp.gate_up.weight.data.split([ihi - ilo, ihi - ilo])
        yield TensorPiece(p + "mlp.gate_proj.weight", 0, ilo, ihi), gate
        yield TensorPiece(p + "mlp.up_proj.weight", 0, ilo, ihi), up
        yield TensorPiece(p + "mlp.down_proj.weight", 1, ilo, ihi), mlp.down.weight.data
        yield TensorPiece(p + "input_layernorm.weight", None), layer.input_norm.weight.data
        yield TensorPiece(p + "post_attention_layernorm.weight", None), layer.post_attn_norm.weight.data
    if network.norm is not None and network.lm_head is not None:
        yield TensorPiece(FINAL_NORM, None), network.norm.weight.data
        if not (spec.tie_word_embeddings and network.embed is not None):  # else a view of the embedding
            lo, hi = network.head_rows
            yield TensorPiece(HEAD, 0, lo, hi), network.lm_head.weight.data
