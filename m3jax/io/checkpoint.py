"""Orbax checkpoints of a run: train state, data-iterator position and the run config, in `output_dir/checkpoints`.

Layout of one step (`checkpoints/<step>/`):
  state/   params, optimizer state and step (sharded arrays; restored straight into their target shardings)
  data/    the grain iterator state of every process, so a resumed run sees exactly the batches it would have seen
  config/  the run config as JSON (export and eval read it to rebuild the model)
The architecture files needed to use a checkpoint without the original model directory (config.json, tokenizer
files) are copied once to `output_dir/base_model/` when a run starts.

Verification: when a step's arrays are written, before Orbax commits the step (the rename of its temporary
directory, or commit_success.txt on gs://), `m3jax_manifest.json` lists every file of the step with its size and
CRC-32 (computed in Orbax's background save thread, off the step loop). `verify_step` checks a step against it (and
a step of an m3jax before manifests by its items alone); `locate_checkpoint` (export, eval, mine, score) and
`prepare_resume` (the train loop) take the newest intact step and name each damaged or partial one in one line.
A failed asynchronous save surfaces as CheckpointSaveError at the next step boundary (`Checkpointer.check`).

Writing: `Checkpointer` (the train loop). Reading a step from outside a run (export, eval, resume's model config):
`locate_checkpoint` resolves a run directory, its checkpoints/ directory or one step directory to a complete step;
`params_metadata` / `restore_params` give the params' shapes / the params as host numpy arrays whatever mesh wrote
them; `restore_run_config` the saved config; `read_base_model` the checked base_model/config.json.
`m3jax.model.loading` turns those into (ModelConfig, params).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import traceback
import zlib
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from m3jax.core import storage
from m3jax.core.errors import M3JaxError
from m3jax.io import hf_layout

logger = logging.getLogger(__name__)

BASE_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "sentencepiece.bpe.model")


class CheckpointError(hf_layout.CheckpointFormatError):
    """An m3jax training checkpoint (or its base_model/ files) is missing, incomplete or unusable. A kind of
    CheckpointFormatError, so `except CheckpointFormatError` covers every model path m3jax cannot load."""


class CheckpointSaveError(M3JaxError, OSError):
    """Saving a checkpoint step failed (a full disk, a quota, a permission, a refused upload); the message names the
    step, the path and the cause. Earlier steps are untouched and the failed one is never taken for a step."""


def checkpoint_dir(output_dir: str) -> str:
    """output_dir/checkpoints (output_dir: a local path or a URL such as gs://bucket/run)."""
    return storage.join(storage.resolve(output_dir), "checkpoints")


def base_model_dir(output_dir: str) -> str:
    return storage.join(storage.resolve(output_dir), "base_model")


def copy_base_model_files(model_dir: str, output_dir: str) -> None:
    """Keep the architecture config and tokenizer next to the checkpoints (export and resume read them).
    `model_dir` is local; on a URL output_dir each file is one PUT, made by process 0 only."""
    target = base_model_dir(output_dir)
    if storage.is_url(target):
        import jax

        if jax.process_index() != 0:
            return
        for name in BASE_MODEL_FILES:
            src, dst = os.path.join(model_dir, name), storage.join(target, name)
            if os.path.exists(src) and not storage.exists(dst):
                with open(src, "rb") as f:
                    storage.write_bytes(dst, f.read())
        return
    os.makedirs(target, exist_ok=True)
    for name in BASE_MODEL_FILES:
        src = os.path.join(model_dir, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(target, name)):
            shutil.copy2(src, os.path.join(target, name))


@dataclasses.dataclass
class _LatestOrProtected:
    """Orbax preservation policy: keep the latest `n` steps (all when None) and the steps `protected()` names (the
    best checkpoint, m3jax.evaluation.selection), read at every clean-up."""

    n: int | None
    protected: Any

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        keep = set(self.protected())
        latest = len(checkpoints) if self.n is None else self.n
        return [i >= len(checkpoints) - latest or c.step in keep for i, c in enumerate(checkpoints)]


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with the three items of a run. `protected`: a callable returning the
    steps never removed by max_to_keep (the best checkpoint)."""

    def __init__(self, output_dir: str, *, max_to_keep: int | None = 3, read_only: bool = False, protected=None):
        self.directory = checkpoint_dir(output_dir)
        self._saving: int | None = None  # the step whose asynchronous save has not been checked yet
        self._writing: int | None = None  # the step of the latest save (the manifest callback's step)
        keep = dict(max_to_keep=max_to_keep) if protected is None else dict(
            preservation_policy=_LatestOrProtected(max_to_keep, protected))
        if not read_only:  # the manifest is written in Orbax's background thread, before it commits the step
            keep["async_options"] = ocp.AsyncOptions(post_finalization_callback=self._write_manifest)
        options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only, **keep)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=options)
        _quiet_orbax_save_errors()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, config_dict: dict) -> None:
        """Asynchronous: arrays are copied to host, then written in the background (call wait() before exit)."""
        args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict))
        if data_iterator is not None:
            import grain.python as grain  # lazily: benchmarks and export run without grain installed
            args["data"] = grain.PyGrainCheckpointSave(data_iterator)
        self.wait()  # a failed earlier save stops here, before anything else is written
        self._saving = self._writing = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True,
                              custom_metadata={MANIFEST_FLAG: MANIFEST_NAME})
        except Exception as e:  # noqa: BLE001 - what was written synchronously failed (a directory, metadata)
            self._saving = None
            raise self._save_error(step, e) from e

    def _write_manifest(self) -> None:
        """Orbax's post-finalization callback (process 0, background thread, every process's files written): the
        manifest of the step being saved, in its temporary directory (or its directory on gs://)."""
        step = self._writing
        names = storage.listdir(self.directory)
        tmp = sorted(n for n in names if _TMP_STEP_RE.match(n) and _TMP_STEP_RE.match(n).group(1) == str(step))
        write_manifest(storage.join(self.directory, tmp[-1] if tmp else str(step)), step)

    def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
        return CheckpointSaveError(f"step {step}: saving the checkpoint to {storage.join(self.directory, str(step))} "
                                   f"failed: {_cause(e)}; training stopped. Earlier steps are intact; the unfinished "
                                   f"step is discarded when the run resumes")

    def check(self) -> None:
        """At a step boundary: raise CheckpointSaveError if the last asynchronous save has failed. Never waits for
        a save still running."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """State restored into the shardings of `abstract_state`; the data iterator restored in place."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            import grain.python as grain
            args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args)).state

    def wait(self) -> None:
        """Wait for the running save; CheckpointSaveError if it failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the background save
            if step is None:
                raise
            raise self._save_error(step, e) from e

    def close(self) -> None:
        self.manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Reading one step from outside the run


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    work_dir: str  # the run's output_dir (holds checkpoints/ and base_model/)
    checkpoints_dir: str
    step: int
    step_dir: str


# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" (or "<step>.orbax-checkpoint-tmp") and renames it to
# "<step>" once every item is committed; anything else in checkpoints/ is not a step. On gs:// (no rename) it writes
# "<step>/" in place and "<step>/commit_success.txt" last: a URL step without that file is unfinished.
_STEP_RE = re.compile(r"^(\d+)$")
_TMP_STEP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp.*$")
_STEP_ITEMS = ("state", "config")  # `data` (the grain iterator state) is optional and never read here
_COMMIT_MARKER = "commit_success.txt"


MANIFEST_NAME = "m3jax_manifest.json"
MANIFEST_FLAG = "m3jax_manifest"  # in the step's Orbax custom metadata: this step was saved with a manifest
_METADATA_NAME = "_CHECKPOINT_METADATA"
# Top-level files Orbax (re)writes after the manifest, as part of its commit: not listed in it.
_NOT_IN_MANIFEST = (MANIFEST_NAME, _METADATA_NAME, _COMMIT_MARKER)
_CHUNK = 4 << 20


def _crc32(path: str) -> str:
    crc = 0
    with storage.open_binary(path) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(step_dir: str, step: int) -> None:
    """`step_dir/m3jax_manifest.json`: every file of the step (relative path -> size and CRC-32), read back once."""
    files = {rel: {"size": size, "crc32": _crc32(storage.join(step_dir, *rel.split("/")))}
             for rel, size, _ in storage.list_files(step_dir) if rel not in _NOT_IN_MANIFEST}
    text = json.dumps({"format": 1, "step": step, "files": files}, indent=1, sort_keys=True) + "\n"
    storage.write_bytes(storage.join(step_dir, MANIFEST_NAME), text.encode("utf-8"))


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """What `verify_step` found: `problem` (one file and what is wrong with it) is None for a usable step;
    `verified` is False for a step saved without a manifest (by an m3jax before manifests: not checksummed)."""

    step: int
    step_dir: str
    problem: str | None = None
    kind: str = ""  # "incomplete" (files missing: an unfinished save) or "damaged" (files changed or cut short)
    verified: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        return f"{self.step_dir}: step {self.step} is {self.kind}: {self.problem}"


_VERIFIED: dict[str, tuple] = {}  # step dir -> its file listing (sizes, versions) when it last verified intact


def _expects_manifest(step_dir: str) -> bool:
    """Whether Orbax's step metadata says m3jax saved this step with a manifest (so a missing one is a fault)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(step_dir, _METADATA_NAME)))
        return bool((meta.get("custom_metadata") or {}).get(MANIFEST_FLAG))
    except (OSError, ValueError, AttributeError):
        return False


