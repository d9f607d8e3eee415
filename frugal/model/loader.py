"""Find a checkpoint, pick the dtype, build the model and stream its safetensors weights in.

`load_model` builds the module tree on the meta device (no memory), materialises every parameter
as an uninitialised tensor of the target dtype on the target device (tied parameters stay one
tensor), then streams tensors one at a time from memory-mapped safetensors files into
`model.load_weights`, so peak memory is the model plus one checkpoint tensor. Non-persistent
buffers (the rotary cos/sin cache) are computed at construction on the CPU and moved as they are.

Every failure a user can cause (no such model, no safetensors, missing shard, garbled or truncated
file, missing weight, wrong shape) raises ModelLoadError naming the file or tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from frugal.errors import ConfigError, ModelLoadError
from frugal.layers.attention_backends import get_attention_backend
from frugal.layers.linear import LinearMethod
from frugal.model.arch_config import ArchConfig
from frugal.model.registry import get_model_class
from frugal.quant.config import QuantConfig

logger = logging.getLogger(__name__)

HUB_ALLOW_PATTERNS = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "generation_config.json",
    "special_tokens_map.json", "chat_template*",
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX_FILE = "model.safetensors.index.json"


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local directory is used as is; anything else is a Hugging Face hub id, looked up in the local
    cache first and then downloaded (config, safetensors, tokenizer files only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{model!r} is a file, not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                      local_files_only=True))
    except Exception as exc:  # noqa: BLE001 — not cached (or not an id): try the hub
        logger.debug("%s not in the local Hugging Face cache (%s); trying to download", model, exc)
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # noqa: BLE001 — every hub failure is a user-facing load error
        raise ModelLoadError(
            f"model {model!r} is not a local directory and could not be found in the Hugging Face cache or "
            f"fetched from the hub (offline? wrong id?): {type(exc).__name__}: {exc}") from exc


def resolve_dtype(requested: str, arch: ArchConfig, device: torch.device | str) -> torch.dtype:
    """'auto' -> the checkpoint's dtype (float32 when unstated), except float16 becomes bfloat16 on CPU;
    an explicit 'float32' / 'bfloat16' / 'float16' is honoured as is."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {requested!r}")
        return _DTYPES[requested]
    checkpoint_dtype = _DTYPES.get(arch.torch_dtype or "float32")
    if checkpoint_dtype is None:
        logger.warning("checkpoint dtype %r not servable; using float32", arch.torch_dtype)
        checkpoint_dtype = torch.float32
    if checkpoint_dtype == torch.float16 and torch.device(device).type == "cpu":
        return torch.bfloat16
    return checkpoint_dtype


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, `model.safetensors`, or all `*.safetensors`."""
    model_dir = Path(model_dir)
    index_path = model_dir / _INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index_path}: invalid safetensors index ({type(exc).__name__}: {exc})") from exc
        missing = [name for name in shard_names if not (model_dir / name).is_file()]
        if missing:
            raise ModelLoadError(f"{index_path} names shard(s) that are missing from {model_dir}: "
                                 f"{', '.join(missing)}")
        return [model_dir / name for name in shard_names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
        raise ModelLoadError(
            f"no .safetensors weights in {model_dir} (found: {', '.join(found) or 'nothing'}); "
            "PyTorch .bin checkpoints are not supported — convert them to safetensors")
    return files


def iterate_weights(files: list[Path], progress: bool = True,
                    desc: str = "loading weights") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from memory-mapped safetensors files, one tensor at a time."""
    handles = []
    try:
        for path in files:
            handles.append((path, _open(path)))
        total = sum(len(handle.keys()) for _, handle in handles)
        mapped = file_mappings(files)
        with tqdm(total=total, desc=desc, unit="tensor", disable=not progress or None) as bar:
            for path, handle in handles:
                for name in handle.keys():
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types
                        raise ModelLoadError(f"{path}: cannot read tensor {name!r} "
                                             f"(truncated or corrupt file?): {exc}") from exc
                    yield name, tensor
                    release_pages(tensor, mapped)
                    bar.update(1)
    finally:
        handles.clear()


