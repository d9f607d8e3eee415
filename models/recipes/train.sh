#!/usr/bin/env bash
# Reproduce one model of the zoo, then measure it and write its model card:
#   models/recipes/train.sh target|draft|relu|moe [more `frugal train lm` options, e.g. --resume, --threads 1]
# The draft's card measures agreement with models/target, so train the target first.
set -euo pipefail
cd "$(dirname "$0")/../.."
name="$1"; shift
FRUGAL="${FRUGAL:-.venv/bin/frugal}"
D=../shared/data/english_text_nltk2008
if [ ! -f models/tokenizer/tokenizer.json ]; then
  "$FRUGAL" train tokenizer --vocab-size 8192 --out models/tokenizer --data "$D/gutenberg" "$D/state_union" \
    "$D/inaugural" "$D/abc" "$D/webtext" "$D/reuters/reuters_training.txt" "$D/reuters/reuters_test.txt" \
    ../shared/data/tinyshakespeare/input.txt
fi
"$FRUGAL" train lm --config "models/recipes/$name.toml" --out "models/$name" --no-progress "$@"
target=()
if [ "$name" = draft ]; then target=(--target models/target); fi
"$FRUGAL" train eval "models/$name" "${target[@]}" --write-card
