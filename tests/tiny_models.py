"""Tiny random-weight checkpoints of real families, written by `transformers` (the oracle), paired
with a real tokenizer so the whole engine (tokenizer included) can load them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SPM_TOKENIZER = SHARED / "models" / "stories260K" / "tokenizer.model"
QWEN_TOKENIZER_DIR = SHARED / "models" / "tokenizers" / "qwen2.5-bpe"

# The Qwen2.5-Instruct chat template (the shared qwen2.5-bpe tokenizer folder ships none).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Llama-2-chat's template: uses bos_token/eos_token and raise_exception.

FAMILIES = ("llama", "mistral", "qwen2", "llama_tied", "llama3_rope", "llama_relu", "mixtral")


def tiny_config(family: str, vocab_size: int = 512, **overrides):
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "llama_tied":
        config = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True, "num_key_value_heads": 1})
    elif family == "llama3_rope":
        config = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif family == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif family == "llama_relu":  # ReGLU MLP, as ReluLLaMA and the zoo's `relu` model
        config = transformers.LlamaConfig(**common, hidden_act="relu")
    elif family == "mixtral":  # sparse MoE, the zoo's `moe` shape: 4 experts, top-2, tied embeddings
        config = transformers.MixtralConfig(**{**common, "tie_word_embeddings": True}, num_local_experts=4,
                                            num_experts_per_tok=2, sliding_window=None)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tiny_checkpoint(out_dir: Path, family: str = "llama", seed: int = 0, tokenizer: str = "spm", **overrides) -> Path:
    """Write a random-weight fp32 checkpoint of `family` to out_dir (config.json, model.safetensors and
    a real tokenizer) and return out_dir."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    if tokenizer == "qwen":
        vocab_size = 151665
        overrides.setdefault("tie_word_embeddings", True)
        overrides.setdefault("hidden_size", 32)
        overrides.setdefault("bos_token_id", None)
        overrides.setdefault("eos_token_id", 151645)
    else:
        vocab_size = 512
    config = tiny_config(family, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Random init is tiny; widen the logits so greedy decoding has clear winners.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0) if param.dim() >= 2 else None
        for name, param in model.named_parameters():
            if name.endswith(".gate.weight"):  # MoE router: decisive routing, no near-ties in top-k
                param.mul_(5.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer == "qwen":
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            shutil.copy(QWEN_TOKENIZER_DIR / name, out_dir / name)
        tokenizer_config = json.loads((QWEN_TOKENIZER_DIR / "tokenizer_config.json").read_text())
        tokenizer_config.setdefault("chat_template", QWEN25_TEMPLATE)
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    else:
        shutil.copy(SPM_TOKENIZER, out_dir / "tokenizer.model")
    return out_dir


def load_hf(model_dir: Path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    return model
