"""`frugal train eval`: gather a trained checkpoint's numbers (training.json + fresh measurements on
held-out text) into one report, and write it as the model card `README.md` + `card.json`.

Held-out text is WikiText-2 (never in the training recipes): the test split for perplexity, the
validation split for draft/target agreement, ReLU sparsity and expert load.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from frugal.errors import ConfigError
from frugal.train import evaluate
from frugal.train.checkpoint import SUMMARY_FILE

logger = logging.getLogger(__name__)

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2_valid_test"
SAMPLE_PROMPTS = ("Once upon a time", "The President said that", "ROMEO:", "The price of wheat")
AGREEMENT_PROMPTS, AGREEMENT_PROMPT_TOKENS, AGREEMENT_NEW_TOKENS = 16, 32, 32
PROBE_TOKENS = 16384  # held-out tokens for agreement, sparsity and expert load


def _read_summary(model_dir: Path) -> dict[str, Any]:
    path = model_dir / SUMMARY_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: `frugal train eval` reads a checkpoint written by `frugal train lm`")
    return json.loads(path.read_text(encoding="utf-8"))


def _wikitext(wikitext_dir: Path, split: str) -> str:
    path = wikitext_dir / f"{split}.txt"
    if not path.is_file():
        raise ConfigError(f"WikiText-2 {split} split not found at {path}; pass --wikitext-dir")
    return path.read_text(encoding="utf-8")


def evaluate_model(model_dir: Path, target_dir: Path | None = None, wikitext_dir: Path | None = None,
                   max_eval_tokens: int | None = None) -> dict[str, Any]:
    """The model card numbers of `model_dir` (see the module docstring)."""
    wikitext_dir = wikitext_dir or DEFAULT_WIKITEXT
    summary = _read_summary(model_dir)
    started = time.perf_counter()
    model = evaluate.load_hf_model(model_dir)
    context_len = model.config.max_position_embeddings
    report: dict[str, Any] = {
        "model": str(model_dir),
        "architecture": summary["architecture"],
        "parameters": summary["parameters"],
        "training": {k: summary.get(k) for k in ("command", "device", "torch_threads", "step", "tokens_seen",
                                                 "train_seconds", "train_loss", "val_loss")},
        "eval_context_len": context_len,
    }
    report["heldout_validation"] = _heldout_validation(model, model_dir, summary)
    logger.info("WikiText-2 test perplexity of %s", model_dir)
    report["wikitext2_test"] = evaluate.text_perplexity(model, model_dir, _wikitext(wikitext_dir, "test"),
                                                        context_len, max_eval_tokens)
    probe_tokens = min(PROBE_TOKENS, max_eval_tokens or PROBE_TOKENS)
    probe_text = evaluate.head_text(model_dir, _wikitext(wikitext_dir, "valid"), probe_tokens)
    probe = evaluate.encode_text(model_dir, probe_text)
    if getattr(model.config, "hidden_act", "silu") == "relu" and hasattr(model.model.layers[0].mlp, "gate_proj"):
        report["relu_zero_fraction_per_layer"] = evaluate.relu_zero_fraction(model, probe, context_len)
    if getattr(model.config, "num_local_experts", None):
        report["expert_load_per_layer"] = evaluate.expert_load(model, probe, context_len)
    if target_dir is not None:
        report["agreement_with_target"] = _agreement(Path(target_dir), model, model_dir, probe, context_len)
    report["samples"] = evaluate.sample_texts(model, model_dir, list(SAMPLE_PROMPTS), max_new_tokens=48)
    report["eval_seconds"] = round(time.perf_counter() - started, 1)
    return report


@torch.no_grad()
def _heldout_validation(model: torch.nn.Module, model_dir: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Mean NLL over the whole validation split of the training text (the blocks never trained on),
    rebuilt from training.json; None when the training files are not on this machine."""
    from frugal.train.config import TrainConfig
    from frugal.train.data import BatchSampler, expand_data_paths, split_train_val, tokenize_files
    from frugal.train.model import eval_loss

    config = TrainConfig.from_dict(summary["config"])
    try:
        files = expand_data_paths(config.data.files)
    except ConfigError as exc:
        logger.warning("no held-out validation loss: %s", exc)
        return None
    tokens = tokenize_files(files, model_dir)  # the checkpoint carries the training tokenizer
    splits = split_train_val(tokens, config.data.val_every, config.data.val_block_tokens)
    sampler = BatchSampler(splits, config.data.seq_len, config.optim.batch_size, config.optim.seed)
    nll, count = 0.0, 0
    for inputs, targets in sampler.val_batches():
        batch_nll, batch_count = eval_loss(model, inputs, targets)
        nll, count = nll + batch_nll, count + batch_count
    return {"tokens": count, "loss": nll / count, "perplexity": math.exp(nll / count)}


