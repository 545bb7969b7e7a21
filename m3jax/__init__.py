"""m3jax: BGE-M3 unified fine-tuning (dense + sparse + ColBERT) in JAX/Flax.

    from m3jax import BGEM3FlagModel   # FlagEmbedding's inference API on the JAX model
    from m3jax import FlagReranker     # FlagEmbedding's cross-encoder reranker API (bge-reranker-v2-m3 layout)
"""
__version__ = "0.1.0"
__all__ = ["BGEM3FlagModel", "FlagReranker"]


def __getattr__(name):  # lazy, so `import m3jax.hf_io` does not pull in jax
    if name in __all__:
        from m3jax import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'm3jax' has no attribute {name!r}")