def _madvise():
    """libc's madvise through ctypes (None off Linux)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


_MADVISE = _madvise()
_MADV_DONTNEED = 4
_PAGE = 4096


def file_mappings(files: list[Path]) -> list[tuple[int, int]]:
    """Address ranges where this process maps `files` (from /proc/self/maps; empty off Linux)."""
    names = {str(Path(f).resolve()) for f in files}
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() in names:
                    low, high = fields[0].split("-")
                    ranges.append((int(low, 16), int(high, 16)))
    except OSError:
        return []
    return ranges


def release_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop a consumed tensor's pages from this process's memory when they belong to a (private, never
    written) file mapping in `mapped`, so that loading never holds the file and the model resident at
    once (peak RSS = model + one tensor). A later read of such a tensor (one kept by reference)
    re-reads the file, so its data stays valid; tensors outside the mappings are left alone."""
    if _MADVISE is None or tensor.numel() == 0:
        return
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    start, end = first // _PAGE * _PAGE, -(-last // _PAGE) * _PAGE
    if any(low <= start and end <= high for low, high in mapped):
        _MADVISE(start, end - start, _MADV_DONTNEED)  # best effort; an error leaves the pages resident


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 — SafetensorError, OSError, ...
        raise ModelLoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta parameter with an uninitialised tensor on `device` (floating point ones in
    `dtype`), keeping tied parameters tied and parameter attributes (weight_loader); move buffers."""
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in new_params:
                # Quantized formats fix their tensors' dtypes (`keep_dtype`); the rest take the model's.
                keep = not param.is_floating_point() or getattr(param, "keep_dtype", False)
                target_dtype = param.dtype if keep else dtype
                new = nn.Parameter(torch.empty(param.shape, dtype=target_dtype, device=device), requires_grad=False)
                new.__dict__.update(param.__dict__)
                new_params[id(param)] = new
            module._parameters[name] = new_params[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                assert not buffer.is_meta, f"buffer {name} of {type(module).__name__} was built on the meta device"
                module._buffers[name] = buffer.to(device)


def load_model(model_dir: Path | str, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str,
               attention_backend: str = "auto", max_position: int | None = None,
               linear_method: LinearMethod | None = None, progress: bool = True,
               quantization: QuantConfig | None = None, kernel_backend: str | None = None,
               quant_activations: str = "exact") -> nn.Module:
    """Build the model for `arch` and load its weights from `model_dir`; returns it in eval mode.

    `max_position`: the longest sequence the engine will serve (rotary cache size; defaults to the
    checkpoint's max_position_embeddings). `linear_method`: QuantMethod for every projection (overrides
    the one `quantization` implies). `quantization`: quantize a 16-bit checkpoint while loading it; a
    checkpoint written by `frugal quantize` is loaded as it is (its own settings). `kernel_backend`:
    force 'cpu' / 'cuda' / 'reference' (dequantise-then-matmul, the oracle) kernels. `quant_activations`:
    'int8' runs INT4 layers on the CPU's VNNI kernel with activations rounded to INT8 per 32-block;
    'exact' (the default here; the engine defaults to 'int8') keeps them in the model dtype.
    """
    from frugal.quant.base import build_quant_methods, quantize_stream, resolve_quantization

    model_dir, device = Path(model_dir), torch.device(device)
    files = safetensors_files(model_dir)  # fail fast, before building anything
    model_cls = get_model_class(arch.architecture)
    quant, prequantized = resolve_quantization(quantization, model_dir)
    # Loads frugal's CPU kernels when they apply, so the layers and 'auto' attention below can use them.
    methods = build_quant_methods(quant, dtype, device, arch.tie_word_embeddings, kernel_backend, quant_activations)
    backend = get_attention_backend(attention_backend, device)
    method_kwargs = {key: value for key, value in (("lm_head_method", methods.lm_head),
                                                   ("embedding_method", methods.embedding)) if value is not None}
    with torch.device("meta"):
        model = model_cls(arch, backend, max_position=max_position, linear_method=linear_method or methods.linear,
                          **method_kwargs)
    materialize(model, dtype, device)
    if device.type == "cpu":  # before the weights are copied in: pages get their backing on first touch
        from frugal.model.huge_pages import advise_module

        advise_module(model)
    if quant is not None and not prequantized:
        weights = quantize_stream(iterate_weights(files, progress, desc=f"quantizing to {quant.name}"), quant,
                                  arch.tie_word_embeddings)
    else:
        weights = iterate_weights(files, progress)
    model.quant_config = quant
    with torch.no_grad():
        model.load_weights(weights)
    model.eval()
    logger.info("loaded %s from %s: %.1fM parameters, %s on %s, %s attention", arch.architecture, model_dir,
                sum(p.numel() for p in model.parameters()) / 1e6, dtype, device, backend.name)
    return model
