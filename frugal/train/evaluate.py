"""Measurements of a trained checkpoint, computed with `transformers` (the reference implementation
of every architecture the zoo trains, Mixtral and ReGLU included) in float32.

- perplexity: the text is `<s>` + its tokens, cut into consecutive windows of `context_len` inputs;
  each token after the first is predicted exactly once, from the tokens before it in its window
  (non-overlapping windows: an upper bound on the sliding-window perplexity). Reported per token, per
  whitespace-separated word (comparable across tokenizers) and as bits per UTF-8 byte.
- greedy agreement (draft vs target): the fraction of positions where both models' argmax agree,
  (a) teacher-forced on held-out text, (b) on the target's own greedy continuations of held-out prompts,
  which is what greedy speculative decoding accepts (Leviathan et al., 2023).
- ReLU sparsity: per layer, the fraction of MLP activations relu(gate_proj(x)) that are exactly zero.
- expert load: per layer, the fraction of routed (token, slot) assignments each expert receives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def load_hf_model(model_dir: Path | str) -> nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def encode_text(model_dir: Path | str, text: str) -> list[int]:
    """`<s>` + the tokens of `text`, with the checkpoint's own tokenizer (as frugal encodes a prompt)."""
    from frugal.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(text, add_special_tokens=False)


def windows(ids: torch.Tensor, context_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [1, n], targets [1, n]) for consecutive windows with n <= context_len."""
    for start in range(0, len(ids) - 1, context_len):
        chunk = ids[start:start + context_len + 1]
        yield chunk[None, :-1], chunk[None, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int], context_len: int) -> dict[str, float]:
    """Summed NLL and token perplexity of `ids` (see the module docstring)."""
    nll, count = 0.0, 0
    for inputs, targets in windows(torch.tensor(ids), context_len):
        logits = model(input_ids=inputs, use_cache=False).logits[0].float()  # [n, vocab]
        nll += torch.nn.functional.cross_entropy(logits, targets[0], reduction="sum").item()
        count += targets.numel()
    return {"nll": nll, "tokens": count, "token_perplexity": math.exp(nll / count)}


def head_text(model_dir: Path | str, text: str, max_tokens: int) -> str:
    """A prefix of `text` that encodes to about `max_tokens` tokens (BOS included): the text of its
    first `max_tokens - 1` tokens, found without encoding the whole text."""
    from frugal.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(text[:max_tokens * 16], add_special_tokens=False)
    return text if len(ids) < max_tokens and len(text) <= max_tokens * 16 else tokenizer.decode(ids[:max_tokens - 1])


def text_perplexity(model: nn.Module, model_dir: Path | str, text: str, context_len: int,
                    max_tokens: int | None = None) -> dict[str, float]:
    """Perplexity of `text` per token, per word and bits per byte. With `max_tokens` only the text's
    first ~`max_tokens` tokens are scored (words and bytes counted for the same text)."""
    if max_tokens is not None:
        text = head_text(model_dir, text, max_tokens)
    ids = encode_text(model_dir, text)
    result = perplexity(model, ids, context_len)
    words, num_bytes = len(text.split()), len(text.encode("utf-8"))
    result.update(words=words, word_perplexity=math.exp(result["nll"] / words),
                  bytes=num_bytes, bits_per_byte=result["nll"] / math.log(2) / num_bytes)
    return result


@torch.no_grad()
def teacher_forced_agreement(target: nn.Module, draft: nn.Module, ids: list[int], context_len: int) -> dict[str, float]:
    """Fraction of positions of `ids` where draft and target predict the same next token."""
    same, count = 0, 0
    for inputs, _ in windows(torch.tensor(ids), context_len):
        target_next = target(input_ids=inputs, use_cache=False).logits.argmax(-1)  # [1, n]
        draft_next = draft(input_ids=inputs, use_cache=False).logits.argmax(-1)
        same += int((target_next == draft_next).sum())
        count += target_next.numel()
    return {"positions": count, "agreement": same / count}


@torch.no_grad()
def generated_agreement(target: nn.Module, draft: nn.Module, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Target greedily continues each prompt by `new_tokens`; fraction of those positions where the
    draft's greedy choice (given the same prefix) is the target's token, and the mean number of
    target tokens a draft would get accepted in a row from the first generated position."""
    if not prompts:
        raise ValueError("generated_agreement needs at least one prompt")
    same, count, runs = 0, 0, []
    for prompt in prompts:
        inputs = torch.tensor([prompt])
        sequence = target.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        generated = sequence[0, len(prompt):]  # [new_tokens]
        draft_next = draft(input_ids=sequence[:, :-1], use_cache=False).logits[0, len(prompt) - 1:].argmax(-1)
        matches = (draft_next == generated).tolist()
        same += sum(matches)
        count += len(matches)
        runs.append(matches.index(False) if False in matches else len(matches))
    return {"positions": count, "agreement": same / count, "mean_leading_run": sum(runs) / len(runs)}


@torch.no_grad()
def relu_zero_fraction(model: nn.Module, ids: list[int], context_len: int) -> list[float]:
    """Per layer, the fraction of relu(gate_proj(x)) entries equal to zero (gate_proj(x) <= 0)."""
    layers = model.model.layers
    zeros, totals = [0] * len(layers), [0] * len(layers)

    def hook_for(index: int):
        def hook(module, args, output):
            zeros[index] += int((output <= 0).sum())
            totals[index] += output.numel()
        return hook

    handles = [layer.mlp.gate_proj.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        for inputs, _ in windows(torch.tensor(ids), context_len):
            model(input_ids=inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [z / t for z, t in zip(zeros, totals)]


@torch.no_grad()
def expert_load(model: nn.Module, ids: list[int], context_len: int) -> list[list[float]]:
    """Per layer, per expert: the fraction of the layer's top-k assignments routed to that expert."""
    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_local_experts, dtype=torch.float64)
    for inputs, _ in windows(torch.tensor(ids), context_len):
        out = model(input_ids=inputs, use_cache=False, output_router_logits=True)
        for layer, router_logits in enumerate(out.router_logits):  # each [tokens, experts]
            chosen = router_logits.float().topk(config.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(chosen.flatten(), minlength=config.num_local_experts).double()
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


@torch.no_grad()
def sample_texts(model: nn.Module, model_dir: Path | str, prompts: list[str], max_new_tokens: int,
                 seed: int = 0, temperature: float = 0.8, top_p: float = 0.95) -> list[str]:
    """Seeded sampled continuations of `prompts` (prompt text included)."""
    from frugal.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts = []
    for index, prompt in enumerate(prompts):
        torch.manual_seed(seed + index)
        inputs = torch.tensor([encode_text(model_dir, prompt)])
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=temperature,
                             top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=0)
        texts.append(prompt + tokenizer.decode(out[0, inputs.shape[1]:].tolist()))
    return texts
