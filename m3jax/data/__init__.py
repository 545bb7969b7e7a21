"""Training data: files, the seeded batch plan, the grain pipeline."""
