"""`ModelSpec`: the shape of a decoder-only transformer, and the byte and FLOP figures planners need.

Pure Python (no torch): the policy layer and the simulator import it for models that are never
loaded (OPT-6.7B, GPT-20B, LLaMA-30B), and the model layer builds one from every checkpoint it loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic_llm.errors import UnsupportedModelError

#: HF ``architectures`` entries whose checkpoints this project can execute (Llama family).
EXECUTABLE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
#: HF ``model_type`` values of the executable architectures.
EXECUTABLE_MODEL_TYPES: frozenset[str] = frozenset(EXECUTABLE_ARCHITECTURES.values())
#: RoPE scaling types the model math implements (``None``/"default" means none).
SUPPORTED_ROPE_TYPES: frozenset[str] = frozenset({"default", "linear", "llama3", "yarn"})

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as HF configs describe it.

    ``rope_type`` is one of ``SUPPORTED_ROPE_TYPES``; ``params`` holds the remaining keys of the
    HF ``rope_scaling`` dict (``factor``, ``low_freq_factor``, ...) as sorted (key, value) pairs so
    that the dataclass stays hashable.
    """

    rope_type: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        """Return parameter ``key`` or ``default``."""
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a decoder-only LLM plus derived sizes (all sizes in elements unless named).

    Instances are validated on construction and never mutated.
    """

    name: str  #: human-readable name, e.g. "smollm2-135m-instruct"
    model_type: str  #: HF model_type: "llama", "mistral", "qwen2", or "opt"/"gpt_neox" (sim only)
    num_layers: int  #: transformer blocks
    hidden_size: int  #: residual stream width h
    num_heads: int  #: query heads
    num_kv_heads: int  #: key/value heads (GQA when < num_heads)
    head_dim: int  #: per-head width
    intermediate_size: int  #: MLP inner width
    vocab_size: int  #: embedding rows
    max_position_embeddings: int = 2048  #: context window in tokens
    bytes_per_param: int = 4  #: storage width of weights and KV cache (fp32 = 4)
    gated_mlp: bool = True  #: SwiGLU (gate, up, down) when True, else two matrices (fc1, fc2)
    attention_bias: bool = False  #: q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool = False  #: LM head shares the embedding matrix
    rms_norm_eps: float = 1e-6  #: RMSNorm epsilon
    rope_theta: float = 10000.0  #: RoPE base
    rope_scaling: RopeScaling | None = None  #: RoPE scaling, None for plain RoPE
    sliding_window: int | None = None  #: attention window in tokens (Mistral), None = full
    bos_token_id: int | None = None  #: beginning-of-sequence token
    eos_token_ids: tuple[int, ...] = field(default=())  #: tokens that end generation

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings",
                     "bytes_per_param"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"ModelSpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    # ----------------------------------------------------------------- derived parameter counts
    @property
    def q_size(self) -> int:
        """Width of the query projection output (num_heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of one of the key/value projection outputs (num_kv_heads * head_dim)."""
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params_per_layer(self) -> int:
        """Parameters of q, k, v, o projections (with biases where the model has them)."""
        h = self.hidden_size
        params = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            params += self.q_size + 2 * self.kv_size
        return params

    @property
    def mlp_params_per_layer(self) -> int:
        """Parameters of the MLP (gate/up/down when gated, else fc1/fc2)."""
        matrices = 3 if self.gated_mlp else 2
        return matrices * self.hidden_size * self.intermediate_size

    @property
    def params_per_layer(self) -> int:
        """All parameters of one transformer block, norms included."""
        return self.attention_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Token-embedding parameters (vocab x hidden)."""
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """LM-head parameters stored separately from the embedding (0 when tied) + final norm."""
        untied = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return untied + self.hidden_size

    @property
    def stage_cost_edges(self) -> tuple[float, float]:
        """Extra cost of the first and last pipeline stages in layer units: the embedding lookup
        (about free) and the LM head's matrix multiply (vocab x hidden, tied or not)."""
        return (0.0, self.vocab_size * self.hidden_size / self.params_per_layer)

    @property
    def total_params(self) -> int:
        """All parameters of the model."""
        return self.num_layers * self.params_per_layer + self.embedding_params + self.head_params

    # ----------------------------------------------------------------- bytes and FLOPs
    @property
    def bytes_per_layer(self) -> int:
        """Weight bytes of one transformer block."""
        return self.params_per_layer * self.bytes_per_param

    @property
    def embedding_bytes(self) -> int:
        """Weight bytes of the token embedding."""
        return self.embedding_params * self.bytes_per_param

    @property
    def head_bytes(self) -> int:
        """Weight bytes held by the last stage beyond its layers (final norm, untied LM head)."""
        return self.head_params * self.bytes_per_param

    @property
    def total_bytes(self) -> int:
        """Weight bytes of the whole model."""
        return self.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """KV-cache bytes one token adds in one layer (keys and values)."""
        return 2 * self.kv_size * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds across all layers."""
        return self.kv_bytes_per_token_per_layer * self.num_layers

    def flops_per_token(self, context_len: int = 0) -> int:
        """Forward FLOPs for one token attending to ``context_len`` earlier tokens.

        Counts 2 FLOPs per multiply-accumulate of every weight matrix (LM head included, which is
        computed only for the positions that are sampled) plus the attention score and value
        products, 4 * num_heads * head_dim per context token per layer.
        """
        if context_len < 0:
            raise ValueError("context_len must be >= 0")
        matrix_params = self.num_layers * (self.params_per_layer - 2 * self.hidden_size)
        matrix_params += self.vocab_size * self.hidden_size
        attention = 4 * self.num_heads * self.head_dim * (context_len + 1) * self.num_layers
        return 2 * matrix_params + attention

    def prefill_flops(self, prompt_len: int) -> int:
        """Forward FLOPs of a prefill of ``prompt_len`` tokens (causal attention)."""
        matrix = self.flops_per_token(0) - 4 * self.num_heads * self.head_dim * self.num_layers
        attention_pairs = prompt_len * (prompt_len + 1) // 2
        return matrix * prompt_len + 4 * self.num_heads * self.head_dim * attention_pairs * self.num_layers

    # ----------------------------------------------------------------- construction
    @property
    def executable(self) -> bool:
        """True when this project's model math can run the architecture."""
        return self.model_type in EXECUTABLE_MODEL_TYPES

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str | None = None,
                       bytes_per_param: int | None = None) -> ModelSpec:
        """Build a spec from an HF ``config.json`` dict (Llama, Mistral, Qwen2, SmolLM, OPT, GPT-NeoX).

        Raises:
            UnsupportedModelError: unknown architecture, or missing / inconsistent fields.
        """
        model_type = str(config.get("model_type", "")).lower()
        builder = _BUILDERS.get(model_type)
        if builder is None:
            supported = ", ".join(sorted(EXECUTABLE_ARCHITECTURES))
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported architectures: {supported}"
            )
        if bytes_per_param is None:
            bytes_per_param = _DTYPE_BYTES.get(str(config.get("torch_dtype", "float32")), 4)
        try:
            return builder(config, name or str(config.get("_name_or_path") or model_type), bytes_per_param)
        except KeyError as missing:
            raise UnsupportedModelError(f"config.json lacks required field {missing}") from None


