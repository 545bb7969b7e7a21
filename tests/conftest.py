"""Shared fixtures: tiny random bge-m3 checkpoints built once per test session (m3jax.tiny_checkpoint).

The returned directories are shared between tests: treat them as read-only and copy one before changing it.
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns (and may deadlock) after fork
# Eight simulated CPU devices for the multi-device tests; must be set before jax is first imported. Single-device
# code runs on the first one; tests that need a mesh take jax.devices()[:n].
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(**make_tiny_checkpoint options) -> path; one build per distinct set of options."""
    from m3jax.tiny_checkpoint import make_tiny_checkpoint

    cache = {}

    def make(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt", **options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_ckpt):
    """The default tiny checkpoint, with pytorch_model.bin next to model.safetensors and fp16 heads like bge-m3."""
    return make_ckpt(pytorch_bin=True, heads_dtype="float16")
