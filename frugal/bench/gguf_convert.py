"""Convert a Llama-family Hugging Face checkpoint to GGUF (F32 / F16 / BF16) with the `gguf` package, and
quantize it with llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python), so the
peers benchmark runs llama.cpp on exactly the weights frugal runs.

Mapping (as llama.cpp's convert_hf_to_gguf.py does for `llama`): tensor names to `token_embd`,
`blk.N.attn_q`, ..., `output`; q/k rows permuted from transformers' rotate-half RoPE layout to
llama.cpp's interleaved one; 1-D tensors (norms) kept in F32; a tied model writes no `output.weight`
(llama.cpp then uses the embedding). The vocabulary is taken from the checkpoint's own tokenizer:
`tokenizer.model` (SentencePiece -> 'llama') or `tokenizer.json` (byte-level BPE -> 'gpt2').
Only plain RoPE and bias-free projections are supported; anything else raises ValueError.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
OUT_TYPES = ("F32", "F16", "BF16")


def gguf_name(name: str) -> str | None:
    """HF tensor name -> GGUF name (None for tensors llama.cpp does not load, e.g. rotary buffers)."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_MAP:
        return f"blk.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"
    if name.endswith(("rotary_emb.inv_freq",)):
        return None
    raise ValueError(f"no GGUF mapping for tensor {name!r} (only bias-free Llama-family checkpoints are supported)")


def permute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_data(tensor: torch.Tensor, out_type: str):
    """-> (numpy array, raw_dtype or None) in out_type (1-D tensors always F32)."""
    import gguf

    if tensor.dim() == 1 or out_type == "F32":
        return tensor.float().numpy(), None
    if out_type == "F16":
        return tensor.to(torch.float16).numpy(), None
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16


def add_vocab(writer, model_dir: Path, vocab_size: int) -> None:
    """Tokenizer metadata from the checkpoint's tokenizer.model (SentencePiece) or tokenizer.json (BPE)."""
    import gguf

    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i).encode("utf-8"))
            scores.append(sp.get_score(i))
            kind = gguf.TokenType.NORMAL
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            types.append(kind)
        for i in range(len(tokens), vocab_size):  # the model may have more rows than pieces
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        for setter, token_id in ((writer.add_bos_token_id, sp.bos_id()), (writer.add_eos_token_id, sp.eos_id()),
                                 (writer.add_unk_token_id, sp.unk_id())):
            if token_id >= 0:
                setter(token_id)
        writer.add_add_bos_token(True)
        return
    if (model_dir / "tokenizer.json").is_file():
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"{model_dir}/tokenizer.json: only BPE tokenizers are converted, got {model.get('type')}")
        vocab = dict(model["vocab"])
        special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab.update(special)
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        for token, token_id in vocab.items():
            if token_id < vocab_size:
                tokens[token_id] = token
        types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        for key, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
            text = config.get(key)
            text = text.get("content") if isinstance(text, dict) else text
            if text in vocab:
                setter(vocab[text])
        writer.add_add_bos_token(False)
        return
    raise ValueError(f"{model_dir} has no tokenizer.model or tokenizer.json to build a GGUF vocabulary from")


def convert_to_gguf(model_dir: Path | str, out_path: Path | str, out_type: str = "F16") -> Path:
    """Write `out_path` (GGUF, llama architecture) from the HF checkpoint in `model_dir`."""
    import gguf

    from frugal.model.arch_config import load_arch_config
    from frugal.model.loader import iterate_weights, safetensors_files

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {OUT_TYPES}, got {out_type!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    arch = load_arch_config(model_dir)
    if arch.rope_scaling is not None or arch.qkv_bias or arch.o_bias or arch.mlp_bias or arch.sliding_window:
        raise ValueError(f"{model_dir}: GGUF conversion supports plain-RoPE, bias-free Llama models only")
    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_hidden_layers)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_head_count(arch.num_attention_heads)
    writer.add_head_count_kv(arch.num_key_value_heads)
    if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16}[out_type])
    add_vocab(writer, model_dir, arch.vocab_size)
    for name, tensor in iterate_weights(safetensors_files(model_dir), progress=False):
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        target = gguf_name(name)
        if target is None:
            continue
        if name.endswith("q_proj.weight"):
            tensor = permute_rope_rows(tensor, arch.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_rope_rows(tensor, arch.num_key_value_heads)
        data, raw_dtype = _tensor_data(tensor, out_type)
        writer.add_tensor(target, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("wrote %s (%s, %.1f MiB)", out_path, out_type, out_path.stat().st_size / 2**20)
    return out_path


def quantize_gguf(src: Path | str, dst: Path | str, qtype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer: `qtype` 'Q8_0' / 'Q4_0' (llama.cpp's default per-tensor choices)."""
    import ctypes

    import llama_cpp

    from frugal.bench.llama_cpp_runner import quiet_logs

    quiet_logs()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise ValueError(f"llama.cpp has no file type {qtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with code {rc}")
    return Path(dst)