def verify_step(step_dir: str) -> StepCheck:
    """Check one step directory against its manifest: every listed file present, of its size and CRC-32, and on
    gs:// Orbax's commit marker. A step without a manifest (an m3jax before manifests) is checked by its items
    alone. Raises CheckpointError only when the files cannot be read at all (not a verdict on the step)."""
    step = int(storage.basename(step_dir))
    listing = storage.list_files(step_dir)
    sizes = {rel: size for rel, size, _ in listing}

    def bad(problem: str, kind: str = "damaged") -> StepCheck:
        return StepCheck(step, step_dir, problem, kind)

    if storage.is_url(step_dir) and _COMMIT_MARKER not in sizes:
        return bad(f"missing {_COMMIT_MARKER} (the save never finished)", "incomplete")
    if MANIFEST_NAME not in sizes:
        if _expects_manifest(step_dir):
            return bad(f"missing {MANIFEST_NAME} (the save never finished, or the file was removed)", "incomplete")
        missing = _missing_items(step_dir)
        if missing:
            return bad(f"missing {' and '.join(missing)} (a checkpoint step holds {', '.join(_STEP_ITEMS)})",
                       "incomplete")
        return StepCheck(step, step_dir)
    try:
        manifest = json.loads(storage.read_bytes(storage.join(step_dir, MANIFEST_NAME)))
        files = {str(rel): (int(e["size"]), str(e["crc32"])) for rel, e in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return bad(f"{MANIFEST_NAME} is unreadable ({_short(e, 120)})")
    except OSError as e:
        raise CheckpointError(f"{step_dir}: cannot read {MANIFEST_NAME} ({_short(e)})") from e
    missing = [rel for rel in sorted(files) if rel not in sizes]
    if missing:
        items = sorted({rel.split("/")[0] for rel in missing if "/" in rel})
        gone = [i for i in items if not any(r.startswith(i + "/") for r in sizes)]
        what = (f"missing {gone[0]}/ ({sum(r.startswith(gone[0] + '/') for r in files)} files)" if gone
                else f"missing {missing[0]}")
        more = len(missing) - (sum(r.startswith(gone[0] + "/") for r in files) if gone else 1)
        return bad(what + (f" (and {more} more file(s))" if more > 0 else ""), "incomplete")
    wrong = [(rel, sizes[rel], size) for rel, (size, _) in sorted(files.items()) if sizes[rel] != size]
    if wrong:
        rel, found, size = wrong[0]
        cut = "truncated" if found < size else "grown"
        more = f" (and {len(wrong) - 1} more file(s))" if len(wrong) > 1 else ""
        return bad(f"{rel} is {found} bytes, the manifest says {size} ({cut}){more}")
    snapshot = tuple(listing)
    if _VERIFIED.get(step_dir) == snapshot:
        return StepCheck(step, step_dir, verified=True)
    for rel, (_, crc) in sorted(files.items()):
        try:
            found = _crc32(storage.join(step_dir, *rel.split("/")))
        except FileNotFoundError:
            return bad(f"missing {rel}", "incomplete")
        except OSError as e:
            raise CheckpointError(f"{storage.join(step_dir, rel)}: cannot read to verify it ({_short(e)})") from e
        if found != crc:
            return bad(f"{rel} has CRC-32 {found}, the manifest says {crc} (its bytes changed)")
    _VERIFIED[step_dir] = snapshot
    return StepCheck(step, step_dir, verified=True)


def _log_unverified(check: StepCheck) -> None:
    if check.ok and not check.verified:
        logger.warning("%s: step %d has no %s (saved by an m3jax before checkpoint manifests): used without "
                       "verifying its files", check.step_dir, check.step, MANIFEST_NAME)


def newest_intact_step(checkpoints_dir: str, *, discard: bool = False) -> StepCheck | None:
    """The newest step of `checkpoints_dir` that verifies (None if there is none); each newer damaged or partial
    step, and each unfinished Orbax save, is named in one warning line. With `discard` (a resuming run, process 0)
    those are deleted, since the run writes them again; nothing is deleted when no step is intact."""
    if not storage.isdir(checkpoints_dir):
        return None
    steps, tmp = _step_dirs(checkpoints_dir)
    bad, chosen = [], None
    for step in sorted(steps, reverse=True):
        check = verify_step(steps[step])
        if check.ok:
            chosen = check
            break
        bad.append(check)
    if chosen is None and bad:
        if discard:
            raise CheckpointError(f"{checkpoints_dir}: no intact step to resume from ("
                                  f"{'; '.join(c.describe() for c in bad)}); pass --config.overwrite_output_dir=true "
                                  f"to start the run over")
        for check in bad:
            logger.warning("%s", check.describe())
        return None
    then = f"; using step {chosen.step}" if chosen else ""
    for check in bad:
        logger.warning("%s%s%s", check.describe(), "; discarded" if discard else "; skipped", then)
        if discard:
            storage.remove_tree(check.step_dir)
    for name in tmp:
        step = int(_TMP_STEP_RE.match(name).group(1))
        if discard:
            logger.warning("%s: the save of step %d never finished (the run stopped during it); discarded%s",
                           storage.join(checkpoints_dir, name), step, then)
            storage.remove_tree(storage.join(checkpoints_dir, name))
        elif chosen is None or step > chosen.step:
            logger.warning("%s: the save of step %d never finished; skipped%s", storage.join(checkpoints_dir, name),
                           step, then)
    if chosen is not None:
        _log_unverified(chosen)
    return chosen


def prepare_resume(output_dir: str) -> int | None:
    """The step a (re)started run resumes from: the newest intact step, None for a fresh start. Process 0 verifies
    and discards the damaged, partial and unfinished steps after it (one line each); the others receive the step."""
    import jax

    step = -1
    if jax.process_index() == 0:
        chosen = newest_intact_step(checkpoint_dir(output_dir), discard=True)
        step = -1 if chosen is None else chosen.step
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    return None if step < 0 else step


def last_verified_step(checkpoints_dir: str) -> int | None:
    """The newest step that verifies against its manifest (a step without one is not named as verified)."""
    chosen = newest_intact_step(checkpoints_dir)
    return chosen.step if chosen is not None and chosen.verified else None


def _step_dirs(checkpoints_dir: str) -> tuple[dict[int, str], list[str]]:
    """(finalised step -> dir, names of unfinished Orbax temporary step dirs) in a checkpoints/ directory."""
    steps, tmp = {}, []
    for name in sorted(storage.listdir(checkpoints_dir)):
        full = storage.join(checkpoints_dir, name)
        if not storage.isdir(full):
            continue
        if _STEP_RE.match(name):
            steps[int(name)] = full
        elif _TMP_STEP_RE.match(name):
            tmp.append(name)
    return steps, tmp


def _missing_items(step_dir: str) -> list[str]:
    missing = [item for item in _STEP_ITEMS if not storage.isdir(storage.join(step_dir, item))]
    if storage.is_url(step_dir) and not storage.isfile(storage.join(step_dir, _COMMIT_MARKER)):
        missing.append(f"{_COMMIT_MARKER} (the save never finished)")
    return missing


def _looks_like_checkpoints_dir(path: str) -> bool:
    steps, tmp = _step_dirs(path)
    name = storage.basename(path) if storage.is_url(path) else os.path.basename(os.path.normpath(path))
    return bool(steps or tmp) or name == "checkpoints"


def locate_checkpoint(path, step: int | None = None, *, verify: bool = True) -> CheckpointLocation:
    """Resolve a work dir (newest intact step), a checkpoints/ dir or a step dir checkpoints/<step> to one step.

    Raises CheckpointError for a missing path, a directory without checkpoints, an explicitly requested step that does
    not exist, is incomplete (an Orbax temporary directory, a step directory lacking files) or damaged (a file whose
    size or CRC-32 differs from the step's manifest). Asked for the latest step, the newest step that verifies is
    taken and each newer damaged or unfinished one is named in one warning line (`newest_intact_step`).
    `verify=False`: the caller has verified the step (a resuming run); only its items are checked.
    """
    path = storage.resolve(path)
    if storage.is_url(path) and not path.startswith("gs://"):
        raise CheckpointError(f"{path}: m3jax checkpoints live on a local (or mounted) path or gs:// (Orbax writes "
                              f"and reads their arrays through tensorstore's file and gcs drivers only)")
    if not storage.exists(path):
        raise CheckpointError(f"{path}: does not exist")
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: is a file; pass a run's output_dir, its checkpoints/ directory or a step "
                              f"directory checkpoints/<step>")
    name = storage.basename(path)
    tmp_match = _TMP_STEP_RE.match(name)
    if tmp_match:
        raise CheckpointError(f"{path}: is an unfinished Orbax checkpoint (the save of step {tmp_match.group(1)} never "
                              f"completed); export a completed step instead")

    explicit_step_dir = None
    if storage.isdir(storage.join(path, "checkpoints")):
        checkpoints_dir = storage.join(path, "checkpoints")
    elif _STEP_RE.match(name) and (any(storage.exists(storage.join(path, i)) for i in _STEP_ITEMS + ("data",))
                                   or storage.exists(storage.join(path, "_CHECKPOINT_METADATA"))
                                   or storage.basename(storage.dirname(path)) == "checkpoints"):
        checkpoints_dir, explicit_step_dir = storage.dirname(path), path
        if step is not None and step != int(name):
            raise CheckpointError(f"{path}: is the directory of step {int(name)} but step {step} was requested")
        step = int(name)
    elif _looks_like_checkpoints_dir(path):
        checkpoints_dir = path
    elif storage.isdir(storage.join(path, "base_model")):
        raise CheckpointError(f"{path}: the run has saved no checkpoint yet (no checkpoints/ directory)")
    else:
        raise CheckpointError(f"{path}: not an m3jax run directory (no checkpoints/ in it), nor a checkpoints/ "
                              f"directory, nor a step directory checkpoints/<step>")
    work_dir = storage.dirname(checkpoints_dir)

    steps, tmp = _step_dirs(checkpoints_dir)
    if step is not None:
        complete = {s: d for s, d in steps.items() if not _missing_items(d)}
        step_dir = explicit_step_dir or steps.get(step)
        if step_dir is None:
            unfinished = [t for t in tmp if _TMP_STEP_RE.match(t).group(1) == str(step)]
            if unfinished:
                raise CheckpointError(f"{storage.join(checkpoints_dir, unfinished[0])}: step {step} is incomplete (its "
                                      f"Orbax save never finished); completed steps: {sorted(complete) or 'none'}")
            raise CheckpointError(f"{checkpoints_dir}: no step {step}; completed steps: {sorted(complete) or 'none'}")
        if verify:
            check = verify_step(step_dir)
            if not check.ok:
                raise CheckpointError(f"{check.describe()} (without a step, the newest intact step is taken)")
            _log_unverified(check)
            return CheckpointLocation(work_dir, checkpoints_dir, step, step_dir)
        missing = _missing_items(step_dir)
        if missing:
            raise CheckpointError(f"{step_dir}: step {step} is incomplete: missing {' and '.join(missing)} "
                                  f"(a checkpoint step holds {', '.join(_STEP_ITEMS)})")
        return CheckpointLocation(work_dir, checkpoints_dir, step, step_dir)

    chosen = newest_intact_step(checkpoints_dir)
    if chosen is None:
        found = [storage.basename(d) for d in steps.values()] + tmp
        detail = f"only incomplete or damaged steps: {', '.join(found)}" if found else "no checkpoint steps"
        raise CheckpointError(f"{checkpoints_dir}: {detail}; nothing to export (has the run saved a checkpoint yet?)")
    return CheckpointLocation(work_dir, checkpoints_dir, chosen.step, chosen.step_dir)


