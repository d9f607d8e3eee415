"""A trained checkpoint is a Hugging Face checkpoint: transformers and frugal load it and give the
same logits (and frugal's engine the same greedy text); Mixtral keeps HF's MixtralForCausalLM layout,
the ReLU variant is Llama with hidden_act "relu" (ReGLU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from frugal.layers.attention_metadata import AttentionMetadata
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.runner.kv_cache import allocate_kv_caches
from frugal.train.checkpoint import export_hf
from frugal.train.lm import Trainer
from frugal.train.model import count_parameters

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")
BLOCK_SIZE = 16


def train_tiny(tmp_path, zoo_tokenizer, corpus_dir, name, model=None, save_dtype="float32", steps=4) -> Trainer:
    config = tiny_config(zoo_tokenizer, [str(corpus_dir)], model=model,
                         optim={"max_steps": steps, "save_dtype": save_dtype, "eval_every": 100})
    trainer = Trainer(config, tmp_path / name, cache_dir=tmp_path / "cache", progress_bar=False)
    trainer.train()
    return trainer


def frugal_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    """One prefill of `token_ids` through frugal's model over a paged cache -> [len, vocab]."""
    arch = load_arch_config(model_dir)
    model = load_model(model_dir, arch, torch.float32, "cpu", "reference", progress=False)
    num_blocks = -(-len(token_ids) // BLOCK_SIZE)
    caches = allocate_kv_caches(arch, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(len(token_ids)), block_tables=torch.arange(num_blocks)[None],
        query_start_loc=[0, len(token_ids)], query_lens=[len(token_ids)], seq_lens=[len(token_ids)],
        block_size=BLOCK_SIZE)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(len(token_ids)), caches, metadata))


def hf_logits(model_dir, token_ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0]


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, zoo_tokenizer, corpus_dir) -> Trainer:
    """A tiny Llama trained for 30 steps (clear argmaxes), exported in float32."""
    return train_tiny(tmp_path_factory.mktemp("export"), zoo_tokenizer, corpus_dir, "llama", steps=30)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_llama_checkpoint_same_logits_in_transformers_and_frugal(tmp_path, trained_llama, save_dtype):
    out = trained_llama.out_dir
    if save_dtype != "float32":
        out = tmp_path / save_dtype
        export_hf(trained_llama.model, out, trained_llama.tokenizer_dir, save_dtype, trained_llama.summary())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == save_dtype
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "training.json"):
        assert (out / name).is_file(), name
    ids = trained_llama.sampler.val[:40].tolist()
    ours, theirs = frugal_logits(out, ids), hf_logits(out, ids)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    with torch.no_grad():
        trained = trained_llama.model.eval()(input_ids=torch.tensor([ids])).logits[0]
    if save_dtype == "float32":  # the export is the trained model itself
        assert torch.allclose(trained, theirs, atol=1e-5)
    else:  # rounded weights, same model
        assert (trained.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    summary = json.loads((out / "training.json").read_text())
    assert summary["step"] == 30
    assert summary["parameters"]["total"] == sum(p.numel() for p in trained_llama.model.parameters())


def test_frugal_engine_generates_what_transformers_generates(trained_llama):
    from frugal import LLM, SamplingParams

    out = trained_llama.out_dir
    llm = LLM(model=str(out), kv_cache_memory="4MiB", max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    result = llm.generate(["First Citizen:"], params)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    prompt = torch.tensor([result.prompt_token_ids])
    assert result.prompt_token_ids[0] == 1  # BOS, as in training
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                           min_new_tokens=12, pad_token_id=0)[0, prompt.shape[1]:]
    assert result.outputs[0].token_ids == expected.tolist()


def test_mixtral_checkpoint_has_the_hf_layout(tmp_path, zoo_tokenizer, corpus_dir):
    moe = {"architecture": "mixtral", "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2}
    trainer = train_tiny(tmp_path, zoo_tokenizer, corpus_dir, "moe", model=moe, steps=3)
    out = tmp_path / "moe"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for expert in range(4):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.1.block_sparse_moe.experts.{expert}.{w}.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    ids = trainer.sampler.val[:40].tolist()
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(trained, hf_logits(out, ids), atol=1e-5)
    counts = count_parameters(trainer.model)
    assert counts["active"] < counts["total"]


def test_relu_variant_is_reglu_llama(tmp_path, zoo_tokenizer, corpus_dir):
    trainer = train_tiny(tmp_path, zoo_tokenizer, corpus_dir, "relu", model={"hidden_act": "relu"}, steps=3)
    out = tmp_path / "relu"
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["hidden_act"]) == (["LlamaForCausalLM"], "relu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    mlp, x = hf.model.layers[0].mlp, torch.randn(5, 64)
    with torch.no_grad():  # ReGLU: down(relu(gate(x)) * up(x))
        expected = mlp.down_proj(torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.allclose(mlp(x), expected, atol=1e-6)
    ids = trainer.sampler.val[:40].tolist()
    with torch.no_grad():
        trained = trainer.model.eval()(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(trained, hf_logits(out, ids), atol=1e-5)
