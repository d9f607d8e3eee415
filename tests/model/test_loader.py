"""Loading: sharded checkpoints, the real stories260K checkpoint, dtype and path resolution, and
every user-caused failure ending in a ModelLoadError that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frugal.errors import ConfigError, ModelLoadError
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model, resolve_dtype, resolve_model_path
from frugal.runner.kv_cache import allocate_kv_caches

from .conftest import build_checkpoint
from .helpers import run_schedule
from .test_llama_parity import BLOCK_SIZE, chunked_schedule, nan_caches

STORIES = Path("/work/shared/models/stories260K")


def _load(path: Path, backend: str = "sdpa"):
    arch = load_arch_config(path)
    return load_model(path, arch, torch.float32, "cpu", backend, progress=False), arch


@pytest.fixture(scope="module")
def llama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama").path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads(tmp_path):
    ckpt = build_checkpoint("llama", tmp_path / "sharded", max_shard_size="100KB")
    assert (ckpt.path / "model.safetensors.index.json").is_file()
    assert len(list(ckpt.path.glob("*.safetensors"))) > 1
    model, arch = _load(ckpt.path)
    (logits,) = run_schedule(model, nan_caches(arch), [ckpt.token_ids], [[3, 0, 5]], [[40]], BLOCK_SIZE)
    torch.testing.assert_close(logits, ckpt.hf_logits[40], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(), reason="stories260K checkpoint not present")
def test_stories260k_matches_transformers():
    transformers = pytest.importorskip("transformers")
    model, arch = _load(STORIES)
    assert arch.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    token_ids = torch.randint(0, arch.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(torch.tensor([token_ids])).logits[0]
    (logits,) = run_schedule(model, nan_caches(arch), [token_ids], [[2, 7, 4]], [chunked_schedule(40)], BLOCK_SIZE)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bfloat16_close_to_float32_reference(tiny_checkpoint, backend):
    ckpt = tiny_checkpoint("qwen2_swa")
    arch = load_arch_config(ckpt.path)
    model = load_model(ckpt.path, arch, torch.bfloat16, "cpu", backend, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    caches = allocate_kv_caches(arch, 12, BLOCK_SIZE, torch.bfloat16, "cpu")
    (logits,) = run_schedule(model, caches, [ckpt.token_ids], [[4, 2, 9]], [chunked_schedule(40)], BLOCK_SIZE)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ckpt.hf_logits[40], atol=0.03, rtol=0.03)


# --- dtype and path resolution ---------------------------------------------------------------------


def test_resolve_dtype(llama_dir):
    import dataclasses

    arch = load_arch_config(llama_dir)
    assert resolve_dtype("auto", dataclasses.replace(arch, torch_dtype=None), "cpu") == torch.float32
    assert resolve_dtype("auto", dataclasses.replace(arch, torch_dtype="float32"), "cuda") == torch.float32
    assert resolve_dtype("auto", dataclasses.replace(arch, torch_dtype="bfloat16"), "cpu") == torch.bfloat16
    assert resolve_dtype("auto", dataclasses.replace(arch, torch_dtype="float16"), "cpu") == torch.bfloat16
    assert resolve_dtype("auto", dataclasses.replace(arch, torch_dtype="float16"), "cuda:0") == torch.float16
    assert resolve_dtype("float16", arch, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="int3"):
        resolve_dtype("int3", arch, "cpu")


def test_resolve_model_path(llama_dir):
    assert resolve_model_path(str(llama_dir)) == llama_dir
    with pytest.raises(ModelLoadError, match="not a local directory"):
        resolve_model_path("/definitely/not/here")


# --- bad input -------------------------------------------------------------------------------------


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_arch_config(tmp_path)


def test_garbled_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON"):
        load_arch_config(tmp_path)


def _write_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (directory / "config.json").write_text(json.dumps(config))


def test_unknown_architecture_and_bad_fields(llama_dir, tmp_path):
    directory = _copy(llama_dir, tmp_path / "m")
    _write_config(directory, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match=r"unknown architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_arch_config(directory)
    _write_config(directory, architectures=["LlamaForCausalLM"], hidden_size=None)
    with pytest.raises(ModelLoadError, match="missing required field 'hidden_size'"):
        load_arch_config(directory)
    _write_config(directory, hidden_size=64, hidden_act="gelu_new")
    with pytest.raises(ModelLoadError, match="unsupported hidden_act 'gelu_new'"):
        load_arch_config(directory)
    _write_config(directory, hidden_act="silu", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="unsupported rope scaling type 'yarn'"):
        load_arch_config(directory)


def test_no_safetensors(llama_dir, tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    shutil.copy(llama_dir / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"no \.safetensors.*pytorch_model\.bin.*\.bin"):
        _load(directory)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_safetensors(llama_dir, tmp_path, damage):
    directory = _copy(llama_dir, tmp_path / "m")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37garbage" * 100)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(directory)


def test_missing_shard(tmp_path):
    ckpt = build_checkpoint("llama", tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(ckpt.path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"missing.*{shard.name}"):
        _load(ckpt.path)


def _rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weight(llama_dir, tmp_path):
    directory = _copy(llama_dir, tmp_path / "m")
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"lacks.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        _load(directory)


def test_wrong_shape(llama_dir, tmp_path):
    directory = _copy(llama_dir, tmp_path / "m")

    def edit(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    _rewrite_weights(directory, edit)
    with pytest.raises(ModelLoadError, match=r"up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        _load(directory)


def test_untied_checkpoint_without_lm_head_ties(llama_dir, tmp_path):
    directory = _copy(llama_dir, tmp_path / "m")
    _rewrite_weights(directory, lambda t: t.pop("lm_head.weight"))
    model, _ = _load(directory)
    assert model.lm_head.weight is model.model.embed_tokens.weight
