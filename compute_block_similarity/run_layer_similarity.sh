#!/usr/bin/env bash
# Scan the embedded default (SmolLM2-135M-Instruct on Python stdlib docstrings) with no Hub access.
# Any argument given here overrides the default of the same flag, e.g.:
#   bash compute_block_similarity/run_layer_similarity.sh --model_path mistralai/Mistral-7B-Instruct-v0.2 \
#        --dataset arcee-ai/sec-data-mini --dataset_column text --batch_size 8 --max_length 1024 \
#        --layers_to_skip 8 --dataset_size 4000 --dataset_subset train
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
exec python -m compute_block_similarity \
  --dataset python-stdlib-docs --dataset_size 256 --batch_size 16 --max_length 256 \
  --layers_to_skip 4 --output_dir scan "$@"
