"""frugal: fast LLM inference on the hardware people actually have.

    from frugal import LLM, SamplingParams
"""

from frugal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from frugal.errors import ConfigError, FrugalError, InvalidRequestError, ModelLoadError
from frugal.sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "EngineConfig", "ModelConfig", "CacheConfig", "SchedulerConfig",
    "FrugalError", "ModelLoadError", "InvalidRequestError", "ConfigError", "RequestOutput",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import frugal` stays light (no torch) for the CLI's argument parsing and core/ tests.
    if name == "LLM":
        from frugal.engine.llm import LLM
        return LLM
    if name == "RequestOutput":
        from frugal.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'frugal' has no attribute {name!r}")
