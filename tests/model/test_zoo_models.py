"""The bundled zoo checkpoints (models/target, models/relu, models/moe; skipped when absent) give
transformers' logits in frugal on real text, and frugal's engine generates what transformers generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frugal.layers.attention_metadata import AttentionMetadata
from frugal.model.arch_config import load_arch_config
from frugal.model.loader import load_model
from frugal.runner.kv_cache import allocate_kv_caches

transformers = pytest.importorskip("transformers")
MODELS = Path(__file__).resolve().parents[2] / "models"
PROMPT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
          "foolishness, and the President said to the Congress that the nation")
BLOCK_SIZE = 16


@pytest.fixture(params=["target", "relu", "moe"])
def zoo_model(request) -> Path:
    path = MODELS / request.param
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} not trained")
    return path


def test_logits_match_transformers(zoo_model):
    from frugal.model.tokenizer import load_tokenizer

    ids = load_tokenizer(zoo_model).encode(PROMPT)
    arch = load_arch_config(zoo_model)
    model = load_model(zoo_model, arch, torch.float32, "cpu", "reference", progress=False)
    num_blocks = -(-len(ids) // BLOCK_SIZE)
    caches = allocate_kv_caches(arch, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(len(ids)), block_tables=torch.arange(num_blocks)[None],
        query_start_loc=[0, len(ids)], query_lens=[len(ids)], seq_lens=[len(ids)], block_size=BLOCK_SIZE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(zoo_model), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), caches, metadata))
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_engine_greedy_matches_transformers_generate(zoo_model):
    from frugal import LLM, SamplingParams

    llm = LLM(model=str(zoo_model), dtype="float32", kv_cache_memory="16MiB", max_model_len=128)
    result = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(zoo_model), dtype=torch.float32).eval()
    prompt = torch.tensor([result.prompt_token_ids])
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                               min_new_tokens=24, pad_token_id=0)[0, prompt.shape[1]:]
    assert result.outputs[0].token_ids == expected.tolist()
