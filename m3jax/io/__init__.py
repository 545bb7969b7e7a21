"""Files of a model: the Hugging Face layout (read, write), m3jax run checkpoints, tiny test checkpoints."""
