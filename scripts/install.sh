#!/usr/bin/env bash
# Create .venv at the repository root and install frugal into it (editable).
#   scripts/install.sh          runtime only
#   scripts/install.sh test     + what the tests need
#   scripts/install.sh bench    + what the benchmarks need
# CPU installs pin torch==2.13.0. A torch already importable in .venv (e.g. a CUDA build, or one seen
# through --system-site-packages) is kept: nothing here lets pip resolve an unpinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==2.13.0"
fi
TORCH_VERSION="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
# The constraint keeps pip from swapping the installed torch for another build.
echo "torch==${TORCH_VERSION}" > .venv/torch-constraint.txt
if [ -n "$extras" ]; then
  "${PIP[@]}" -c .venv/torch-constraint.txt -e ".[${extras}]"
else
  "${PIP[@]}" -c .venv/torch-constraint.txt -e .
fi
# Compile frugal's CPU kernels now (cached by torch); without a compiler frugal falls back to PyTorch.
.venv/bin/python -m frugal.quant.kernels || echo "frugal CPU kernels not built; the PyTorch fallback will be used"
