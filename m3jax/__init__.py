"""m3jax: BGE-M3 unified fine-tuning (dense + sparse + ColBERT) in JAX/Flax.

    from m3jax import BGEM3FlagModel   # FlagEmbedding's inference API on the JAX model
    from m3jax import FlagReranker     # FlagEmbedding's cross-encoder reranker API (bge-reranker-v2-m3 layout)
"""
from m3jax.model.inference import BGEM3FlagModel, FlagReranker

__version__ = "0.1.0"
__all__ = ["BGEM3FlagModel", "FlagReranker"]
