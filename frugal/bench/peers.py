"""`frugal bench peers MODEL`: frugal next to llama.cpp and HF transformers on the same checkpoint, in the
same run, on the same machine, same thread count.

Steps: measure the read bandwidth; convert the checkpoint to GGUF with our own converter
(`gguf_convert`, BF16 by default) and quantize it to Q8_0 / Q4_0 with llama.cpp's quantizer; write
frugal's INT8 / INT4 checkpoints with `frugal quantize` (so both engines load pre-quantized files and
peak RSS is not inflated by a 16-bit source being quantized at load); then run,
each in its own process (so each peak RSS is its own): frugal bf16 / int8 / int4, llama.cpp BF16 / Q8_0 /
Q4_0 (llama-cpp-python, `use_extra_bufts=False`, see `llama_cpp_runner`), HF transformers bf16. Every
row gets prefill and decode tokens/s, peak RSS, bytes read per decoded token and the fraction of the
roofline (decode tokens/s x bytes per token / bandwidth; `roofline_fraction_vs_observed` divides by the
best bandwidth any row reached instead, where that beats the probe); `ratios` compares like with like
(INT4 : Q4_0, INT8 : Q8_0, bf16 : BF16 and : HF).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from frugal.errors import FrugalError

logger = logging.getLogger(__name__)

LLAMA_CPP_NOTE = ("llama.cpp via llama-cpp-python (the installed build: version and llama.cpp's system info are in "
                  "llama_cpp_build). Rows without a suffix load the model with use_extra_bufts=False, as the issue "
                  "prescribes: the registry build crashes on Q4_0 on AMX CPUs (GCC 12 miscompiles llama.cpp's AMX "
                  "tile set-up) and the flag turns the AMX/extra-buffer repacking off. That flag also turns off "
                  "llama.cpp's CPU weight repacking (Q4_0x8 kernels), so rows marked '+repack' run llama.cpp's "
                  "default (extra buffers on) where it does not crash; the stronger llama.cpp row is the one to "
                  "compare with")
# (frugal row label, peer row label) pairs whose ratio the report carries.
COMPARISONS = (("frugal int4-g32-sym", "llama.cpp Q4_0"), ("frugal int4-g32-sym", "llama.cpp Q4_0+repack"),
               ("frugal int4-g32-sym exact-act", "llama.cpp Q4_0"),
               ("frugal int4-g32-sym exact-act", "llama.cpp Q4_0+repack"),
               ("frugal int4-g32-sym compiled", "llama.cpp Q4_0"), ("frugal int4-g32-sym compiled", "llama.cpp Q4_0+repack"),
               ("frugal int4-g32-sym eager", "llama.cpp Q4_0"), ("frugal int4-g32-sym eager", "llama.cpp Q4_0+repack"),
               ("frugal int8", "llama.cpp Q8_0"), ("frugal int8", "llama.cpp Q8_0+repack"),
               ("frugal bf16", "llama.cpp BF16"), ("frugal bf16", "llama.cpp BF16+repack"),
               ("frugal bf16", "llama.cpp F16"), ("frugal bf16", "hf bf16"))


def ensure_llama_cpp(install: bool) -> None:
    """Import llama_cpp and gguf, installing them from the package registry when missing and allowed."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        if not install:
            raise FrugalError("llama-cpp-python and gguf are not installed; `pip install llama-cpp-python gguf` "
                              "(the bench extra) or drop --no-install") from None
    constraint = Path(sys.prefix) / "torch-constraint.txt"
    command = [sys.executable, "-m", "pip", "install", "llama-cpp-python", "gguf"]
    if constraint.is_file():
        command[4:4] = ["-c", str(constraint)]
    logger.warning("installing llama-cpp-python from the package registry (builds llama.cpp from source: "
                   "several minutes): %s", " ".join(command))
    subprocess.run(command, check=True)


def prepare_gguf(model_dir: Path, work_dir: Path, types: list[str], threads: int) -> dict[str, Path]:
    """-> {type: gguf path} for 'F16' / 'BF16' / 'F32' (our converter) and 'Q8_0' / 'Q4_0' (llama.cpp's
    quantizer, from the F16 file unless only BF16 is wanted); reuses files already in work_dir."""
    from frugal.bench.gguf_convert import convert_to_gguf, quantize_gguf

    work_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    float_types = [t for t in types if t in ("F16", "BF16", "F32")]
    source_type = float_types[0] if float_types else "F16"
    for kind in dict.fromkeys(float_types + [source_type]):
        path = work_dir / f"{model_dir.name}-{kind}.gguf"
        if not path.is_file():
            logger.info("converting %s to GGUF %s", model_dir, kind)
            convert_to_gguf(model_dir, path, kind)
        paths[kind] = path
    for kind in (t for t in types if t not in ("F16", "BF16", "F32")):
        path = work_dir / f"{model_dir.name}-{kind}.gguf"
        if not path.is_file():
            logger.info("quantizing %s to %s with llama.cpp", paths[source_type].name, kind)
            quantize_gguf(paths[source_type], path, kind, threads)
        paths[kind] = path
    return {t: paths[t] for t in types}


