"""Writing files and directories so that a reader never sees half of them, and where m3jax caches things.

- `write_json(path, obj)`: the one JSON layout m3jax writes (2-space indent, sorted keys, UTF-8, final newline).
- `atomic_file(path)`: write a file through a temporary sibling renamed into place.
- `atomic_directory(out_dir, overwrite=..., error=...)`: build a whole directory (an export, a checkpoint in the
  bge-m3 layout) in a staging directory next to it and swap it in with renames, so that at every moment `out_dir`
  is absent, the old directory or the complete new one; a failure part way leaves the old one untouched.
- `cache_dir(*parts)`: `$M3JAX_CACHE_DIR` (default `~/.cache/m3jax`) joined with parts.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from m3jax.errors import M3JaxError


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; it replaces `path` when the block ends without error."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_dir(out_dir: str, overwrite: bool, error: type[M3JaxError] = M3JaxError) -> None:
    """`out_dir` may be absent or an empty directory; a non-empty one only with overwrite."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise error(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise error(f"{out_dir}: directory exists and is not empty; pass --overwrite (overwrite=True) to "
                        f"replace it")


@contextlib.contextmanager
def atomic_directory(out_dir, *, overwrite: bool = False, error: type[M3JaxError] = M3JaxError) -> Iterator[str]:
    """Yield an empty staging directory; when the block ends without error it becomes `out_dir`.

    The staging directory is a hidden sibling of `out_dir` (same filesystem, so the swap is two renames). An
    existing non-empty `out_dir` is refused with `error` unless `overwrite`; it is checked again just before the
    swap, since it may have appeared meanwhile. Nothing is left behind on failure.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_dir(out_dir, overwrite, error)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.staging-", dir=parent)
    try:
        new = os.path.join(staging, "new")
        os.mkdir(new)
        yield new
        check_output_dir(out_dir, overwrite, error)
        old = None
        if os.path.exists(out_dir):
            old = os.path.join(staging, "old")
            os.rename(out_dir, old)
        try:
            os.rename(new, out_dir)
        except BaseException:
            if old is not None:  # put the previous contents back
                os.rename(old, out_dir)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cache_dir(*parts: str) -> str:
    """Where m3jax caches token-length tables and compiled steps: $M3JAX_CACHE_DIR or ~/.cache/m3jax."""
    root = os.environ.get("M3JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "m3jax")
    return os.path.join(root, *parts)
