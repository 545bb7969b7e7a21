"""Export an m3jax training checkpoint to the bge-m3 Hugging Face layout (same as `m3jax export`).

    python scripts/export_to_hf.py --checkpoint runs/toy --output runs/toy_export [--step N] [--pytorch-bin]
        [--heads-dtype float32|float16] [--base-model DIR] [--overwrite]
"""
import sys

from m3jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
