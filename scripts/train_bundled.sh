#!/usr/bin/env bash
# Reproduces every bundled checkpoint under trdq_jax/assets/models/ (CPU, one run at a time).
# Usage: bash scripts/train_bundled.sh [name ...]   (default: all six, in dependency order)
# digits-pixart reads the text encoder that `python scripts/make_text_encoder.py` writes.
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(digits-classifier digits-dit moving-digits-classifier digits-unet moving-digits-vdit
                                 digits-pixart)
for name in "${names[@]}"; do
  echo "== $name ($(date -u +%H:%M:%S))"
  JAX_PLATFORMS=cpu trdq train --config "configs/${name//-/_}.py" --workdir "runs/$name" \
    --export "trdq_jax/assets/models/$name" --quiet
done
