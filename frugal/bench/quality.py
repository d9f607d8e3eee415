"""`frugal bench quality MODEL`: the quantization quality matrix in one run.

Perplexity (frugal.eval.perplexity, sliding window) of the same model in fp32, bf16, INT8 and INT4
(g32 / g128, symmetric / asymmetric, round-to-nearest and GPTQ-calibrated), each as a relative change
against fp32. Round-to-nearest configurations quantize while loading; GPTQ ones are written by
`quantize_checkpoint` into a scratch directory first (calibration text must differ from the
evaluation text: WikiText-2 *valid* calibrates, *test* evaluates). The JSON holds every row with the
equivalent CLI commands; the PNG is a bar chart of the change in perplexity with the issue's limits.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityConfig:
    label: str
    dtype: str = "float32"
    bits: int | None = None            # None: unquantized
    group_size: int | None = None
    scheme: str = "sym"
    method: str = "rtn"
    activations: str = "int8"          # quant_activations: 'int8' (the engine's default) or 'exact'

    def quant_config(self):
        from frugal.quant.config import QuantConfig

        if self.bits is None:
            return None
        overrides = {"method": self.method}
        if self.bits == 4:
            overrides.update(group_size=self.group_size, scheme=self.scheme)
        return QuantConfig.create(f"int{self.bits}", **overrides)

    def cli_options(self) -> str:
        if self.bits is None:
            return f"--dtype {self.dtype}"
        options = f"--dtype {self.dtype} --quantization int{self.bits}"
        if self.bits == 4:
            options += f" --group-size {self.group_size} --scheme {self.scheme}"
        if self.activations != "int8":
            options += f" --quant-activations {self.activations}"
        return options


DEFAULT_CONFIGS = (
    QualityConfig("fp32"),
    QualityConfig("bf16", dtype="bfloat16"),
    QualityConfig("int8", bits=8),
    QualityConfig("int8 gptq", bits=8, method="gptq"),
    QualityConfig("int8 exact-act", bits=8, activations="exact"),
    QualityConfig("int4 g32 sym", bits=4, group_size=32),
    QualityConfig("int4 g32 sym exact-act", bits=4, group_size=32, activations="exact"),
    QualityConfig("int4 g32 asym", bits=4, group_size=32, scheme="asym"),
    QualityConfig("int4 g32 sym gptq", bits=4, group_size=32, method="gptq"),
    QualityConfig("int4 g128 sym", bits=4, group_size=128),
    QualityConfig("int4 g128 asym", bits=4, group_size=128, scheme="asym"),
    QualityConfig("int4 g128 sym gptq", bits=4, group_size=128, method="gptq"),
    QualityConfig("int4 g128 asym gptq", bits=4, group_size=128, scheme="asym", method="gptq"),
)


def run_quality(model: str, data: Path, calib_data: Path, configs=DEFAULT_CONFIGS, context_len: int | None = None,
                stride: int | None = None, max_tokens: int | None = None, calib_samples: int = 8,
                calib_seq_len: int = 128, progress: bool = True) -> dict:
    """Evaluate every configuration; rows in `configs` order, each with `vs_fp32` (relative change)."""
    from tqdm.auto import tqdm

    from frugal.eval.perplexity import evaluate_perplexity
    from frugal.quant.convert import quantize_checkpoint
    from frugal.quant.gptq import CalibrationConfig

    calibration = CalibrationConfig(Path(calib_data), calib_samples, calib_seq_len)
    window = f" --context-len {context_len}" if context_len else ""
    window += f" --stride {stride}" if stride else ""
    window += f" --max-tokens {max_tokens}" if max_tokens else ""
    rows = []
    with tempfile.TemporaryDirectory(prefix="frugal-quality-") as scratch:
        for config in tqdm(configs, desc="quality", unit="config", disable=not progress or None):
            source, quant, quantize_command = model, config.quant_config(), None
            if config.method == "gptq":
                source = str(Path(scratch) / config.label.replace(" ", "_"))
                quantize_checkpoint(model, source, quant, calibration, progress=False)
                quantize_command = (f"frugal quantize {model} OUT --bits {config.bits} --method gptq "
                                    f"--calib-data {calib_data} --calib-samples {calib_samples} "
                                    f"--calib-seq-len {calib_seq_len}"
                                    + (f" --group-size {config.group_size} --scheme {config.scheme}"
                                       if config.bits == 4 else ""))
                quant = None  # the checkpoint carries its own settings
            result = evaluate_perplexity(source, data, quantization=quant, dtype=config.dtype,
                                         context_len=context_len, stride=stride, max_tokens=max_tokens,
                                         progress=False, quant_activations=config.activations)
            command = (f"frugal eval perplexity {'OUT' if quantize_command else model} --data {data}{window} "
                       + (f"--dtype {config.dtype}" if quantize_command else config.cli_options()))
            rows.append({"config": config.label, "perplexity": result.perplexity,
                         "num_scored_tokens": result.num_scored_tokens, "tokens_per_s": result.tokens_per_s,
                         "command": command, "quantize_command": quantize_command})
            logger.info("%-22s perplexity %.3f", config.label, result.perplexity)
    baseline = next(row["perplexity"] for row in rows if row["config"] == "fp32")
    for row in rows:
        row["vs_fp32"] = row["perplexity"] / baseline - 1.0
    return {"model": model, "data": str(data), "calibration": str(calib_data), "context_len": context_len,
            "stride": stride, "max_tokens": max_tokens, "rows": rows}


def plot_quality(results: dict, png_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [row["config"] for row in rows]
    change = [100.0 * row["vs_fp32"] for row in rows]
    colors = ["tab:green" if (c <= 0.5 if "int8" in l else c <= 3.0) else "tab:red" for l, c in zip(labels, change)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(labels, change, color=colors)
    ax.axvline(0.5, color="grey", linestyle=":", label="INT8 limit +0.5%")
    ax.axvline(3.0, color="grey", linestyle="--", label="INT4 limit +3%")
    for y, c in enumerate(change):
        ax.text(c, y, f" {c:+.2f}%", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity change vs fp32 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path, name: str, title: str) -> tuple[Path, Path]:
    """results -> out_dir/name.json and out_dir/name.png (the bar chart)."""
    from frugal.bench.output import write_json_and_png

    return write_json_and_png(results, out_dir, name, lambda png: plot_quality(results, png, title))
