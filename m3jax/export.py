"""Export an m3jax training checkpoint (Orbax) to the bge-m3 Hugging Face directory layout.

    python -m m3jax export --checkpoint runs/toy --output runs/toy_export            # latest complete step
    python -m m3jax export --checkpoint runs/toy/checkpoints/150 --output out --pytorch-bin

What is read (see m3jax/checkpoint.py for the layout a run writes):
  <work dir>/checkpoints/<step>/state    only the `params` subtree of the TrainState, restored as host numpy arrays
                                         (whatever mesh / number of devices or processes wrote it; the optimizer
                                         state is never read)
  <work dir>/checkpoints/<step>/config   the run config (pooling method, normalisation)
  <work dir>/base_model/                 config.json and tokenizer files copied when the run started
What is written (m3jax.hf_io.save_hf_checkpoint): config.json, model.safetensors (and pytorch_model.bin on request),
colbert_linear.pt, sparse_linear.pt, tokenizer files, sentence-transformers files, plus `m3jax_export.json` naming
the source checkpoint and step. Everything goes to a hidden staging directory next to the output that is renamed
into place at the end: an interrupted or failed export never leaves a half-written output directory.

Heads dtype: the default is float32, so the export is exact (loading it back gives bitwise-equal params and the
three libraries reproduce m3jax's outputs to float32 precision). `heads_dtype="float16"` writes the heads the way
bge-m3 ships them (colbert_linear.pt is 4 MB instead of 8 MB for bge-m3; the heads are rounded to fp16).

`read_checkpoint` is also what `m3jax eval --model <checkpoint>` uses to get params without writing files, and
`export_params` is the one function a training loop calls to export its final (or any) params.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from m3jax import checkpoint as ckpt_lib
from m3jax import hf_io
from m3jax import model as m3model

logger = logging.getLogger(__name__)

EXPORT_INFO_NAME = "m3jax_export.json"
HEADS_DTYPES = ("float32", "float16")
# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" (or "<step>.orbax-checkpoint-tmp") and renames it to
# "<step>" once every item is committed; anything else in checkpoints/ is not a step.
_STEP_RE = re.compile(r"^(\d+)$")
_TMP_STEP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp.*$")
_STEP_ITEMS = ("state", "config")  # `data` (the grain iterator state) is optional and never read here


class ExportError(ValueError):
    """The checkpoint to export (or the output directory) is missing, incomplete or unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
    work_dir: str  # the run's output_dir (holds checkpoints/ and base_model/)
    checkpoints_dir: str
    step: int
    step_dir: str


@dataclasses.dataclass
class TrainedCheckpoint:
    """What an export or an eval needs from a training checkpoint, all on the host."""

    location: CheckpointLocation
    run_config: dict  # the run config as saved with the step
    hf_config: dict  # base_model/config.json
    model_cfg: m3model.ModelConfig
    params: dict  # float32 numpy arrays, the layout of m3jax.model.BGEM3
    tokenizer_dir: str  # directory with the tokenizer files (base_model/ unless overridden)

    def load_tokenizer(self):
        return hf_io.load_tokenizer(self.tokenizer_dir)


# ---------------------------------------------------------------------------------------------------------------
# Finding the step


def _step_dirs(checkpoints_dir: str) -> tuple[dict[int, str], list[str]]:
    """(finalised step -> dir, names of unfinished Orbax temporary step dirs) in a checkpoints/ directory."""
    steps, tmp = {}, []
    for name in sorted(os.listdir(checkpoints_dir)):
        full = os.path.join(checkpoints_dir, name)
        if not os.path.isdir(full):
            continue
        if _STEP_RE.match(name):
            steps[int(name)] = full
        elif _TMP_STEP_RE.match(name):
            tmp.append(name)
    return steps, tmp


def _missing_items(step_dir: str) -> list[str]:
    return [item for item in _STEP_ITEMS if not os.path.isdir(os.path.join(step_dir, item))]


