#!/usr/bin/env bash
# Measure the trained zoo models and write their model cards (README.md + card.json in each model dir):
# WikiText-2 test perplexity, samples, and per model the draft's agreement with the target, relu's
# zero-activation fraction per layer, moe's expert load per layer. Run when training has finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
FRUGAL="${FRUGAL:-.venv/bin/frugal}"
"$FRUGAL" train eval models/target --write-card "$@"
"$FRUGAL" train eval models/draft --target models/target --write-card "$@"
for name in relu moe; do
  if [ -f "models/$name/training.json" ]; then
    "$FRUGAL" train eval "models/$name" --write-card "$@"
  fi
done
