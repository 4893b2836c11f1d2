#!/usr/bin/env bash
# The main job, on a fresh machine: set up .venv, scan the embedded SmolLM2-135M-Instruct on the
# embedded calibration text, choose the block by real loss among the scan's candidates (--select race)
# and write sliced.yml, run `mergekit-yaml sliced.yml out/`, bridge the cut (repair), verify out/.
# Extra arguments go to the scan (e.g. --layers_to_skip 6).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
bash compute_block_similarity/run_layer_similarity.sh --output_dir scan "$@"
# choose by real loss on 128 of the scan's 256 texts (keeps the main job under 5 minutes on 2 CPU cores)
python -m slice_with_mergekit --scan scan/block_distances.json --output sliced.yml --select_texts 128
mergekit-yaml sliced.yml out/
python -m slice_with_mergekit repair out/ --plan sliced.yml      # least-squares bridge over the cut, no training
python -m slice_with_mergekit verify out/ --plan sliced.yml
cat <<TXT

Done.
  scan results : $ROOT/scan/  (layer_distances.csv, block_distances.json, block_distances.png)
  merge config : $ROOT/sliced.yml  (the choice's evidence: sliced.select.json)
  pruned model : $ROOT/out/
TXT