def _looks_like_checkpoints_dir(path: str) -> bool:
    steps, tmp = _step_dirs(path)
    return bool(steps or tmp) or os.path.basename(os.path.normpath(path)) == "checkpoints"


def locate_checkpoint(path, step: int | None = None) -> CheckpointLocation:
    """Resolve a work dir (latest complete step), a checkpoints/ dir or a step dir checkpoints/<step> to one step.

    Raises ExportError for a missing path, a directory without checkpoints, an explicitly requested step that does
    not exist or is incomplete (an Orbax temporary directory, or a step directory lacking `state` / `config`).
    Asked for the latest step, unfinished steps are skipped with a warning (as Orbax's CheckpointManager does).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ExportError(f"{path}: does not exist")
    if not os.path.isdir(path):
        raise ExportError(f"{path}: is a file; pass a run's output_dir, its checkpoints/ directory or a step "
                          f"directory checkpoints/<step>")
    name = os.path.basename(path)
    tmp_match = _TMP_STEP_RE.match(name)
    if tmp_match:
        raise ExportError(f"{path}: is an unfinished Orbax checkpoint (the save of step {tmp_match.group(1)} never "
                          f"completed); export a completed step instead")

    explicit_step_dir = None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        checkpoints_dir = os.path.join(path, "checkpoints")
    elif _STEP_RE.match(name) and (any(os.path.exists(os.path.join(path, i)) for i in _STEP_ITEMS + ("data",))
                                   or os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
                                   or os.path.basename(os.path.dirname(path)) == "checkpoints"):
        checkpoints_dir, explicit_step_dir = os.path.dirname(path), path
        if step is not None and step != int(name):
            raise ExportError(f"{path}: is the directory of step {int(name)} but step {step} was requested")
        step = int(name)
    elif _looks_like_checkpoints_dir(path):
        checkpoints_dir = path
    elif os.path.isdir(os.path.join(path, "base_model")):
        raise ExportError(f"{path}: the run has saved no checkpoint yet (no checkpoints/ directory)")
    else:
        raise ExportError(f"{path}: not an m3jax run directory (no checkpoints/ in it), nor a checkpoints/ directory, "
                          f"nor a step directory checkpoints/<step>")
    work_dir = os.path.dirname(checkpoints_dir)

    steps, tmp = _step_dirs(checkpoints_dir)
    complete = {s: d for s, d in steps.items() if not _missing_items(d)}
    if step is not None:
        step_dir = explicit_step_dir or steps.get(step)
        if step_dir is None:
            unfinished = [t for t in tmp if _TMP_STEP_RE.match(t).group(1) == str(step)]
            if unfinished:
                raise ExportError(f"{os.path.join(checkpoints_dir, unfinished[0])}: step {step} is incomplete (its "
                                  f"Orbax save never finished); completed steps: {sorted(complete) or 'none'}")
            raise ExportError(f"{checkpoints_dir}: no step {step}; completed steps: {sorted(complete) or 'none'}")
        missing = _missing_items(step_dir)
        if missing:
            raise ExportError(f"{step_dir}: step {step} is incomplete: missing {' and '.join(missing)} "
                              f"(a checkpoint step holds {', '.join(_STEP_ITEMS)})")
        return CheckpointLocation(work_dir, checkpoints_dir, step, step_dir)

    if not complete:
        found = [os.path.basename(d) for d in steps.values()] + tmp
        detail = f"only incomplete steps: {', '.join(found)}" if found else "no checkpoint steps"
        raise ExportError(f"{checkpoints_dir}: {detail}; nothing to export (has the run saved a checkpoint yet?)")
    latest = max(complete)
    skipped = [os.path.basename(d) for s, d in steps.items() if s > latest] + \
              [t for t in tmp if int(_TMP_STEP_RE.match(t).group(1)) > latest]
    if skipped:
        logger.warning("%s: skipping incomplete newer step(s) %s; using step %d", checkpoints_dir,
                       ", ".join(skipped), latest)
    return CheckpointLocation(work_dir, checkpoints_dir, latest, complete[latest])


# ---------------------------------------------------------------------------------------------------------------
# Reading the step


def _short(e: BaseException, limit: int = 300) -> str:
    """An exception as 'Type: message', cut short (tensorstore errors carry kilobytes of spec)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _restore_params(state_dir: str) -> dict:
    """The `params` subtree of the saved TrainState as host numpy arrays (no device, whatever wrote it)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    handler = ocp.PyTreeCheckpointHandler()
    try:
        try:
            tree = handler.metadata(epath.Path(state_dir)).tree
        except Exception as e:  # noqa: BLE001 - any failure here means the item is unreadable
            raise ExportError(f"{state_dir}: cannot read the Orbax checkpoint metadata ({_short(e)}); "
                              f"the checkpoint is incomplete or corrupt") from e
        if not isinstance(tree, dict) or "params" not in tree:
            keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ExportError(f"{state_dir}: expected a TrainState with 'params', found {keys}")
        wanted = {"params": tree["params"]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        try:
            restored = handler.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(
                item=wanted, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{state_dir}: cannot restore the params ({_short(e)}); the checkpoint is "
                              f"incomplete or corrupt") from e
    finally:
        handler.close()
    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), restored["params"])


def _restore_run_config(config_dir: str) -> dict:
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    try:
        config = checkpointer.restore(config_dir)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{config_dir}: cannot read the run config ({_short(e)})") from e
    finally:
        checkpointer.close()
    if not isinstance(config, dict):
        raise ExportError(f"{config_dir}: the run config is a {type(config).__name__}, expected a JSON object")
    return config


def _read_base_model(base_dir: str) -> dict:
    """base_model/config.json (checked), after checking the tokenizer files are there too."""
    if not os.path.isdir(base_dir):
        raise ExportError(f"{base_dir}: does not exist; the run copies config.json and the tokenizer there when it "
                          f"starts. Pass --base-model <the bge-m3 directory the run started from> instead")
    config_path = os.path.join(base_dir, hf_io.CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ExportError(f"{config_path}: missing; pass --base-model <the bge-m3 directory the run started from>")
    if not any(os.path.isfile(os.path.join(base_dir, n)) for n in ("tokenizer.json", "sentencepiece.bpe.model")):
        raise ExportError(f"{base_dir}: no tokenizer files (tokenizer.json or sentencepiece.bpe.model); pass "
                          f"--base-model <the bge-m3 directory the run started from>")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{config_path}: cannot read: {e}") from e
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "xlm-roberta":
        found = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config).__name__
        raise ExportError(f"{config_path}: model_type must be 'xlm-roberta' (a bge-m3 / XLM-RoBERTa encoder), "
                          f"found {found!r}")
    try:
        hf_io.expected_encoder_shapes(hf_config, config_path)  # checks the dimensions
    except hf_io.CheckpointFormatError as e:
        raise ExportError(str(e)) from e
    return hf_config


def model_config_for(params: dict, hf_config: dict, **head_settings) -> m3model.ModelConfig:
    """ModelConfig from config.json plus what only the params know: colbert dim and whether a pooler exists."""
    try:
        colbert_dim = int(np.shape(params["colbert_linear"]["kernel"])[-1])
    except (KeyError, TypeError, IndexError) as e:
        raise ExportError(f"params have no colbert_linear kernel (top-level keys: {sorted(params)})") from e
    try:
        return m3model.ModelConfig.from_hf_config(hf_config, colbert_dim=colbert_dim, has_pooler="pooler" in params,
                                                  **head_settings)
    except (KeyError, ValueError) as e:
        raise ExportError(f"config.json cannot describe an m3jax model: {e}") from e


def _check_params(params: dict, cfg: m3model.ModelConfig, where: str) -> None:
    """Same tree and shapes as BGEM3(cfg) would create; names the first mismatch."""
    import flax.linen as nn
    import jax

    expected = nn.unbox(m3model.abstract_params(cfg)["params"])
    flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key, shape in flat_expected.items():
        if key not in flat_found:
            raise ExportError(f"{where}: params lack {key} (shape {list(shape)}); does the base model's config.json "
                              f"describe the model that was trained?")
        if tuple(flat_found[key]) != tuple(shape):
            raise ExportError(f"{where}: param {key} has shape {list(flat_found[key])} but the base model's "
                              f"config.json implies {list(shape)}; is --base-model the model that was trained?")
    extra = sorted(set(flat_found) - set(flat_expected))
    if extra:
        raise ExportError(f"{where}: unexpected param {extra[0]} ({len(extra)} in all) for the base model's "
                          f"config.json")


def read_checkpoint(path, *, step: int | None = None, base_model: str | None = None) -> TrainedCheckpoint:
    """Everything needed to export or evaluate a training checkpoint, read onto the host.

    `path`: a work dir (its latest complete step), a checkpoints/ dir or a step dir. `base_model`: where config.json
    and the tokenizer come from (default: the run's base_model/). Raises ExportError with a clear message.
    """
    location = locate_checkpoint(path, step)
    run_config = _restore_run_config(os.path.join(location.step_dir, "config"))
    base_dir = os.path.abspath(base_model) if base_model else ckpt_lib.base_model_dir(location.work_dir)
    hf_config = _read_base_model(base_dir)
    params = _restore_params(os.path.join(location.step_dir, "state"))
    head_settings = {"sentence_pooling_method": run_config.get("sentence_pooling_method", "cls"),
                     "normalize_embeddings": bool(run_config.get("normalize_embeddings", True))}
    model_cfg = model_config_for(params, hf_config, **head_settings)
    requested = run_config.get("colbert_dim", -1)
    if isinstance(requested, int) and requested > 0 and requested != model_cfg.colbert_out_dim:
        raise ExportError(f"{location.step_dir}: the run config says colbert_dim={requested} but the saved "
                          f"colbert_linear has {model_cfg.colbert_out_dim} outputs")
    _check_params(params, model_cfg, location.step_dir)
    return TrainedCheckpoint(location=location, run_config=run_config, hf_config=hf_config, model_cfg=model_cfg,
                             params=params, tokenizer_dir=base_dir)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def _params_to_host(params) -> dict:
    """Host float32 numpy arrays; arrays spread over several processes are all-gathered first (collective: every
    process must call this)."""
    import jax

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.array(x, dtype=np.float32)  # a writable copy (torch.from_numpy warns on read-only arrays)

    return jax.tree.map(get, params)


def _check_output_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ExportError(f"{out_dir}: directory exists and is not empty; pass --overwrite (overwrite=True) to "
                              f"replace it")


def _set_sentence_transformers_pooling(folder: str, pooling: str, normalize: bool) -> None:
    """hf_io writes bge-m3's CLS + Normalize modules; make them match a run trained with other head settings."""
    if pooling == "mean":
        path = os.path.join(folder, "1_Pooling", "config.json")
        with open(path) as f:
            pooling_config = json.load(f)
        pooling_config.update(pooling_mode_cls_token=False, pooling_mode_mean_tokens=True)
        _write_json(path, pooling_config)
    if not normalize:
        path = os.path.join(folder, "modules.json")
        with open(path) as f:
            modules = json.load(f)
        _write_json(path, [m for m in modules if not m["type"].endswith(".Normalize")])
        shutil.rmtree(os.path.join(folder, "2_Normalize"), ignore_errors=True)


def export_params(params, hf_config: dict, output_dir, *, tokenizer_dir: str,
                  sentence_pooling_method: str = "cls", normalize_embeddings: bool = True,
                  pytorch_bin: bool = False, safetensors: bool = True, heads_dtype: str = "float32",
                  overwrite: bool = False, export_info: dict | None = None) -> str:
    """Write m3jax params as a bge-m3 directory (the one function a training loop calls to export).

    `params`: the BGEM3 param tree (numpy or jax arrays; sharded arrays are fine; in a multi-process run every
    process must call this, process 0 writes). `hf_config`: the base model's config.json. `tokenizer_dir`: where the
    tokenizer files are copied from. Returns the absolute output path. Raises ExportError.
    """
    import jax

    out_dir = os.path.abspath(os.fspath(output_dir))
    if heads_dtype not in HEADS_DTYPES:
        raise ExportError(f"heads_dtype={heads_dtype!r}: expected one of {', '.join(HEADS_DTYPES)}")
    _check_output_dir(out_dir, overwrite)
    host_params = _params_to_host(params)
    if jax.process_index() != 0:
        return out_dir
    cfg = model_config_for(host_params, hf_config, sentence_pooling_method=sentence_pooling_method,
                           normalize_embeddings=normalize_embeddings)
    _check_params(host_params, cfg, "params to export")
    encoder, colbert, sparse = m3model.params_to_hf(host_params, cfg)
    hf_ckpt = hf_io.HFCheckpoint(config=dict(hf_config), encoder=encoder, colbert=colbert, sparse=sparse)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    moved_old = None
    try:
        new = os.path.join(staging, "new")
        try:
            hf_io.save_hf_checkpoint(new, hf_ckpt, tokenizer_dir=tokenizer_dir, safetensors=safetensors,
                                     pytorch_bin=pytorch_bin, heads_dtype=heads_dtype)
        except hf_io.CheckpointFormatError as e:
            raise ExportError(str(e)) from e
        _set_sentence_transformers_pooling(new, sentence_pooling_method, normalize_embeddings)
        info = {"format": "bge-m3", "exported_by": "m3jax", "heads_dtype": heads_dtype,
                "sentence_pooling_method": sentence_pooling_method, "normalize_embeddings": normalize_embeddings,
                "colbert_dim": cfg.colbert_out_dim, **(export_info or {})}
        _write_json(os.path.join(new, EXPORT_INFO_NAME), info)

        # Swap in: at every moment out_dir is either absent, the old directory or the complete new one.
        _check_output_dir(out_dir, overwrite)  # may have appeared meanwhile
        if os.path.exists(out_dir):
            moved_old = os.path.join(staging, "old")
            os.rename(out_dir, moved_old)
        try:
            os.rename(new, out_dir)
        except BaseException:
            if moved_old is not None:
                os.rename(moved_old, out_dir)
                moved_old = None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if sentence_pooling_method != "cls":
        logger.warning("%s: trained with sentence_pooling_method=%s; FlagEmbedding users must pass "
                       "pooling_method=%r (sentence-transformers reads it from 1_Pooling/)", out_dir,
                       sentence_pooling_method, sentence_pooling_method)
    logger.info("exported to %s", out_dir)
    return out_dir


def export_checkpoint(checkpoint, output_dir, *, step: int | None = None, base_model: str | None = None,
                      pytorch_bin: bool = False, heads_dtype: str = "float32", overwrite: bool = False) -> str:
    """`m3jax export`: read a training checkpoint and write it as a bge-m3 directory. Returns the output path."""
    if heads_dtype not in HEADS_DTYPES:  # before the (possibly long) restore
        raise ExportError(f"heads_dtype={heads_dtype!r}: expected one of {', '.join(HEADS_DTYPES)}")
    _check_output_dir(os.path.abspath(os.fspath(output_dir)), overwrite)
    ckpt = read_checkpoint(checkpoint, step=step, base_model=base_model)
    info: dict[str, Any] = {"source_checkpoint": ckpt.location.step_dir, "step": ckpt.location.step}
    return export_params(ckpt.params, ckpt.hf_config, output_dir, tokenizer_dir=ckpt.tokenizer_dir,
                         sentence_pooling_method=ckpt.model_cfg.sentence_pooling_method,
                         normalize_embeddings=ckpt.model_cfg.normalize_embeddings, pytorch_bin=pytorch_bin,
                         heads_dtype=heads_dtype, overwrite=overwrite, export_info=info)
