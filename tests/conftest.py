"""Shared fixtures: tiny random bge-m3 checkpoints built once per test session (m3jax.io.tiny_checkpoint).

The returned directories are shared between tests: treat them as read-only and copy one before changing it.

Test stacks (.ci/run): tests that compare with FlagEmbedding carry the `needs_flagembedding` marker. Where
FlagEmbedding does not import (the "latest" stack: transformers 5), they are deselected and the run says how many;
with M3JAX_STACK=pinned (the parity stack) FlagEmbedding must import and none of them may be skipped.
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns (and may deadlock) after fork
# Eight simulated CPU devices for the multi-device tests; must be set before jax is first imported. Single-device
# code runs on the first one; tests that need a mesh take jax.devices()[:n].
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FLAGEMBEDDING = "needs_flagembedding"
_PINNED = os.environ.get("M3JAX_STACK") == "pinned"
_DESELECTED = pytest.StashKey[tuple]()  # (number of needs_flagembedding tests deselected, the import error)


def _flagembedding_import_error() -> str | None:
    try:
        import FlagEmbedding  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- under transformers 5 FlagEmbedding 1.4 fails with various errors
        return f"{type(e).__name__}: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker(FLAGEMBEDDING)]
    if not marked:
        return
    error = _flagembedding_import_error()
    if error is None:
        return
    if _PINNED:
        raise pytest.UsageError(f"M3JAX_STACK=pinned but FlagEmbedding does not import ({error}): the pinned stack "
                                f"must run the {len(marked)} {FLAGEMBEDDING} tests")
    config.hook.pytest_deselected(items=marked)
    items[:] = [item for item in items if not item.get_closest_marker(FLAGEMBEDDING)]
    config.stash[_DESELECTED] = (len(marked), error)
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: the controller prints the line
        config.workeroutput[FLAGEMBEDDING] = (len(marked), error)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # pytest-xdist controller
    if FLAGEMBEDDING in getattr(node, "workeroutput", {}):
        node.config.stash[_DESELECTED] = tuple(node.workeroutput[FLAGEMBEDDING])


def pytest_terminal_summary(terminalreporter, config):
    if _DESELECTED in config.stash:
        n, error = config.stash[_DESELECTED]
        terminalreporter.write_line(f"{n} {FLAGEMBEDDING} tests deselected: FlagEmbedding does not import ({error})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _PINNED and report.skipped and item.get_closest_marker(FLAGEMBEDDING):
        report.outcome = "failed"
        report.longrepr = f"M3JAX_STACK=pinned: {FLAGEMBEDDING} test skipped ({report.longrepr})"


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(**make_tiny_checkpoint options) -> path; one build per distinct set of options."""
    from m3jax.io.tiny_checkpoint import make_tiny_checkpoint

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