def _agreement(target_dir: Path, draft: torch.nn.Module, draft_dir: Path, probe: list[int],
               context_len: int) -> dict[str, Any]:
    target_tokenizer = (target_dir / "tokenizer.json").read_bytes() if (target_dir / "tokenizer.json").is_file() else None
    if target_tokenizer != (draft_dir / "tokenizer.json").read_bytes():
        raise ConfigError(f"{target_dir} and {draft_dir} do not share a tokenizer.json; agreement needs one vocabulary")
    target = evaluate.load_hf_model(target_dir)
    prompt_len = min(AGREEMENT_PROMPT_TOKENS, context_len // 2)
    new_tokens = min(AGREEMENT_NEW_TOKENS, context_len - prompt_len)
    stride = max(prompt_len, len(probe) // AGREEMENT_PROMPTS)
    prompts = [probe[i:i + prompt_len] for i in range(0, len(probe) - prompt_len + 1, stride)][:AGREEMENT_PROMPTS]
    return {
        "target": str(target_dir),
        "teacher_forced_wikitext2_valid": evaluate.teacher_forced_agreement(target, draft, probe, context_len),
        "on_target_greedy_continuations": evaluate.generated_agreement(target, draft, prompts, new_tokens),
    }


def write_card(model_dir: Path, report: dict[str, Any]) -> Path:
    """Write `card.json` (the report) and `README.md` (the same, for people) into `model_dir`."""
    (model_dir / "card.json").write_text(json.dumps(report, indent=2) + "\n")
    training, wiki, params = report["training"], report["wikitext2_test"], report["parameters"]
    lines = [
        f"# {model_dir.name}",
        "",
        f"A {report['architecture']} trained from scratch by `frugal train lm` on the English text in "
        "`../shared/data` (`english_text_nltk2008`: Gutenberg, State of the Union, inaugural addresses, ABC news, "
        "web text, Reuters; `tinyshakespeare`), with the zoo's 8192-token byte-level BPE. WikiText-2 is held out "
        "for evaluation. Written by `frugal train eval --write-card`; every number below is measured.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {params['total']:,} ({params['non_embedding']:,} without embeddings"
        + (f"; {params['active']:,} active per token" if "active" in params else "") + ") |",
        f"| recipe | `{training['command']}` |",
        f"| device | {training['device']}, {training['torch_threads']} thread(s) |",
        f"| steps / tokens seen | {training['step']:,} / {training['tokens_seen']:,} |",
        f"| training time | {training['train_seconds'] / 60:.1f} min |",
        f"| final train loss | {_num(training['train_loss'])} |",
        f"| final validation loss (held-out blocks of the training text) | {_num(training['val_loss'])} at the "
        "last evaluation in training" + (f"; {report['heldout_validation']['loss']:.4f} over the whole held-out "
        f"split ({report['heldout_validation']['tokens']:,} tokens, perplexity "
        f"{report['heldout_validation']['perplexity']:.1f})" if report.get("heldout_validation") else "") + " |",
        f"| WikiText-2 test perplexity | {wiki['token_perplexity']:.2f} per token, {wiki['word_perplexity']:.1f} "
        f"per word, {wiki['bits_per_byte']:.3f} bits/byte ({wiki['tokens']:,} tokens, non-overlapping "
        f"{report['eval_context_len']}-token windows) |",
    ]
    if "agreement_with_target" in report:
        agreement = report["agreement_with_target"]
        forced, generated = agreement["teacher_forced_wikitext2_valid"], agreement["on_target_greedy_continuations"]
        lines.append(f"| greedy agreement with `{agreement['target']}` | {forced['agreement']:.3f} teacher-forced on "
                     f"WikiText-2 valid ({forced['positions']:,} positions); {generated['agreement']:.3f} on the "
                     f"target's greedy continuations (mean leading run {generated['mean_leading_run']:.2f}) |")
    if "relu_zero_fraction_per_layer" in report:
        fractions = ", ".join(f"{f:.3f}" for f in report["relu_zero_fraction_per_layer"])
        lines.append(f"| zero MLP activations per layer (WikiText-2 valid) | {fractions} |")
    if "expert_load_per_layer" in report:
        for layer, load in enumerate(report["expert_load_per_layer"]):
            lines.append(f"| expert load, layer {layer} | {', '.join(f'{x:.3f}' for x in load)} |")
    lines += ["", "## Samples (temperature 0.8, top-p 0.95, seeded)", ""]
    lines += [f"> {text.strip().replace(chr(10), ' / ')}\n" for text in report["samples"]]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
