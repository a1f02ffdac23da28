"""longfit: long contexts that fit — a CPU-first LLM engine with a paged, compressible KV cache."""

from longfit.config import CacheConfig, EngineConfig, ModelConfig, RuntimeConfig, SchedulerConfig
from longfit.outputs import CompletionOutput, RequestOutput
from longfit.sampling_params import SamplingParams, StructuredOutput

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutput", "EngineConfig", "CacheConfig", "SchedulerConfig",
           "RuntimeConfig", "ModelConfig", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in torch; importing it lazily keeps `longfit.config` & co. torch-free for the planner.
    if name == "LLM":
        from longfit.llm import LLM

        return LLM
    raise AttributeError(name)
