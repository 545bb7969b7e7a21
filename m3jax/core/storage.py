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

Local paths and URLs. Every path a run reads or writes may be a local path or a URL that etils.epath reaches
(`gs://bucket/...` through gcsfs, `s3://` through s3fs, ...): `is_url`, `resolve` (a local path made absolute, a
URL as given), `join`, `basename`, `dirname`, `exists`, `isdir`, `isfile`, `listdir`, `makedirs`, `getsize`,
`read_bytes`, `write_bytes`, `open_text`, `open_binary`, `list_files` are `os.path` / `open` on a local path and
epath on a URL, so local paths behave exactly as before and no `os.path` function ever sees a URL.
Object stores have no rename, so on a URL:
- `write_bytes` / `write_json` / `atomic_file` write an object in one PUT (a single-object PUT is atomic on GCS and
  S3: a reader sees the old object or the new one);
- `atomic_directory` builds the directory locally, then uploads it file by file with `last` (e.g. the export's
  m3jax_export.json) uploaded after every other file: that file is the commit marker, a reader that sees it sees the
  whole directory; an overwritten directory's old objects are deleted first;
- Orbax writes checkpoint steps itself (on gs:// it writes `<step>/commit_success.txt` last, its commit marker).
Inputs read many times or by byte offset are copied to the local cache first: `stage(url)` downloads a file or a
directory once per host (keyed by the URL and its objects' sizes and times, so a changed input is fetched again)
into `cache_dir("staged", ...)` and logs where.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from m3jax.core.errors import M3JaxError

logger = logging.getLogger(__name__)


class StorageError(M3JaxError, OSError):
    """A URL m3jax cannot reach (a missing client library, an unsupported scheme); the message names the path."""


# ---------------------------------------------------------------------------------------------------------------
# Local paths and URLs

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The fsspec module epath needs for a scheme (epath uses fsspec when TensorFlow is not installed), and what to
# install for it: gcsfs is m3jax's `gcs` extra, not a dependency (a run on local disks never imports it).
_FSSPEC_PACKAGES = {"gs": ("gcsfs", "m3jax[gcs]"), "s3": ("s3fs", "s3fs"), "az": ("adlfs", "adlfs")}


def is_url(path) -> bool:
    """Whether `path` is a URL (`gs://...`, `s3://...`) rather than a local path."""
    return isinstance(path, str | os.PathLike) and bool(_URL_RE.match(os.fspath(path)))


def resolve(path) -> str:
    """A local path made absolute; a URL as given, without trailing slashes."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def basename(path) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def missing_client(url) -> str | None:
    """Why m3jax cannot reach the URL `url` in this environment (its scheme's client library is not installed:
    the message names the URL and the pip command), or None (a local path, or the library imports)."""
    if not is_url(url):
        return None
    scheme = os.fspath(url).split("://", 1)[0]
    if scheme not in _FSSPEC_PACKAGES:
        return None
    module, package = _FSSPEC_PACKAGES[scheme]
    try:
        __import__(module)
    except ImportError:
        return f"{url}: {scheme}:// paths need the {module} package: pip install '{package}'"
    return None


def epath_of(url):
    """The etils.epath.Path of a URL, with a clear error when the scheme's client library is missing."""
    from etils import epath

    problem = missing_client(url)
    if problem:
        raise StorageError(problem)
    if os.fspath(url).startswith("gs://"):
        _no_stale_gcs_listings()
    return epath.Path(url)


def _no_stale_gcs_listings() -> None:
    """gcsfs caches directory listings for the life of the process by default; checkpoints and other processes'
    files appear in a run's directories meanwhile, so m3jax's gs:// filesystem lists afresh every time."""
    import fsspec

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def exists(path) -> bool:
    return epath_of(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return epath_of(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    p = epath_of(path)
    return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
    """The names in a directory (on an object store: the next level of names under the prefix)."""
    if not is_url(path):
        return os.listdir(path)
    return sorted({p.name for p in epath_of(path).iterdir()} - {""})


def makedirs(path) -> None:
    """os.makedirs(exist_ok=True) for a local path; nothing for a URL (object stores have no directories)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path) -> bytes:
    if is_url(path):
        return epath_of(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Write a whole file; on a URL one PUT (atomic: readers see the old object or the new one)."""
    if is_url(path):
        epath_of(path).write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def getsize(path) -> int:
    return epath_of(path).stat().length if is_url(path) else os.path.getsize(path)


def open_binary(path):
    """A file opened for reading bytes, local or URL (streamed)."""
    return epath_of(path).open("rb") if is_url(path) else open(path, "rb")  # noqa: SIM115 (the caller closes it)


def open_text(path):
    """A text file opened for reading (UTF-8), local or URL (streamed)."""
    if is_url(path):
        return epath_of(path).open("r", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 (the caller closes it)


def remove_tree(path) -> None:
    """Delete a directory (a local tree, or every object under a URL prefix); absent is fine."""
    if is_url(path):
        p = epath_of(path)
        if p.exists():
            p.rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _object_version(info: dict) -> str:
    """What changes when an object is rewritten (GCS generation, S3 ETag, a modification time)."""
    for key in ("generation", "ETag", "etag", "updated", "LastModified", "mtime"):
        if info.get(key):
            return str(info[key])
    return ""


def _list_objects(url: str) -> list[tuple[str, int, str]]:
    """(relative path, size, version) of the object `url` ('' as its path) or of every object under the directory
    `url`, sorted; one listing request through fsspec (the filesystem epath uses)."""
    import fsspec

    epath_of(url)  # the client library's check
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        info = fs.info(root)
        return [("", int(info.get("size") or 0), _object_version(info))]
    return sorted((path[len(root):].lstrip("/"), int(info.get("size") or 0), _object_version(info))
                  for path, info in fs.find(root, detail=True).items() if info.get("type") != "directory")


def list_files(path: str) -> list[tuple[str, int, str]]:
    """(relative path with '/', size, version) of every file under the directory `path`, sorted; the version is
    what changes when a file is rewritten (a local file's mtime in ns, an object's generation). Empty when `path`
    does not exist. One listing request on a URL."""
    if is_url(path):
        if not exists(path):
            return []
        return [f for f in _list_objects(path) if f[0]]
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            found.append((os.path.relpath(full, path).replace(os.sep, "/"), st.st_size, str(st.st_mtime_ns)))
    return sorted(found)


def stage(url: str, *, what: str = "files", keep: Callable[[str], bool] | None = None) -> str:
    """A local copy of the file or directory `url` (only the relative paths `keep` accepts, for a directory),
    downloaded once per host into `cache_dir("staged", <key>)` and reused while the remote objects keep their sizes
    and modification times. Returns the local path, whose base name is the URL's. A local path is returned as is."""
    if not is_url(url):
        return url
    url = resolve(url)
    if not exists(url):
        raise StorageError(f"{url}: does not exist")
    files = [f for f in _list_objects(url) if keep is None or not f[0] or keep(f[0])]
    key = hashlib.sha256(json.dumps([url, files]).encode()).hexdigest()[:20]
    root = cache_dir("staged", key)
    target = os.path.join(root, basename(url))
    if os.path.exists(target):
        logger.info("%s: using the local copy staged earlier in %s", url, target)
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".staging-", dir=root)
    try:
        local = os.path.join(tmp, basename(url))
        for rel, _, _ in files:
            dst = os.path.join(local, *rel.split("/")) if rel else local
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(epath_of(join(url, rel) if rel else url).read_bytes())
        if not files:
            os.makedirs(local)
        try:
            os.rename(local, target)
        except OSError:  # another process of this host staged it meanwhile
            if not os.path.exists(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("staged %s %s to %s (%d file(s), %.1f MiB)", what, url, target, len(files),
                sum(f[1] for f in files) / 2**20)
    return target


def upload_tree(local_dir: str, url: str, *, last: str | None = None) -> None:
    """Copy a local directory to a URL prefix file by file, the relative path `last` (the commit marker) last."""
    rels = sorted(os.path.relpath(os.path.join(d, n), local_dir).replace(os.sep, "/")
                  for d, _, names in os.walk(local_dir) for n in names)
    if last in rels:
        rels = [r for r in rels if r != last] + [last]
    for rel in rels:
        with open(os.path.join(local_dir, *rel.split("/")), "rb") as f:
            write_bytes(join(url, rel), f.read())


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if is_url(path):
        write_bytes(path, text.encode("utf-8"))
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; it replaces `path` when the block ends without error.
    On a URL the file is kept in memory and written in one PUT at the end."""
    if is_url(path):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        write_bytes(path, data if isinstance(data, bytes) else data.encode("utf-8"))
        return
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
    if is_url(out_dir):
        if isfile(out_dir):
            raise error(f"{out_dir}: exists and is not a directory")
        if isdir(out_dir) and listdir(out_dir) and not overwrite:
            raise error(f"{out_dir}: directory exists and is not empty; pass --overwrite (overwrite=True) to "
                        f"replace it")
        return
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise error(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise error(f"{out_dir}: directory exists and is not empty; pass --overwrite (overwrite=True) to "
                        f"replace it")


@contextlib.contextmanager
def atomic_directory(out_dir, *, overwrite: bool = False, error: type[M3JaxError] = M3JaxError,
                     last: str | None = None) -> Iterator[str]:
    """Yield an empty staging directory; when the block ends without error it becomes `out_dir`.

    The staging directory is a hidden sibling of `out_dir` (same filesystem, so the swap is two renames). An
    existing non-empty `out_dir` is refused with `error` unless `overwrite`; it is checked again just before the
    swap, since it may have appeared meanwhile. Nothing is left behind on failure.
    A URL `out_dir` (an object store has no rename) is built in a local temporary directory and uploaded when the
    block ends: the old objects deleted (with `overwrite`), then every file, the relative path `last` after all the
    others, so that `last` is the commit marker of the upload.
    """
    if is_url(out_dir):
        out_dir = resolve(out_dir)
        check_output_dir(out_dir, overwrite, error)
        with tempfile.TemporaryDirectory(prefix="m3jax-upload-") as tmp:
            new = os.path.join(tmp, basename(out_dir))
            os.mkdir(new)
            yield new
            check_output_dir(out_dir, overwrite, error)
            remove_tree(out_dir)
            upload_tree(new, out_dir, last=last)
        return
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
        if is_url(output):
            raise error(f"{output}: this output is built from resumable parts in a local directory; write it to a "
                        f"local path and copy it to the object store afterwards")
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
