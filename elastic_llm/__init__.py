"""elastic_llm: serve generative LLMs on a Dask cluster of preemptible (spot) instances.

Light names (`SamplingParams`, errors, outputs) import without torch; `LLMEngine`,
`RequestState` and `load_model` are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from elastic_llm.errors import (
    ElasticLLMError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    UnknownRequestError,
    UnsupportedModelError,
)
from elastic_llm.request import Completion, FinishReason, RequestOutput
from elastic_llm.sampling import SamplingParams

if TYPE_CHECKING:
    from elastic_llm.engine import LLMEngine, RequestState
    from elastic_llm.model.loader import load_model
    from elastic_llm.planning.config import ParallelConfig

__version__ = "0.1.0"

_LAZY = {
    "LLMEngine": "elastic_llm.engine",
    "RequestState": "elastic_llm.engine",
    "load_model": "elastic_llm.model.loader",
    "ParallelConfig": "elastic_llm.planning.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elastic_llm' has no attribute {name!r}")


__all__ = [
    "Completion", "ElasticLLMError", "FinishReason", "InvalidRequestError", "LLMEngine",
    "ModelLoadError", "ParallelConfig", "PromptTooLongError", "RequestOutput", "RequestState", "SamplingParams",
    "UnknownRequestError", "UnsupportedModelError", "load_model",
]
