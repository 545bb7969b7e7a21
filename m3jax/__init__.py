"""m3jax: BGE-M3 unified fine-tuning (dense + sparse + ColBERT) in JAX/Flax.

    from m3jax import BGEM3FlagModel   # FlagEmbedding's inference API on the JAX model
"""
__version__ = "0.1.0"
__all__ = ["BGEM3FlagModel"]


def __getattr__(name):  # lazy, so `import m3jax.hf_io` does not pull in jax
    if name == "BGEM3FlagModel":
        from m3jax.inference import BGEM3FlagModel
        return BGEM3FlagModel
    raise AttributeError(f"module 'm3jax' has no attribute {name!r}")
