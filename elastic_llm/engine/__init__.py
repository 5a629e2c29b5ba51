"""Engine layer: one replica executing batches with per-request KV."""

from elastic_llm.engine.llm_engine import LLMEngine
from elastic_llm.engine.sequence import RequestState

__all__ = ["LLMEngine", "RequestState"]
