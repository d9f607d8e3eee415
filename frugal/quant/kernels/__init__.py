"""Our CPU kernels (`csrc/int4_cpu.cpp`, `csrc/dense_cpu.cpp`: INT4/INT8/BF16 linear; `csrc/fused_cpu.cpp`:
RMSNorm, rotary, SiLU-and-mul and decode attention as `torch.ops.frugal.*`; `csrc/dispatcher_ops.cpp`: the
linears and the paged KV write as `torch.ops.frugal.*` too, for torch.compile), compiled once as a torch
extension, with a pure-PyTorch fallback.

`cpu_kernels()` returns the compiled module, or None when it cannot be built here (no compiler, not
x86-64, `FRUGAL_NO_KERNELS=1`); callers then dequantise and call `F.linear`, which is also the oracle
the kernels are tested against. The build happens on first use (or ahead of time with
`python -m frugal.quant.kernels`, which `scripts/install.sh` runs) and is cached by torch under
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`) in a directory named after the sources'
hash.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [_CSRC / name for name in ("module.cpp", "int4_cpu.cpp", "vnni_cpu.cpp", "dense_cpu.cpp", "fused_cpu.cpp",
                                       "decode_attention_cpu.cpp", "decode_attention_amx.cpp",
                                       "dispatcher_ops.cpp", "decode_stack.cpp")]
HEADERS = [_CSRC / name for name in ("common.h", "kernel_ops.h", "simd_math.h", "work_sharing.h",
                                     "decode_attention_amx.h")]
EXTENSION_NAME = "frugal_cpu_kernels"
# -fopenmp: at::parallel_for is inline OpenMP, so without it every kernel would run on one thread (the
# runtime is the libgomp torch has already loaded: same soname). -ffp-contract=off: no FMA contraction in
# the ops that reproduce eager PyTorch's rounding.
CFLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]


@functools.cache
def cpu_kernels():
    """The compiled kernel module, or None (then every path falls back to dequantise + F.linear)."""
    if os.environ.get("FRUGAL_NO_KERNELS", "") not in ("", "0"):
        logger.info("FRUGAL_NO_KERNELS set: using the PyTorch fallback")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("no frugal CPU kernels for %s: using the PyTorch fallback", platform.machine())
        return None
    try:
        from torch.utils.cpp_extension import load

        # The name carries the sources' hash: every version builds in its own directory, so a process
        # never picks up an object file compiled from an older source (ninja's mtimes can race).
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + repr(CFLAGS).encode()).hexdigest()
        module = load(name=f"{EXTENSION_NAME}_{digest[:12]}", sources=[str(p) for p in SOURCES],
                      extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as exc:  # noqa: BLE001 — a missing compiler must not stop inference
        logger.warning("could not build frugal CPU kernels (%s: %s); using the slower PyTorch fallback",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    if not module.has_fast_path():
        logger.info("this CPU lacks AVX512-BF16: frugal kernels dequantise and call the BLAS for every batch")
    return module