def _eos_ids(config: Mapping[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _rope(config: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope theta and scaling from either the classic keys or transformers 5 rope_parameters."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or None
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    if scaling is None and params:
        scaling = params
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = str(scaling.pop("rope_type", scaling.pop("type", "default")))
    scaling.pop("rope_theta", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported; supported: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(rope_type, tuple(sorted(scaling.items())))


def _llama_like(config: Mapping[str, Any], name: str, bytes_per_param: int) -> ModelSpec:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    theta, scaling = _rope(config)
    model_type = str(config["model_type"]).lower()
    window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    return ModelSpec(
        name=name,
        model_type=model_type,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        bytes_per_param=bytes_per_param,
        gated_mlp=True,
        attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config),
    )


def _gpt_like(config: Mapping[str, Any], name: str, bytes_per_param: int) -> ModelSpec:
    """OPT and GPT-NeoX: described for the planner and simulator only (not executable)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    return ModelSpec(
        name=name,
        model_type=str(config["model_type"]).lower(),
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(config.get("ffn_dim") or config.get("intermediate_size") or 4 * hidden),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        bytes_per_param=bytes_per_param,
        gated_mlp=False,
        attention_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        eos_token_ids=_eos_ids(config),
    )


_BUILDERS = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "opt": _gpt_like,
    "gpt_neox": _gpt_like,
}


def _described(name: str, model_type: str, layers: int, hidden: int, heads: int, ffn: int,
               vocab: int, gated: bool, bytes_per_param: int = 4) -> ModelSpec:
    return ModelSpec(name=name, model_type=model_type, num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                     intermediate_size=ffn, vocab_size=vocab, bytes_per_param=bytes_per_param,
                     gated_mlp=gated, attention_bias=not gated, tie_word_embeddings=not gated)


#: Models described for the planner and simulator, never loaded. fp32 as in the SpotServe paper's
#: evaluation ("6.7B": 32 layers h 4096; "20B": 44 layers h 6144; "30B": 48 layers h 7168), plus the
#: real LLaMA-30B shape.
DESCRIBED_MODELS: dict[str, ModelSpec] = {
    "opt-6.7b": _described("opt-6.7b", "opt", 32, 4096, 32, 16384, 50272, gated=False),
    "gpt-20b": _described("gpt-20b", "gpt_neox", 44, 6144, 64, 24576, 50432, gated=False),
    "spotserve-30b": _described("spotserve-30b", "opt", 48, 7168, 56, 28672, 50272, gated=False),
    "llama-30b": _described("llama-30b", "llama", 60, 6656, 52, 17920, 32000, gated=True),
}


def described_model(name: str) -> ModelSpec:
    """Return a spec from ``DESCRIBED_MODELS`` by name (case-insensitive)."""
    try:
        return DESCRIBED_MODELS[name.lower()]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown described model {name!r}; known: {sorted(DESCRIBED_MODELS)}"
        ) from None

