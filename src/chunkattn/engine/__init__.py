"""The inference engine: requests, scheduling (continuous batching), the model runner and batched sampler,
incremental detokenization, the single driver loop, and the ``LLM`` / ``AsyncLLM`` front ends."""

from chunkattn.engine.args import EngineArgs
from chunkattn.engine.engine import EngineConfig, EngineDeadError, EngineError, EngineStats, LLMEngine
from chunkattn.engine.llm import LLM, AsyncLLM
from chunkattn.engine.loop import EngineLoop
from chunkattn.engine.request import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from chunkattn.engine.sampling import SamplingParams
from chunkattn.engine.scheduler import SchedulerConfig

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineArgs", "EngineConfig", "EngineDeadError", "EngineError",
           "EngineLoop", "EngineStats", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams",
           "SchedulerConfig", "TokenLogprob"]
