"""Model-recommended generation defaults from generation_config.json (optional file).

Like vLLM's `generation_config="auto"`: the file's sampling values become the defaults a request
starts from (a request's explicit values win; that merge is the caller's), and its eos_token_id
joins config.json's in the set of ids that end a request. `do_sample` is ignored, as in vLLM.

Always true: `sampling_defaults` holds only keys the file sets, named as SamplingParams fields, and
`SamplingParams(**sampling_defaults)` is valid (checked here).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugal.errors import InvalidRequestError, ModelLoadError
from frugal.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: frozenset[int] = frozenset()
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    pad_token_id: int | None = None


def _ids(value: Any, what: str, path: Path) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ModelLoadError(f"{what} in {path} must be a token id or a list of them, got {value!r}")
    return set(values)


def load_generation_defaults(
    model_dir: Path | str, arch_eos: int | Iterable[int] | None = None
) -> GenerationDefaults:
    """Defaults from `model_dir/generation_config.json`; `arch_eos` is config.json's eos_token_id.

    A missing file gives the architecture's EOS and no sampling defaults. Garbled JSON, or values
    SamplingParams rejects, raise ModelLoadError naming the file.
    """
    path = Path(model_dir) / "generation_config.json"
    arch_ids = _ids(arch_eos if not isinstance(arch_eos, Iterable) else list(arch_eos),
                    "eos_token_id", Path(model_dir) / "config.json")
    if not path.is_file():
        return GenerationDefaults(eos_token_ids=frozenset(arch_ids))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")

    eos_ids = arch_ids | _ids(data.get("eos_token_id"), "eos_token_id", path)
    defaults = {name: data[key] for key, name in _SAMPLING_KEYS.items() if data.get(key) is not None}
    if defaults.get("top_k") == -1:
        defaults["top_k"] = 0
    try:
        SamplingParams(**defaults)
    except (InvalidRequestError, TypeError) as exc:
        raise ModelLoadError(f"bad sampling defaults in {path}: {exc}") from exc
    if defaults:
        logger.info("generation defaults from %s: %s", path, defaults)
    bos = data.get("bos_token_id")
    pad = data.get("pad_token_id")
    return GenerationDefaults(
        eos_token_ids=frozenset(eos_ids),
        sampling_defaults=defaults,
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
        pad_token_id=pad if isinstance(pad, int) and not isinstance(pad, bool) else None,
    )
