"""Benchmark of the real train step (same as `m3jax bench`): JSON lines with the PyTorch reference's fields.

    python scripts/benchmark.py                                    # bge-m3 at the three default shapes
    python scripts/benchmark.py --tiny --shapes 2x2:16:32          # a tiny model (CPU)
    python scripts/benchmark.py --analyze --shapes 32x8:64:256     # XLA memory / FLOP analysis, compile only
    python scripts/benchmark.py --find-max-batch 8x8:512:8192      # largest per-device batch that fits

All options: python scripts/benchmark.py --help; figures and commands: BENCHMARKS.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m3jax.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