def prepare_frugal(model_dir: Path, work_dir: Path, quant: str) -> Path:
    """The checkpoint frugal runs for `quant` ('bf16' = the model itself; 'int4' / 'int8' written once
    into work_dir with frugal's defaults, reused afterwards)."""
    from frugal.quant.config import QuantConfig
    from frugal.quant.convert import quantize_checkpoint

    if quant in ("none", "bf16"):
        return model_dir
    path = work_dir / f"{model_dir.name}-frugal-{quant}"
    if not (path / "config.json").is_file():
        logger.info("writing frugal %s checkpoint %s", quant, path)
        quantize_checkpoint(model_dir, path, QuantConfig.create(quant), progress=False)
    return path


def run_peers(model_dir: Path, work_dir: Path, prompt_len: int, gen_len: int, repeats: int, threads: int,
              command: str, frugal_quants: list[str], llama_types: list[str], with_hf: bool,
              install: bool = True, llama_repack: bool = True) -> dict:
    from frugal.bench.decode import machine_description, random_prompt
    from frugal.bench.roofline import roofline_fraction
    from frugal.bench.worker import run_in_subprocess
    from frugal.model.arch_config import load_arch_config

    if llama_types:
        ensure_llama_cpp(install)
    arch = load_arch_config(model_dir)
    prompt = random_prompt(prompt_len, arch.vocab_size)
    ggufs = prepare_gguf(model_dir, work_dir, llama_types, threads) if llama_types else {}
    base = {"model": str(model_dir), "prompt": prompt, "gen_len": gen_len, "repeats": repeats, "threads": threads}
    bandwidths = [run_in_subprocess({"engine": "bandwidth", "threads": threads})]
    rows = []
    for config in frugal_quants:
        # 'int4', 'int4-exact' (exact activations), 'bf16-compile' (torch.compile'd decode), ...
        quant, *options = config.split("-")
        exact, compiled, eager = "exact" in options, "compile" in options, "eager" in options
        logger.info("running frugal %s", config)
        checkpoint = prepare_frugal(model_dir, work_dir, quant)
        row = run_in_subprocess({**base, "model": str(checkpoint), "engine": "frugal", "dtype": "bfloat16",
                                 "quant_activations": "exact" if exact else "int8", "compile": compiled,
                                 "native_decode": not eager})
        row["label"] = (("frugal bf16" if quant in ("none", "bf16") else f"frugal {row['quantization']}")
                        + (" exact-act" if exact else "") + (" compiled" if compiled else "")
                        + (" eager" if eager else ""))
        rows.append(row)
    failures, llama_build = [], None
    for kind, path in ggufs.items():
        for extra_bufts in (False, True) if llama_repack else (False,):
            label = f"llama.cpp {kind}" + ("+repack" if extra_bufts else "")
            logger.info("running %s", label)
            try:
                row = run_in_subprocess({**base, "engine": "llama.cpp", "gguf": str(path), "label": kind,
                                         "extra_bufts": extra_bufts})
            except RuntimeError as exc:  # e.g. the AMX segfault the note describes
                logger.warning("%s failed: %s", label, exc)
                failures.append({"label": label, "error": str(exc)[-2000:]})
                continue
            row["label"] = label
            row["extra_bufts"] = extra_bufts
            rows.append(row)
            llama_build = llama_build or row.pop("llama_cpp_build", None)
    if with_hf:
        logger.info("running HF transformers bf16")
        row = run_in_subprocess({**base, "engine": "hf", "dtype": "bfloat16"})
        row["label"] = "hf bf16"
        rows.append(row)
    bandwidths.append(run_in_subprocess({"engine": "bandwidth", "threads": threads}))
    bandwidth = max(b["bandwidth_gb_s"] for b in bandwidths)
    # The probe can under-read the machine (llama.cpp BF16 has streamed ~39 GB/s where the probe saw 33):
    # a second, stricter roofline uses the best bandwidth any engine reached in this run.
    observed = max([bandwidth] + [row["decode_tokens_per_s"] * row["decode_bytes_per_token"] / 1e9 for row in rows])
    for row in rows:
        row["roofline_fraction"] = roofline_fraction(row["decode_tokens_per_s"], row["decode_bytes_per_token"],
                                                     bandwidth)
        row["roofline_tokens_per_s"] = bandwidth * 1e9 / row["decode_bytes_per_token"]
        row["roofline_fraction_vs_observed"] = roofline_fraction(row["decode_tokens_per_s"],
                                                                 row["decode_bytes_per_token"], observed)
    by_label = {row["label"]: row for row in rows}
    ratios = {}
    for ours, peer in COMPARISONS:
        if ours in by_label and peer in by_label:
            ratios[f"{ours} / {peer}"] = {
                key: by_label[ours][key] / by_label[peer][key]
                for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes") if by_label[peer][key]}
    if "frugal int4-g32-sym" in by_label and "frugal bf16" in by_label:
        ratios["frugal int4-g32-sym / frugal bf16"] = {
            "peak_rss_bytes": by_label["frugal int4-g32-sym"]["peak_rss_bytes"] / by_label["frugal bf16"]["peak_rss_bytes"]}
    for row in rows:
        row.pop("output_token_ids", None)
        row.pop("llama_cpp_build", None)
    return {"command": command, "model": str(model_dir), "prompt_len": prompt_len, "gen_len": gen_len,
            "repeats": repeats, "threads": threads, "machine": machine_description(),
            "bandwidth": {"bandwidth_gb_s": bandwidth, "measurements": bandwidths,
                          "best_observed_gb_s": observed},
            "llama_cpp_note": LLAMA_CPP_NOTE if llama_types else None, "llama_cpp_build": llama_build,
            "runs": rows, "ratios": ratios, "failures": failures}
