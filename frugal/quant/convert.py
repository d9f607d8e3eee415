"""`frugal quantize`: write a quantized checkpoint that `LLM(model=OUT_DIR)` loads directly.

OUT_DIR gets `model.safetensors` (packed `qweight`, `scales`, optional `qzeros` per quantized weight,
everything else copied unchanged, tensor names as in the source checkpoint with `.weight` replaced),
`config.json` with `quantization_config` (see `QuantConfig.to_json`), and every other file of the
source (tokenizer, generation config, chat template) copied as is. The tensors are exactly what
quantizing at load produces (`quantize_stream`), or, with `method='gptq'`, the GPTQ-calibrated ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from frugal.errors import ConfigError, ModelLoadError
from frugal.quant.base import quantize_stream, read_quant_config
from frugal.quant.config import QuantConfig

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors.index.json",)


def quantize_checkpoint(model_dir: Path | str, out_dir: Path | str, config: QuantConfig,
                        calibration=None, progress: bool = True) -> Path:
    """Quantize the 16-bit checkpoint in `model_dir` into `out_dir` (created; must not be model_dir).
    `calibration` (a `gptq.CalibrationConfig`) is required when `config.method == 'gptq'`."""
    from safetensors.torch import save_file

    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import iterate_weights, safetensors_files

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir} is not a checkpoint directory (no config.json)")
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError("the output directory must differ from the model directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output directory {out_dir} exists and is not empty")
    stored = read_quant_config(model_dir)
    if stored is not None:
        raise ConfigError(f"{model_dir} is already quantized ({stored.name}); quantize the 16-bit checkpoint")
    arch = load_arch_config(model_dir)
    files = safetensors_files(model_dir)
    precomputed = None
    if config.method == "gptq":
        if calibration is None:
            raise ConfigError("method 'gptq' needs calibration data")
        if arch.num_local_experts:  # GPTQ here calibrates the dense Llama MLP's projections only
            raise ConfigError(f"method 'gptq' does not support mixture-of-experts models ({arch.architecture}); "
                              "use round-to-nearest (method 'rtn')")
        precomputed = run_gptq(model_dir, arch, config, calibration, progress)

    tensors: dict[str, torch.Tensor] = {}
    stream = quantize_stream(iterate_weights(files, progress, desc=f"quantizing to {config.name}"), config,
                             arch.tie_word_embeddings, precomputed)
    for name, tensor in stream:
        tensors[name] = tensor.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "quantization_config": json.dumps(config.to_json())})
    raw_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    raw_config["quantization_config"] = config.to_json()
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2), encoding="utf-8")
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _WEIGHT_FILES + ("config.json",):
            shutil.copy2(path, out_dir / path.name)
    size = (out_dir / "model.safetensors").stat().st_size
    logger.info("wrote %s (%s, %.1f MiB of weights)", out_dir, config.name, size / 2**20)
    return out_dir


def run_gptq(model_dir: Path, arch, config: QuantConfig, calibration, progress: bool):
    """Load the float32 model, tokenize the calibration text and run GPTQ over the decoder layers."""
    from frugal.model.loader import load_model
    from frugal.model.tokenizer import load_tokenizer
    from frugal.quant.gptq import calibration_windows, gptq_quantize_model

    tokenizer = load_tokenizer(model_dir)
    text = Path(calibration.data_file).read_text(encoding="utf-8", errors="replace")
    # A window needs seq_len tokens; tokenizing the first few hundred KiB is plenty for a few thousand.
    budget_chars = max(200_000, calibration.num_samples * calibration.seq_len * 16)
    token_ids = tokenizer.encode(text[:budget_chars], add_special_tokens=False)
    windows = calibration_windows(token_ids, calibration, arch.bos_token_id)
    logger.info("GPTQ calibration: %d windows of %d tokens from %s", *windows.shape, calibration.data_file)
    model = load_model(model_dir, arch, torch.float32, "cpu", "auto", max_position=max(windows.shape[1], 16),
                       progress=progress, kernel_backend="reference")
    return gptq_quantize_model(model, windows, config, calibration.damp, progress=progress)