def _cause(e: BaseException) -> str:
    """The root of a failed save, short: the OS error (errno and text) when there is one in the chain, else the
    innermost exception's first line (tensorstore and HTTP errors carry kilobytes of detail)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, OSError) and err.errno:
            where = f": {err.filename}" if err.filename else ""
            return f"{type(err).__name__}: [Errno {err.errno}] {err.strerror}{where}"
    root = chain[-1]
    text = str(root)
    code = re.search(r"os_error_code='(\d+)'", text)  # tensorstore's form of an OS error
    if code:
        written = re.search(r'Failed writing: "([^"]+)"', text)
        return f"OSError: [Errno {code.group(1)}] {os.strerror(int(code.group(1)))}" + (
            f": {written.group(1)}" if written else "")
    lines = text.strip().splitlines()
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


class _OrbaxSaveErrorFilter(logging.Filter):
    """Orbax logs a failed background save several times with its whole traceback (hundreds of lines) before m3jax
    reports it in one line (CheckpointSaveError): its error records ("[process=N]...") are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":  # "Task exception was never retrieved" for each write of the failed save
            text = record.getMessage()
            if record.exc_info and record.exc_info[2] is not None:  # the task's traceback: Orbax's writer's frames
                text += "".join(traceback.format_tb(record.exc_info[2]))
            return f"{os.sep}orbax{os.sep}checkpoint{os.sep}" not in text
        return not str(record.msg).startswith("[process=")


