"""Benchmarks of m3jax (not part of the installed package): run them from the repository root.

    python -m benchmarks.train_step ...        the real train step, timed or analysed (JSON lines)
    python benchmarks/torch_reference.py ...   our PyTorch reference step (FlagEmbedding's computation)
    python -m benchmarks.data_pipeline ...     throughput of the training data pipeline
    bash benchmarks/device_bench.sh            the prepared accelerator run of the first two

What a user imports (compiled memory, trip-weighted matmul FLOPs, max-batch search) is in m3jax.core.xla_stats.
Figures and commands: BENCHMARKS.md.
"""
