"""PruneMe's entry point, kept so existing commands work: `python layer_similarity.py --model_path ...`."""

import sys

from compute_block_similarity.cli import main

if __name__ == "__main__":
    sys.exit(main())
