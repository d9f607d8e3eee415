"""Named model shapes for speed benchmarks, written as real HF checkpoints with random weights.

Speed depends on shape, not on weight values, so a random-weight checkpoint of a real shape
(config.json + model.safetensors + a real tokenizer of the same vocabulary) measures what the real
model would, on a machine that cannot download it.

SmolLM2-135M's own tokenizer is not available here; its shape is paired with StarCoder's byte-level
BPE vocabulary (also 49,152 tokens, the family SmolLM's tokenizer descends from), rebuilt as a
`tokenizer.json` from llama.cpp's vocabulary-only GGUF in `../shared/models/tokenizers` (needs the
`gguf` package, in the `bench` extra).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

SHAPES: dict[str, dict] = {
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                           rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                           tokenizer=SHARED / "models" / "tokenizers" / "llama2-sentencepiece-32k" / "tokenizer.model"),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                         tokenizer=SHARED / "models" / "tokenizers" / "llama.cpp-vocab-gguf" / "ggml-vocab-starcoder.gguf"),
}


def write_random_checkpoint(shape: str, out_dir: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a Llama checkpoint of the named shape with N(0, 0.02) weights; returns out_dir."""
    import torch
    from safetensors.torch import save_file

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    tokenizer = Path(spec.pop("tokenizer"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "torch_dtype": dtype, **spec}
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=generator) * 0.02).to(torch_dtype)

    tensors = {"model.embed_tokens.weight": rand(spec["vocab_size"], hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch_dtype)}
    if not spec["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(spec["vocab_size"], hidden)
    for layer in tqdm(range(spec["num_hidden_layers"]), desc=f"writing {shape}", unit="layer"):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = rand(inter, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = rand(inter, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = rand(hidden, inter)
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch_dtype)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch_dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer.suffix == ".gguf" and tokenizer.is_file():
        write_bpe_tokenizer_from_gguf(tokenizer, out_dir)
    elif tokenizer.is_file():
        shutil.copy(tokenizer, out_dir / tokenizer.name)
    else:
        logger.warning("tokenizer %s not found; the checkpoint has none", tokenizer)
    return out_dir


def write_bpe_tokenizer_from_gguf(vocab_gguf: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from a llama.cpp vocabulary-only GGUF of a byte-level BPE
    ('gpt2') tokenizer: its tokens, merges and control tokens, BOS/EOS as the GGUF names them."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(vocab_gguf))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key: str):
        field = reader.fields.get(key)
        return None if field is None else int(field.parts[field.data[0]][0])

    model = bytes(reader.fields["tokenizer.ggml.model"].parts[reader.fields["tokenizer.ggml.model"].data[0]]).decode()
    if model != "gpt2":
        raise ValueError(f"{vocab_gguf}: expected a byte-level BPE ('gpt2') vocabulary, got {model!r}")
    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    token_field = reader.fields["tokenizer.ggml.token_type"]
    token_types = [int(token_field.parts[i][0]) for i in token_field.data]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=[tuple(m.split(" ", 1)) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token"), ("tokenizer.ggml.eos_token_id", "eos_token"),
                      ("tokenizer.ggml.unknown_token_id", "unk_token")):
        token_id = scalar(key)
        if token_id is not None:
            config[name] = tokens[token_id]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
