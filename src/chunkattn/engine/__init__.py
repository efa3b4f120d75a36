"""The inference engine: requests, scheduling (continuous batching), sampling, and the ``LLM`` front ends."""

from chunkattn.engine.engine import EngineConfig, EngineError, EngineStats, LLMEngine
from chunkattn.engine.llm import LLM, AsyncLLM
from chunkattn.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from chunkattn.engine.sampling import SamplingParams
from chunkattn.engine.scheduler import SchedulerConfig

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineConfig", "EngineError", "EngineStats", "LLMEngine",
           "RequestMetrics", "RequestOutput", "SamplingParams", "SchedulerConfig"]
