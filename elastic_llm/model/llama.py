"""`LlamaNetwork`: a contiguous range of Llama-family layers, optionally with embedding and head.

One class serves a whole model (layers 0..L, embedding and head), a pipeline stage (a layer range,
the first stage with the embedding, the last with the head) and a tensor-parallel rank (a
`TensorShard` of every layer). Its forward pass takes a flat batch: the new tokens of many
requests packed one after another, each request attending to its own KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from elastic_llm.errors import ModelLoadError
from elastic_llm.model import huge_pages
from elastic_llm.model.layers import (
    AttentionBatch,
    DecoderLayer,
    Embedding,
    Reduce,
    RMSNorm,
    Rotary,
    SequenceSlice,
    TensorShard,
    no_reduce,
)
from elastic_llm.model.linear import Linear
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.weights import SafetensorsWeights


class LlamaNetwork(nn.Module):
    """Layers ``[layers.start, layers.stop)`` of a Llama-family model as held by one process."""

    def __init__(self, spec: ModelSpec, rotary: Rotary, layers: range | None = None,
                 shard: TensorShard | None = None, reduce: Reduce = no_reduce,
                 has_embedding: bool = True, has_head: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.rotary = rotary
        self.layer_range = layers if layers is not None else range(spec.num_layers)
        self.shard = shard or TensorShard.full(spec)
        self.embed = Embedding(spec.vocab_size, spec.hidden_size) if has_embedding else None
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, self.shard, reduce) for i in self.layer_range
        )
        self.head_rows = self.shard.vocab_rows(spec.vocab_size)  #: vocabulary rows of the LM head
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if has_head else None
        self.lm_head = (Linear(spec.hidden_size, self.head_rows[1] - self.head_rows[0], bias=False)
                        if has_head else None)
        self.packed_pages: huge_pages.Collapse | None = None  #: huge-page backing of packed weights

    @classmethod
    def from_checkpoint(cls, spec: ModelSpec, rotary: Rotary, weights: SafetensorsWeights,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs: object) -> LlamaNetwork:
        """Build with empty parameters, then fill every parameter with its slice from `weights`."""
        network = cls(spec, rotary, **kwargs)  # type: ignore[arg-type]
        network.load(weights, dtype)
        return network._placed(device)

    @classmethod
    def from_tensors(cls, spec: ModelSpec, rotary: Rotary, tensors: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LlamaNetwork:
        """A whole network built from a peer's `tensors()` instead of the checkpoint."""
        network = cls(spec, rotary)
        network.adopt(tensors, dtype)
        return network._placed(device)

    def _placed(self, device: torch.device | str) -> LlamaNetwork:
        self.to(device)
        self.rotary.inv_freq = self.rotary.inv_freq.to(device)
        return self.eval()

    def load(self, weights: SafetensorsWeights, dtype: torch.dtype = torch.float32) -> None:
        """Read this process's slices; raise `ModelLoadError` on any shape mismatch."""
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        if self.embed is not None:
            self.embed.weight.data = weights.get("model.embed_tokens.weight")
        for layer in self.layers:
            layer.load(weights)  # type: ignore[operator]
        if self.norm is not None and self.lm_head is not None:
            self.norm.weight.data = weights.get("model.norm.weight")
            lo, hi = self.head_rows
            whole = (lo, hi) == (0, self.spec.vocab_size)
            if self.spec.tie_word_embeddings and self.embed is not None:
                # tied: the head is the embedding (or a view of its rows), never a second copy
                self.lm_head.weight = (self.embed.weight if whole else
                                       nn.Parameter(self.embed.weight.data[lo:hi], requires_grad=False))
            else:
                name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
                self.lm_head.weight.data = weights.get(name) if whole else weights.get(name, 0, lo, hi)
        wrong = [f"{name}: checkpoint {tuple(p.shape)}, model {expected[name]}"
                 for name, p in self.named_parameters() if tuple(p.shape) != expected[name]]
        if wrong:
            raise ModelLoadError("weights do not match config.json: " + "; ".join(wrong[:5]))
        self.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, a tied head once (under the embedding's name): what a peer
        process of the same layout needs to `adopt` instead of reading the checkpoint."""
        return {name: param.data for name, param in self.named_parameters()}

    def adopt(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> int:
        """Take every parameter from `tensors` (another process's `tensors()` of the same layout)
        instead of the checkpoint; returns the bytes taken.

        Raises:
            ModelLoadError: a parameter is missing or has another shape.
        """
        tied = (self.spec.tie_word_embeddings and self.embed is not None and self.lm_head is not None
                and self.head_rows == (0, self.spec.vocab_size))
        taken = 0
        for name, param in list(self.named_parameters()):
            if tied and name == "lm_head.weight":
                continue
            tensor = tensors.get(name)
            if tensor is None or tuple(tensor.shape) != tuple(param.shape):
                found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
                raise ModelLoadError(f"peer weights: {name} {found}, expected {tuple(param.shape)}")
            param.data = tensor.to(dtype).clone()  # own memory (received buffers may be read-only)
            taken += tensor.numel() * tensor.element_size()
        if tied:
            self.lm_head.weight = self.embed.weight  # type: ignore[union-attr]
        return taken

    def pack_weights(self, batch_hint: int = 32) -> int:
        """Keep a CPU-friendly packed copy of every matrix (see `Linear.pack`); returns how many.

        Costs one more copy of the weights in memory; the parameters themselves are unchanged.
        The copies are backed by transparent huge pages where the OS allows (collapsed on a
        background thread: `packed_pages`).
        """
        with huge_pages.backing_new_memory() as collapse:
            packed = sum(module.pack(batch_hint) for module in self.modules() if isinstance(module, Linear))
        self.packed_pages = collapse[0] if collapse else None
        return packed

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, positions: torch.Tensor,
                seqs: Sequence[SequenceSlice], logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run the held layers over a flat batch.

        Args:
            inputs: token ids [T] on the first stage, else hidden states [T, hidden].
            positions: absolute position of each row [T].
            seqs: each request's rows and KV cache (caches already reserved for the new rows).
            logit_rows: rows whose next-token logits are wanted (last stage only).

        Returns:
            logits [len(logit_rows), vocab] on the last stage (only the held vocabulary rows'
            columns when the shard's `vocab` is set), else hidden states [T, hidden].
        """
        hidden = self.embed(inputs) if self.embed is not None else inputs
        if self.layers:
            batch = AttentionBatch.build(seqs, self.spec.sliding_window, positions.shape[0], positions.device)
            batch.cos, batch.sin = self.rotary.cos_sin(positions, hidden.dtype)
            for layer in self.layers:
                hidden = layer(hidden, positions, self.rotary, batch)
        if self.lm_head is None or self.norm is None:
            return hidden
        if logit_rows is not None:
            hidden = hidden.index_select(0, logit_rows)
        return self.lm_head(self.norm(hidden)).float()
