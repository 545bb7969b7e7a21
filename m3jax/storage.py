"""Writing files and directories so that a reader never sees half of them, and where m3jax caches things.

- `write_json(path, obj)`: the one JSON layout m3jax writes (2-space indent, sorted keys, UTF-8, final newline).
- `atomic_file(path)`: write a file through a temporary sibling renamed into place.
- `atomic_directory(out_dir, overwrite=..., error=...)`: build a whole directory (an export, a checkpoint in the
  bge-m3 layout) in a staging directory next to it and swap it in with renames, so that at every moment `out_dir`
  is absent, the old directory or the complete new one; a failure part way leaves the old one untouched.
- `ResumableOutput(path, settings)`: an output file built from numbered parts kept in a work directory next to it
  (`m3jax mine`, `m3jax score`): every part is written atomically, a restart with the same settings skips the parts
  that exist, and the output appears at the end, complete, through `atomic_file`.
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


class ResumableOutput:
    """An output file assembled from numbered parts, so that an interrupted job continues where it stopped.

        out = ResumableOutput("train_mined.jsonl", settings, overwrite=False, error=DataError)
        for i in range(n_parts):
            if not out.has_part(i):
                with out.part(i) as f: ...            # an atomic_file: a part is there complete or not at all
        out.finish(n_parts)                          # parts -> the output (atomic), work directory removed

    The work directory is the hidden sibling `.<output name>.m3jax-partial/`; it holds `settings.json` (what the job
    was started with: inputs, model, options), the parts and any other resume state (`path(name)`, written with
    `atomic_file`). A restart with the same settings resumes; with other settings it is refused unless `overwrite`,
    which discards the unfinished work. An existing output file is refused unless `overwrite` (it is replaced only
    when the new one is complete). Several processes may share one job: the `primary` one checks and creates the
    work directory; the others, started after it (a barrier), only check the settings.
    """

    def __init__(self, output: str, settings: dict, *, overwrite: bool = False,
                 error: type[M3JaxError] = M3JaxError, primary: bool = True):
        self.output = os.path.abspath(os.fspath(output))
        self.work_dir = os.path.join(os.path.dirname(self.output), f".{os.path.basename(self.output)}.m3jax-partial")
        self.error = error
        settings = json.loads(json.dumps(settings))  # the form it takes in settings.json
        settings_path = os.path.join(self.work_dir, "settings.json")
        if os.path.isdir(self.output):
            raise error(f"{self.output}: is a directory; expected an output file name")
        if not primary:
            if not os.path.isfile(settings_path) or _read_json(settings_path) != settings:
                raise error(f"{self.work_dir}: the primary process did not prepare this job's work directory")
            self.resumed = True
            return
        if os.path.exists(self.output) and not overwrite:
            raise error(f"{self.output}: exists; pass --overwrite (overwrite=True) to replace it")
        self.resumed = False
        if os.path.isdir(self.work_dir):
            previous = _read_json(settings_path) if os.path.isfile(settings_path) else None
            if previous == settings:
                self.resumed = True
            elif not overwrite:
                changed = sorted(k for k in set(settings) | set(previous or {})
                                 if (previous or {}).get(k) != settings.get(k))
                raise error(f"{self.work_dir}: an unfinished job with other settings (different: "
                            f"{', '.join(changed) or 'unreadable settings.json'}); rerun it with the same command to "
                            f"continue it, or pass --overwrite (overwrite=True) to discard it and start over")
            else:
                shutil.rmtree(self.work_dir)
        if not self.resumed:
            os.makedirs(self.work_dir)
            with atomic_file(settings_path) as f:
                json.dump(settings, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")

    def path(self, name: str) -> str:
        """A file of the work directory (resume state); write it with atomic_file."""
        return os.path.join(self.work_dir, name)

    def part_path(self, i: int) -> str:
        return self.path(f"part-{i:08d}")

    def has_part(self, i: int) -> bool:
        return os.path.isfile(self.part_path(i))

    def part(self, i: int, mode: str = "w"):
        """Write part i (atomic_file)."""
        return atomic_file(self.part_path(i), mode)

    def finish(self, n_parts: int) -> str:
        """Concatenate parts 0..n_parts-1 into the output (atomically) and remove the work directory."""
        missing = [i for i in range(n_parts) if not self.has_part(i)]
        if missing:
            raise self.error(f"{self.work_dir}: part {missing[0]} of {n_parts} is missing ({len(missing)} in all)")
        with atomic_file(self.output, "wb") as out:
            for i in range(n_parts):
                with open(self.part_path(i), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.output


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cache_dir(*parts: str) -> str:
    """Where m3jax caches token-length tables and compiled steps: $M3JAX_CACHE_DIR or ~/.cache/m3jax."""
    root = os.environ.get("M3JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "m3jax")
    return os.path.join(root, *parts)
