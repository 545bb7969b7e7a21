"""Orbax checkpoints of a run: train state, data-iterator position and the run config, in `output_dir/checkpoints`.

Layout of one step (`checkpoints/<step>/`):
  state/   params, optimizer state and step (sharded arrays; restored straight into their target shardings)
  data/    the grain iterator state of every process, so a resumed run sees exactly the batches it would have seen
  config/  the run config as JSON (export and eval read it to rebuild the model)
The architecture files needed to use a checkpoint without the original model directory (config.json, tokenizer
files) are copied once to `output_dir/base_model/` when a run starts.

Writing: `Checkpointer` (the train loop). Reading a step from outside a run (export, eval, resume's model config):
`locate_checkpoint` resolves a run directory, its checkpoints/ directory or one step directory to a complete step;
`params_metadata` / `restore_params` give the params' shapes / the params as host numpy arrays whatever mesh wrote
them; `restore_run_config` the saved config; `read_base_model` the checked base_model/config.json.
`m3jax.loading` turns those into (ModelConfig, params).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from m3jax import hf_io, storage

logger = logging.getLogger(__name__)

BASE_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "sentencepiece.bpe.model")


class CheckpointError(hf_io.CheckpointFormatError):
    """An m3jax training checkpoint (or its base_model/ files) is missing, incomplete or unusable. A kind of
    CheckpointFormatError, so `except CheckpointFormatError` covers every model path m3jax cannot load."""


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
    best checkpoint, m3jax.selection), read at every clean-up."""

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
        keep = dict(max_to_keep=max_to_keep) if protected is None else dict(
            preservation_policy=_LatestOrProtected(max_to_keep, protected))
        options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only, **keep)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=options)

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
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """State restored into the shardings of `abstract_state`; the data iterator restored in place."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            import grain.python as grain
            args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args)).state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def config_to_json(config) -> dict:
    """ConfigDict -> plain JSON-able dict (tuples become lists)."""
    return json.loads(config.to_json())


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


def locate_checkpoint(path, step: int | None = None) -> CheckpointLocation:
    """Resolve a work dir (latest complete step), a checkpoints/ dir or a step dir checkpoints/<step> to one step.

    Raises CheckpointError for a missing path, a directory without checkpoints, an explicitly requested step that does
    not exist or is incomplete (an Orbax temporary directory, or a step directory lacking `state` / `config`).
    Asked for the latest step, unfinished steps are skipped with a warning (as Orbax's CheckpointManager does).
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
    complete = {s: d for s, d in steps.items() if not _missing_items(d)}
    if step is not None:
        step_dir = explicit_step_dir or steps.get(step)
        if step_dir is None:
            unfinished = [t for t in tmp if _TMP_STEP_RE.match(t).group(1) == str(step)]
            if unfinished:
                raise CheckpointError(f"{storage.join(checkpoints_dir, unfinished[0])}: step {step} is incomplete (its "
                                      f"Orbax save never finished); completed steps: {sorted(complete) or 'none'}")
            raise CheckpointError(f"{checkpoints_dir}: no step {step}; completed steps: {sorted(complete) or 'none'}")
        missing = _missing_items(step_dir)
        if missing:
            raise CheckpointError(f"{step_dir}: step {step} is incomplete: missing {' and '.join(missing)} "
                                  f"(a checkpoint step holds {', '.join(_STEP_ITEMS)})")
        return CheckpointLocation(work_dir, checkpoints_dir, step, step_dir)

    if not complete:
        found = [storage.basename(d) for d in steps.values()] + tmp
        detail = f"only incomplete steps: {', '.join(found)}" if found else "no checkpoint steps"
        raise CheckpointError(f"{checkpoints_dir}: {detail}; nothing to export (has the run saved a checkpoint yet?)")
    latest = max(complete)
    skipped = [storage.basename(d) for s, d in steps.items() if s > latest] + \
              [t for t in tmp if int(_TMP_STEP_RE.match(t).group(1)) > latest]
    if skipped:
        logger.warning("%s: skipping incomplete newer step(s) %s; using step %d", checkpoints_dir,
                       ", ".join(skipped), latest)
    return CheckpointLocation(work_dir, checkpoints_dir, latest, complete[latest])


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
    config_path = storage.join(base_dir, hf_io.CONFIG_NAME)
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
        hf_io.expected_encoder_shapes(hf_config, config_path)  # checks the dimensions
    except hf_io.CheckpointFormatError as e:
        raise CheckpointError(str(e)) from e
    return hf_config


