"""Export an m3jax training checkpoint to the bge-m3 Hugging Face layout (same as `m3jax export`).

    python scripts/export_to_hf.py --checkpoint runs/toy --output runs/toy_export [--step N] [--pytorch-bin]
        [--heads-dtype float32|float16] [--base-model DIR] [--overwrite]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

from m3jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
