"""`frugal quantize MODEL_DIR OUT_DIR --bits 4|8 [--group-size] [--scheme] [--method rtn|gptq]` and the
`--quantization` options shared by `frugal eval perplexity` / `frugal bench decode|prefill`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("frugal.cli")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = REPO_ROOT.parent / "shared" / "data" / "wikitext2_valid_test" / "valid.txt"


def add_quant_options(parser: argparse.ArgumentParser, with_bits: bool) -> None:
    """--bits (or --quantization), --group-size, --scheme, --embedding-bits, --lm-head-bits."""
    group = parser.add_argument_group("quantization")
    if with_bits:
        group.add_argument("--bits", type=int, choices=[4, 8], required=True)
    else:
        group.add_argument("--quantization", default=None, choices=["none", "int4", "int8"],
                           help="quantize the 16-bit checkpoint while loading it (default: none, or the "
                                "checkpoint's own quantization)")
    group.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                       help="INT4 input features per scale (default 32)")
    group.add_argument("--scheme", default=None, choices=["sym", "asym"], help="INT4 zero point (default sym)")
    group.add_argument("--embedding-bits", type=int, default=None, choices=[4, 8, 16],
                       help="default 8; 4 needs INT4 layers and an untied head")
    group.add_argument("--lm-head-bits", type=int, default=None, choices=[4, 8, 16],
                       help="default 8; 4 needs INT4 layers and an untied head")


def add_quant_activations_option(parser) -> None:
    """--quant-activations, shared by the engine commands, `eval perplexity` and `bench decode|prefill`."""
    parser.add_argument("--quant-activations", default="int8", choices=["int8", "exact"],
                        help="INT4/INT8 weights on CPU: round activations to INT8 per 32-block for the VNNI "
                             "kernels (default, as llama.cpp), or keep them in the model dtype (exact, slower)")


def quant_config_from_args(args: argparse.Namespace, method: str = "rtn"):
    """QuantConfig (or None) from add_quant_options' arguments; validated by QuantConfig itself."""
    from frugal.quant.config import QuantConfig

    bits = getattr(args, "bits", None)
    name = f"int{bits}" if bits else getattr(args, "quantization", None)
    overrides = {key: getattr(args, key) for key in ("group_size", "scheme", "embedding_bits", "lm_head_bits")
                 if getattr(args, key, None) is not None}
    if method != "rtn":
        overrides["method"] = method
    return QuantConfig.create(name, **overrides)


def add_quantize_parser(sub) -> None:
    quantize = sub.add_parser("quantize", help="write an INT4/INT8 weight-only checkpoint")
    quantize.add_argument("model_dir", help="16-bit checkpoint directory")
    quantize.add_argument("out_dir", help="where to write the quantized checkpoint (new or empty)")
    add_quant_options(quantize, with_bits=True)
    calib = quantize.add_argument_group("calibration (--method gptq)")
    calib.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                       help="rtn: round to nearest; gptq: error-compensating calibration (Frantar et al. 2022)")
    calib.add_argument("--calib-data", default=str(DEFAULT_CALIBRATION), help="calibration text file")
    calib.add_argument("--calib-samples", type=int, default=8, help="number of token windows")
    calib.add_argument("--calib-seq-len", type=int, default=128, help="tokens per window")
    calib.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    quantize.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from frugal.quant.convert import quantize_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    config = quant_config_from_args(args, args.method)
    calibration = None
    if args.method == "gptq":
        from frugal.quant.gptq import CalibrationConfig

        calibration = CalibrationConfig(Path(args.calib_data), args.calib_samples, args.calib_seq_len)
    out = quantize_checkpoint(Path(args.model_dir), Path(args.out_dir), config, calibration)
    logger.info("wrote %s (%s)", out, config.name)
    print(out)
    return 0
