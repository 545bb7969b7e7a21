"""The training loop, top to bottom: config -> mesh -> model config -> data -> step -> params or restore -> loop.

`train(config)` is what `python train.py --config configs/<x>.py` and `m3jax train` run and what tests import.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import jax

from m3jax import config as config_lib
from m3jax import plan
from m3jax.core import distributed, storage
from m3jax.core import sharding as shard_lib
from m3jax.core.xla_stats import Shape
from m3jax.data import build as data_build
from m3jax.evaluation import evaluate, selection
from m3jax.evaluation.metrics import flatten_metrics
from m3jax.io import checkpoint as ckpt_lib
from m3jax.model import attention, loading
from m3jax.train.metrics import MetricsLogger, NonFiniteLossError
from m3jax.train.step import PACKED_KEYS, Stepper, TrainState

__all__ = ["train", "NonFiniteLossError", "Stepper", "TrainState"]

logger = logging.getLogger(__name__)


PADDED_BATCH_KEYS = ("query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask",
                     "teacher_scores")
PACKED_BATCH_KEYS = (*PACKED_KEYS, "teacher_scores")


def train(config) -> dict:
    """Run (or resume) a fine-tuning run; returns a summary dict (final step, last metrics, per-step losses).

    A run whose output_dir holds checkpoints resumes from the latest one (unless overwrite_output_dir): the model
    config then comes from that checkpoint and its base_model/ files, and no pretrained weight is read.
    """
    # --- config and processes ---------------------------------------------------------------------------------
    config_lib.validate(config)
    mesh_settings, step_settings = config_lib.mesh_settings(config), config_lib.step_settings(config)
    distributed.initialize(config_lib.distributed_settings(config))
    distributed.enable_compilation_cache()
    output_dir = storage.resolve(config.output_dir)  # a local path or a URL (gs://bucket/run)
    storage.makedirs(output_dir)

    # --- mesh -------------------------------------------------------------------------------------------------
    mesh = shard_lib.make_mesh(mesh_settings)
    num_blocks = shard_lib.num_batch_shards(mesh, mesh_settings.sharding_rules)
    logger.info("mesh %s over %d devices (%d processes); batch split over %d devices",
                dict(mesh.shape), mesh.size, jax.process_count(), num_blocks)

    # --- model config: from the latest checkpoint when resuming, else from the pretrained directory -----------
    eval_settings = config_lib.eval_settings(config)
    selection_settings = config_lib.selection_settings(config)
    eval_specs = list(eval_settings.eval_set_specs) if eval_settings.evaluates else []
    best = selection.BestTracker(output_dir, selection_settings.metric_for_best_model,
                                 selection_settings.greater_is_better) if eval_specs else None
    # the newest step that verifies; damaged, partial and unfinished newer steps are named and discarded first
    resume_step = None if config.overwrite_output_dir else ckpt_lib.prepare_resume(output_dir)
    checkpointer = ckpt_lib.Checkpointer(output_dir, max_to_keep=config.save_total_limit,
                                         protected=best.protected if best else None)
    if best:
        best.resume(resume_step)
    source = (loading.find_model(output_dir, step=resume_step, verify=False) if resume_step is not None
              else loading.find_model(config.model_name_or_path))
    model_cfg = loading.model_config(source, config_lib.model_settings(config))
    config_lib.validate_against_model(config, model_cfg)  # max lengths vs positions: before any data is read
    if (model_cfg.attention_implementation in attention.FUSED_WITHOUT_DROPOUT
            and model_cfg.attention_probs_dropout_prob > 0):
        fix = "--config.model.attention_implementation=flash-dropout (or auto) to apply it"
        logger.warning("%s fused attention has no dropout: attention_probs_dropout_prob=%g is not applied (set %s)",
                       model_cfg.attention_implementation, model_cfg.attention_probs_dropout_prob, fix)

    data_settings = config_lib.data_settings(config)
    if config.batch_size_by_length == "auto":
        data_settings = _auto_batch_sizes(config, data_settings, model_cfg, mesh, output_dir,
                                          resuming=resume_step is not None)

    # --- data -------------------------------------------------------------------------------------------------
    tokenizer = loading.load_tokenizer(source)
    eval_sets = evaluate.load_eval_sets(eval_specs)  # file errors before any training
    train_data = data_build.build_train_data(data_settings, tokenizer, num_batch_shards=num_blocks,
                                             process_index=jax.process_index(), process_count=jax.process_count())
    data_build.log_unknown_token_share(tokenizer, train_data)  # a broken or mismatched tokenizer is otherwise silent
    total_steps = config.max_steps if config.max_steps > 0 else config.num_train_epochs * train_data.steps_per_epoch
    if resume_step is not None and resume_step >= total_steps:
        logger.info("this run is already finished: step %d of %d is saved in %s. To train it again, pass "
                    "--config.overwrite_output_dir=true (or another --config.output_dir); to train longer, raise "
                    "--config.max_steps or --config.num_train_epochs", resume_step, total_steps,
                    checkpointer.directory)
        checkpointer.close()
        return {"step": resume_step, "metrics": {}, "losses": {}, "preempted": False, "state": None,
                "model_config": model_cfg, "best": best.record() if best else None, "already_finished": True}
    shapes = train_data.shapes()
    logger.info("%d steps (%d per epoch); %d possible step shapes (each compiles once): %s", total_steps,
                train_data.steps_per_epoch, len(shapes), shapes)

    # --- the step, and the state: restored, or the pretrained params put straight into their shardings --------
    stepper = Stepper.build(step_settings, model_cfg, mesh, total_steps)
    # BatchShape -> (remat policy, gradient cache chunk), for remat_policy / gradient_cache_chunk_size "auto"
    chosen = {}
    choices = plan.choose_auto(config, step_settings, model_cfg, mesh, [
        (Shape(s.global_batch // num_blocks, s.group_size, s.query_len, s.passage_len), s.has_teacher,
         s.no_in_batch_neg) for s in shapes], target=plan.memory_target(config.auto_batch_memory_gib, mesh))
    for s, choice in zip(shapes, choices):
        logger.info("%s", choice["line"])
        chosen[(s.global_batch, s.group_size, s.query_len, s.passage_len, s.has_teacher, s.no_in_batch_neg)] = (
            choice["policy"], choice["chunk"])
    counts = stepper.parameter_summary()
    logger.info("parameters: %s train, %s frozen (heads trained: %s%s); optimizer state %.1f MiB",
                f"{counts['trained']:,}", f"{counts['frozen']:,}", ", ".join(step_settings.optimizer.trained_heads),
                f"; LoRA rank {model_cfg.lora.rank} on {', '.join(model_cfg.lora.targets)}" if model_cfg.lora else "",
                counts["optimizer_state_bytes"] / 2**20)
    data_iter = train_data.iterator()
    if resume_step is not None:
        state = checkpointer.restore(resume_step, stepper.abstract_state(), data_iter)
        logger.info("resumed from %s step %d", checkpointer.directory, resume_step)
    else:
        ckpt_lib.copy_base_model_files(source.path, output_dir)  # source.path: local (a URL model is staged)
        params = loading.load_params(source, model_cfg, seed=config.seed)
        state = stepper.init_state(shard_lib.put_tree(params, stepper.param_shardings))
        del params
    start_step = int(resume_step or 0)

    # --- loop -------------------------------------------------------------------------------------------------
    config_json = _saved_config(config, data_settings)

    def last_good() -> str:
        """The newest step that verifies against its manifest, after the running save ends (a NaN state is never
        saved: save() checks the loss first)."""
        try:
            checkpointer.wait()
        except ckpt_lib.CheckpointSaveError as e:
            logger.error("%s", e)
        good = ckpt_lib.newest_intact_step(checkpointer.directory) if jax.process_index() == 0 else None
        if good is None:
            return "No intact checkpoint has been saved." if jax.process_index() == 0 else ""
        if not good.verified:
            return f"The newest checkpoint, step {good.step} in {checkpointer.directory}, has no manifest to verify."
        return f"The last good checkpoint, step {good.step} in {checkpointer.directory}, is verified intact."

    metrics_log = MetricsLogger(output_dir, total_steps, start_step, last_good_checkpoint=last_good,
                                resumed=resume_step is not None)

    def save(step: int) -> None:
        metrics_log.flush()  # never save a state whose loss was not checked
        checkpointer.save(step, state, data_iter, config_json)

    def run_eval(step: int) -> bool:
        """Evaluate every set, log eval/<set>/<mode>/<metric>; True when this step is the new best."""
        metrics_log.flush()
        results = evaluate.evaluate_sets(eval_settings, model_cfg, state.params, tokenizer, specs=eval_specs,
                                         eval_sets=eval_sets)
        for spec in eval_specs:
            metrics_log.log(step, flatten_metrics(results[spec.name], prefix=""), prefix=spec.log_prefix)
        improved = best.update(step, selection.flat_metrics(results))
        if jax.process_index() == 0:
            best.write()
        return improved

    step = start_step
    preemption = distributed.Preemption()
    try:
        if eval_settings.eval_on_start and eval_specs and start_step == 0:
            run_eval(0)  # the base model: the reference the summary and the model card compare with
        with preemption:
            while step < total_steps:
                local = next(data_iter)
                group = local["passage_input_ids"].shape[0] // local["query_input_ids"].shape[0]
                kind = (int(group), bool(local["no_in_batch_neg"]), bool(local["has_teacher_scores"]))
                tokens = int(local["query_attention_mask"].sum() + local["passage_attention_mask"].sum())
                shape = (local["query_input_ids"].shape[0] * jax.process_count(), kind[0],
                         local["query_input_ids"].shape[1], local["passage_input_ids"].shape[1], kind[2], kind[1])
                # a packed batch (config.packing) goes to the step in its packed form only
                arrays = {k: local[k] for k in (PACKED_BATCH_KEYS if data_settings.packing else PADDED_BATCH_KEYS)}
                remat, chunk = chosen.get(shape, (None, None))
                state, metrics = stepper.step(*kind, remat=remat, chunk=chunk)(state, stepper.global_batch(arrays))
                metrics_log.add(step, metrics, tokens * jax.process_count())
                step += 1
                checkpointer.check()  # a failed asynchronous save stops the run here (CheckpointSaveError)
                if step % config.logging_steps == 0 or step == total_steps:
                    metrics_log.flush()
                if preemption.reached(step):
                    logger.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                    save(step)
                    break
                # eval before save: a new best step gets a checkpoint even off save_steps, and the clean-up of
                # that save already knows which step to protect
                improved = eval_settings.eval_steps > 0 and (step % eval_settings.eval_steps == 0
                                                             or step == total_steps) and run_eval(step)
                if step % config.save_steps == 0 or step == total_steps or improved:
                    save(step)
    finally:
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
    if best and best.best:
        logger.info("%s", best.summary())
    return {"step": step, "metrics": metrics_log.last, "losses": metrics_log.history,
            "preempted": preemption.signalled, "state": state, "model_config": model_cfg,
            "best": best.record() if best else None}


def _auto_batch_sizes(config, data_settings: data_build.DataSettings, model_cfg, mesh, output_dir: str, *,
                      resuming: bool) -> data_build.DataSettings:
    """data_settings with batch_size_by_length="auto" resolved (m3jax.plan.auto_batch_sizes), the table logged and
    saved as <output_dir>/auto_batch_sizes.json; a resumed run reads that file back (its data plan must not change)."""
    path = storage.join(output_dir, plan.AUTO_BATCH_FILE)
    if resuming and storage.isfile(path):
        chosen = json.loads(storage.read_bytes(path))
        logger.info("batch_size_by_length='auto': the run's table from %s: %s", path, chosen["table"])
    else:
        chosen = plan.auto_batch_sizes(config, model_cfg, mesh)
        logger.info("batch_size_by_length='auto' on %s (%s): %s", chosen["device_kind"],
                    "device limit" if chosen["budget_gib"] is None else f"{chosen['budget_gib']} GiB",
                    chosen["table"])
        if jax.process_index() == 0:
            with storage.atomic_file(path) as f:
                json.dump(chosen, f, indent=2, sort_keys=True)
    return dataclasses.replace(data_settings, batch_size_by_length=tuple(dict(chosen["table"]).items()))


def _saved_config(config, data_settings: data_build.DataSettings) -> dict:
    """The run config as checkpoints save it: with batch_size_by_length="auto", the table the run chose in its
    place (moved to the end, where replacing the field always put it)."""
    saved = config_lib.config_to_json(config)
    if config.batch_size_by_length == "auto":
        del saved["batch_size_by_length"]
        saved["batch_size_by_length"] = dict(data_settings.batch_size_by_length)
    return saved


def main(argv: list[str]) -> int:
    """`m3jax train --config configs/<x>.py [--config.<field>=<value> ...]` (train.py calls this too)."""
    config = config_lib.config_from_argv(argv, "m3jax train")
    logging.getLogger().setLevel(logging.WARNING)  # orbax / absl info lines drown the progress bar
    logging.getLogger("m3jax").setLevel(logging.INFO)
    summary = train(config)
    if not summary.get("already_finished"):
        logger.info("finished at step %d: %s", summary["step"], summary["metrics"])
    return 0
