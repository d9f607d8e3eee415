"""`python -m frugal.quant.kernels`: build (or find cached) the CPU kernels and say which path runs."""

from __future__ import annotations

import logging
import sys

from frugal.quant.kernels import cpu_kernels


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = cpu_kernels()
    if module is None:
        logging.getLogger(__name__).warning("frugal CPU kernels unavailable; the PyTorch fallback will be used")
        return 0
    logging.getLogger(__name__).info("frugal CPU kernels ready (%s); AVX512-BF16 fast path: %s",
                                     module.__file__, module.has_fast_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
