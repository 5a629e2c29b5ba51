"""`ProfileSettings`: what ``elastic-llm profile`` measures, validated against the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

from elastic_llm.model.spec import ModelSpec
from elastic_llm.profiling.errors import ProfilingError

#: Largest tensor degree profiled by default (each degree is one more process on the machine).
DEFAULT_MAX_DEGREE = 4


def default_degrees(spec: ModelSpec) -> tuple[int, ...]:
    """Degrees 1.. at which every rank holds at least one KV-head group, at most
    `DEFAULT_MAX_DEGREE` (SmolLM2, 3 KV heads: 1, 2, 3)."""
    return tuple(range(1, min(spec.num_kv_heads, DEFAULT_MAX_DEGREE) + 1))


@dataclass(frozen=True)
class ProfileSettings:
    """What to time, and how. Sizes are validated on construction, degrees in `for_model`.

    ``tensor_degrees`` None means `default_degrees` of the model profiled.
    """

    tensor_degrees: tuple[int, ...] | None = None  #: tensor degrees M (None: model default)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  #: micro-batch sizes b (requests)
    prefill_len: int = 128  #: prompt tokens per request in the timed prefills
    context_len: int = 128  #: cached tokens per request in the timed decode steps
    repeats: int = 5  #: timed repetitions per measurement (the median is kept)
    warmup: int = 1  #: untimed repetitions before them
    threads: int = 1  #: torch threads of the profiling process and of each comm worker
    measure_comm: bool = True  #: time gloo all-reduces and stage hops in worker processes
    comm_repeats: int = 30  #: timed repetitions per communication measurement (they are cheap)
    comm_timeout: float = 120.0  #: seconds a comm measurement may take before it is abandoned
    layer: int = 0  #: index of the decoder layer timed (all layers have the same shapes)
    flush_cache: bool = True  #: evict the CPU caches before every timed layer / head call

    def __post_init__(self) -> None:
        for name in ("prefill_len", "context_len", "repeats", "comm_repeats", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfilingError(f"{name.replace('_', '-')} must be a positive integer, "
                                     f"got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ProfilingError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not self.comm_timeout > 0:
            raise ProfilingError(f"comm timeout must be > 0 seconds, got {self.comm_timeout!r}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ProfilingError(f"layer must be an integer >= 0, got {self.layer!r}")
        object.__setattr__(self, "batch_sizes", _sizes("batch size", self.batch_sizes))
        if self.tensor_degrees is not None:
            object.__setattr__(self, "tensor_degrees",
                               _sizes("tensor degree", self.tensor_degrees))

    def for_model(self, spec: ModelSpec) -> ProfileSettings:
        """These settings with the degrees resolved for ``spec``, checked against its shapes.

        Raises:
            ProfilingError: a degree above the model's query heads, a layer it does not have, or
                prompts / contexts longer than its context window.
        """
        degrees = self.tensor_degrees or default_degrees(spec)
        too_large = [m for m in degrees if m > spec.num_heads]
        if too_large:
            raise ProfilingError(f"tensor degree {too_large[0]} is larger than the model's "
                                 f"{spec.num_heads} attention heads ({spec.name})")
        if self.layer >= spec.num_layers:
            raise ProfilingError(f"layer {self.layer} does not exist: {spec.name} has "
                                 f"{spec.num_layers} layers")
        longest = max(self.prefill_len, self.context_len + 1)
        if longest > spec.max_position_embeddings:
            raise ProfilingError(f"{longest} tokens exceed the model's context window of "
                                 f"{spec.max_position_embeddings}")
        return replace(self, tensor_degrees=degrees)

    @property
    def degrees(self) -> tuple[int, ...]:
        """The tensor degrees (only after `for_model`)."""
        if self.tensor_degrees is None:
            raise ProfilingError("tensor degrees are resolved by ProfileSettings.for_model")
        return self.tensor_degrees


def _sizes(what: str, values: tuple[int, ...]) -> tuple[int, ...]:
    """Sorted distinct positive ints, or `ProfilingError`."""
    values = tuple(values)
    if not values:
        raise ProfilingError(f"give at least one {what}")
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ProfilingError(f"{what} must be a positive integer, got {bad[0]!r}")
    return tuple(sorted(set(values)))
