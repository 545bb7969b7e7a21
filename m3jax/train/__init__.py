"""The training step: losses, optimizer, step, metrics log, compile-time planning."""
