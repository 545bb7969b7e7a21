"""The `m3jax` command: one module per command, `main` on top."""
