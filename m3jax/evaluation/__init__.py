"""Retrieval evaluation: eval files, exact search, IR metrics, and choosing the best checkpoint."""
