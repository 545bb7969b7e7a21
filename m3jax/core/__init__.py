"""Foundations: errors, storage (local or gs://), sharding, padding, scores, processes, XLA statistics."""
