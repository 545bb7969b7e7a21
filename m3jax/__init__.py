"""m3jax: BGE-M3 unified fine-tuning (dense + sparse + ColBERT) in JAX/Flax."""
__version__ = "0.1.0"
