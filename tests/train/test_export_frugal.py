"""The zoo's `relu` (ReGLU Llama) and `moe` (Mixtral) variants, saved by the trainer's own export, load in
frugal and in transformers with the same logits; frugal's engine generates what transformers generates,
and `frugal generate` runs on them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from frugal.model.arch_config import load_arch_config
from frugal.train.checkpoint import export_hf

from .test_export import frugal_logits, hf_logits, train_tiny

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "relu": {"hidden_act": "relu"},
    "moe": {"architecture": "mixtral", "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
            "tie_word_embeddings": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory, zoo_tokenizer, corpus_dir):
    """A tiny variant trained for 20 steps (clear argmaxes), exported in float32."""
    name = request.param
    return name, train_tiny(tmp_path_factory.mktemp(name), zoo_tokenizer, corpus_dir, name, model=VARIANTS[name],
                            steps=20)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_same_logits_in_transformers_and_frugal(tmp_path, trained, save_dtype):
    name, trainer = trained
    out = trainer.out_dir
    if save_dtype != "float32":
        out = tmp_path / save_dtype
        export_hf(trainer.model, out, trainer.tokenizer_dir, save_dtype, trainer.summary())
    arch = load_arch_config(out)
    if name == "moe":
        assert arch.architecture == "MixtralForCausalLM" and arch.num_local_experts == 4
        assert arch.num_experts_per_tok == 2 and arch.tie_word_embeddings
    else:
        assert arch.architecture == "LlamaForCausalLM" and arch.hidden_act == "relu"
    ids = trainer.sampler.val[:40].tolist()
    ours, theirs = frugal_logits(out, ids), hf_logits(out, ids)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    assert ours.std() > 0.5  # a trained model's logits, not a flat distribution


def test_engine_greedy_matches_transformers_generate(trained):
    from frugal import LLM, SamplingParams

    _, trainer = trained
    out = trainer.out_dir
    llm = LLM(model=str(out), kv_cache_memory="4MiB", max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
    results = llm.generate(["First Citizen:", "What, ho! my lord"], params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for result in results:
        prompt = torch.tensor([result.prompt_token_ids])
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                               min_new_tokens=12, pad_token_id=0)[0, prompt.shape[1]:]
        assert result.outputs[0].token_ids == expected.tolist()


def test_frugal_generate_cli_runs(trained):
    _, trainer = trained
    result = subprocess.run(
        [sys.executable, "-m", "frugal.cli.main", "generate", "First Citizen:", "--model", str(trainer.out_dir),
         "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json", "--kv-cache-memory", "4MiB",
         "--max-model-len", "64"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["token_ids"]) == 8 and payload["finish_reason"] == "length"
    assert payload["metrics"]["decode_tokens_per_s"] > 0
