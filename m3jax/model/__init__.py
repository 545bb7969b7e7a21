"""The encoder and its attention kernels; loading a model; encoding and scoring with it."""