def _quiet_orbax_save_errors() -> None:
    """Install the filter above on Orbax's and asyncio's loggers, and drop the "Event loop is closed" RuntimeErrors
    that tensorstore's callbacks raise (as unraisable exceptions, each with a traceback) into the event loops of a
    save that has failed."""
    import sys

    for name in ("absl", "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxSaveErrorFilter) for f in log.filters):
            log.addFilter(_OrbaxSaveErrorFilter())
    if not getattr(sys.unraisablehook, "_m3jax", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            e = unraisable.exc_value
            if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
                return
            previous(unraisable)

        hook._m3jax = True
        sys.unraisablehook = hook


def _short(e: BaseException, limit: int = 300) -> str:
    """An exception as 'Type: message', cut short (tensorstore errors carry kilobytes of spec)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def params_metadata(state_dir: str) -> dict:
    """The `params` subtree of the saved TrainState as Orbax array metadata (shapes, dtypes; no data read)."""

    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(storage.epath_of(state_dir)).tree
    except Exception as e:  # noqa: BLE001 - any failure here means the item is unreadable
        raise CheckpointError(f"{state_dir}: cannot read the Orbax checkpoint metadata ({_short(e)}); "
                              f"the checkpoint is incomplete or corrupt") from e
    finally:
        handler.close()
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{state_dir}: expected a TrainState with 'params', found {keys}")
    return tree["params"]


def restore_params(state_dir: str) -> dict:
    """The `params` subtree of the saved TrainState as host float32 numpy arrays (no device, whatever wrote it)."""
    import jax

    wanted = {"params": params_metadata(state_dir)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restored = handler.restore(storage.epath_of(state_dir), args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{state_dir}: cannot restore the params ({_short(e)}); the checkpoint is "
                              f"incomplete or corrupt") from e
    finally:
        handler.close()
    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), restored["params"])


def restore_run_config(config_dir: str) -> dict:
    checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        config = checkpointer.restore(config_dir)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{config_dir}: cannot read the run config ({_short(e)})") from e
    finally:
        checkpointer.close()
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_dir}: the run config is a {type(config).__name__}, expected a JSON object")
    return config


def read_base_model(base_dir: str) -> dict:
    """base_model/config.json (checked), after checking the tokenizer files are there too."""
    if not storage.isdir(base_dir):
        raise CheckpointError(f"{base_dir}: does not exist; the run copies config.json and the tokenizer there when it "
                              f"starts. Pass --base-model <the bge-m3 directory the run started from> instead")
    config_path = storage.join(base_dir, hf_layout.CONFIG_NAME)
    if not storage.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; pass --base-model <the bge-m3 directory the run started from>")
    if not any(storage.isfile(storage.join(base_dir, n)) for n in ("tokenizer.json", "sentencepiece.bpe.model")):
        raise CheckpointError(f"{base_dir}: no tokenizer files (tokenizer.json or sentencepiece.bpe.model); pass "
                              f"--base-model <the bge-m3 directory the run started from>")
    try:
        hf_config = json.loads(storage.read_bytes(config_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read: {e}") from e
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "xlm-roberta":
        found = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config).__name__
        raise CheckpointError(f"{config_path}: model_type must be 'xlm-roberta' (a bge-m3 / XLM-RoBERTa encoder), "
                              f"found {found!r}")
    try:
        hf_layout.expected_encoder_shapes(hf_config, config_path)  # checks the dimensions
    except hf_layout.CheckpointFormatError as e:
        raise CheckpointError(str(e)) from e
    return hf_config


