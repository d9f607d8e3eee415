"""frugal: fast LLM inference on the hardware people actually have.

    from frugal import LLM, SamplingParams
"""

import os as _os
import sys as _sys


def _prefer_passive_openmp() -> None:
    """Make OpenMP's idle workers sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), unless the user
    chose a policy, torch (hence libgomp, which reads it once) is already loaded, or FRUGAL_OMP_DEFAULTS
    is set (the peers benchmark runs llama.cpp and transformers with their own defaults).

    Why: frugal's streaming kernels share work with their own helper threads, while small ATen ops on
    the decode path (the logits' float copy, the sampler's argmax/softmax) still run OpenMP regions,
    whose workers then spin for a while. On a 2-core machine a spinning worker holds the core the next
    kernel's helper needs (measurements: README.md, "OpenMP wait policy")."""
    if "torch" in _sys.modules or "OMP_WAIT_POLICY" in _os.environ or _os.environ.get("FRUGAL_OMP_DEFAULTS"):
        return
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ[OMP_POLICY_MARKER] = "1"  # tells child processes the policy is ours, not the user's


OMP_POLICY_MARKER = "FRUGAL_SET_OMP_WAIT_POLICY"


_prefer_passive_openmp()

from frugal.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from frugal.errors import ConfigError, FrugalError, InvalidRequestError, ModelLoadError  # noqa: E402
from frugal.sampling_params import SamplingParams  # noqa: E402

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
