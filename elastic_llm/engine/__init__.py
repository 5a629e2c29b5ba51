"""Engine layer: one replica executing batches with per-request KV."""

from elastic_llm.engine.executor import Executor, StepWork
from elastic_llm.engine.llm_engine import LLMEngine
from elastic_llm.engine.stats import EngineStats
from elastic_llm.engine.sequence import RequestState

__all__ = ["EngineStats", "Executor", "LLMEngine", "RequestState", "StepWork"]
