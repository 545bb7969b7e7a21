"""The training loop, top to bottom: config -> mesh -> data -> model/params -> optimizer -> restore -> step -> loop.

`train(config)` is what `python train.py --config configs/<x>.py` runs and what tests import.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m3jax import checkpoint as ckpt_lib
from m3jax import config as config_lib
from m3jax import losses
from m3jax import model as m3model
from m3jax import optimizer as optim
from m3jax import sharding as shard_lib

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or the gradient norm stops being finite."""


# ----------------------------------------------------------------------------------------------------------------
# Distributed initialisation
# ----------------------------------------------------------------------------------------------------------------

def enable_compilation_cache() -> None:
    """Persist compiled steps ($M3JAX_CACHE_DIR/xla, default ~/.cache/m3jax/xla): a resumed or repeated run with the
    same shapes skips compilation. JAX_COMPILATION_CACHE_DIR, when set, wins."""
    if jax.config.jax_compilation_cache_dir:
        return
    root = os.environ.get("M3JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "m3jax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))


def initialize_distributed(dist_config) -> None:
    """jax.distributed.initialize when the config or the launcher's environment asks for it.

    Explicit settings come from config.distributed.{coordinator_address,num_processes,process_id} or the env vars
    M3JAX_COORDINATOR_ADDRESS / M3JAX_NUM_PROCESSES / M3JAX_PROCESS_ID; with none of them, 'auto' initialises only
    under a multi-task SLURM job or a multi-host TPU slice (jax detects both itself).
    """
    if dist_config.initialize == "never" or jax.distributed.is_initialized():
        return
    address = dist_config.coordinator_address or os.environ.get("M3JAX_COORDINATOR_ADDRESS")
    num = dist_config.num_processes or (int(os.environ["M3JAX_NUM_PROCESSES"])
                                        if "M3JAX_NUM_PROCESSES" in os.environ else None)
    pid = dist_config.process_id if dist_config.process_id is not None else (
        int(os.environ["M3JAX_PROCESS_ID"]) if "M3JAX_PROCESS_ID" in os.environ else None)
    explicit = address is not None or num is not None or pid is not None
    launcher = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if dist_config.initialize == "auto" and not (explicit or launcher):
        return
    try:  # CPU collectives across processes (tests, CPU clusters); accelerators ignore it
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    logger.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)", address, num, pid)
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


# ----------------------------------------------------------------------------------------------------------------
# Model, loss and the jitted step
# ----------------------------------------------------------------------------------------------------------------

def model_config_from(config, hf_config: dict, colbert_dim: int, has_pooler: bool) -> m3model.ModelConfig:
    implementation = config.model.attention_implementation
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return m3model.ModelConfig.from_hf_config(
        hf_config, colbert_dim=colbert_dim, has_pooler=has_pooler,
        sentence_pooling_method=config.sentence_pooling_method, normalize_embeddings=config.normalize_embeddings,
        dtype=config.model.dtype, attention_implementation=implementation, remat_policy=config.model.remat_policy,
        hidden_dropout_prob=config.model.hidden_dropout_prob,
        attention_probs_dropout_prob=config.model.attention_probs_dropout_prob)


def loss_config_from(config, model_cfg: m3model.ModelConfig, num_blocks: int) -> losses.LossConfig:
    return losses.LossConfig(
        temperature=float(config.temperature), unified_finetuning=config.unified_finetuning,
        use_self_distill=config.use_self_distill, self_distill_start_step=config.self_distill_start_step,
        kd_loss_type=config.kd_loss_type, negatives_cross_device=config.negatives_cross_device,
        cross_device_all_heads=config.cross_device_all_heads, num_blocks=num_blocks,
        vocab_size=model_cfg.vocab_size, unused_token_ids=model_cfg.unused_token_ids)


def _sub_batch_rows(rows_per_block: int, sub_batch_size: int) -> int:
    """Largest divisor of the per-device row count that is <= sub_batch_size (a fixed chunk shape)."""
    return max(d for d in range(1, min(rows_per_block, sub_batch_size) + 1) if rows_per_block % d == 0)


def encode(model: m3model.BGEM3, params, ids, mask, rng, *, deterministic: bool, train_encoder: bool,
           num_blocks: int, sub_batch_size: int = -1) -> dict:
    """Model outputs for a [W*N, L] batch; with sub_batch_size, each device encodes its N rows in chunks whose
    activations are recomputed in the backward pass (FlagEmbedding's sub_batch_size, as memory control)."""
    apply = functools.partial(model.apply, deterministic=deterministic, train_encoder=train_encoder)
    rows = ids.shape[0] // num_blocks
    if sub_batch_size <= 0 or sub_batch_size >= rows:
        return apply({"params": params}, ids, mask, rngs={"dropout": rng})
    chunk = _sub_batch_rows(rows, sub_batch_size)
    n = rows // chunk

    def to_chunks(x):  # [W*N, ...] -> [n, W*chunk, ...], each chunk still split over the W devices
        x = x.reshape((num_blocks, n, chunk) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((n, num_blocks * chunk) + x.shape[3:])

    def from_chunks(x):
        x = x.reshape((n, num_blocks, chunk) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((num_blocks * rows,) + x.shape[3:])

    @jax.checkpoint
    def one(args):
        c_ids, c_mask, c_rng = args
        return apply({"params": params}, c_ids, c_mask, rngs={"dropout": c_rng})

    out = jax.lax.map(one, (to_chunks(ids), to_chunks(mask), jax.random.split(rng, n)))
    return jax.tree.map(from_chunks, out)


def make_train_step(model: m3model.BGEM3, loss_cfg: losses.LossConfig, tx: optax.GradientTransformation,
                    schedule, config, *, seed: int):
    deterministic = model.cfg.hidden_dropout_prob == 0 and model.cfg.attention_probs_dropout_prob == 0
    base_key = jax.random.key(seed)

    def step_fn(state: TrainState, batch: dict, *, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        rng_q, rng_p = jax.random.split(jax.random.fold_in(base_key, state.step))
        enc = functools.partial(encode, model, deterministic=deterministic, train_encoder=not config.fix_encoder,
                                num_blocks=loss_cfg.num_blocks)

        def loss_fn(params):
            q = enc(params, batch["query_input_ids"], batch["query_attention_mask"], rng_q)
            p = enc(params, batch["passage_input_ids"], batch["passage_attention_mask"], rng_p,
                    sub_batch_size=config.sub_batch_size)
            return losses.m3_loss(q, p, batch["query_input_ids"], batch["passage_input_ids"],
                                  batch["query_attention_mask"], batch["teacher_scores"] if has_teacher else None,
                                  state.step, cfg=loss_cfg, group_size=group_size, no_in_batch_neg=no_in_batch_neg)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        trainable = optim.trainable_labels(grads, config)
        only_trainable = lambda tree: jax.tree.map(lambda x, l: x if l == "train" else jnp.zeros_like(x),
                                                   tree, trainable)
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()},
                   "grad_norm": optax.tree.norm(only_trainable(grads)),
                   "update_norm": optax.tree.norm(updates),
                   "param_norm": optax.tree.norm(params),
                   "learning_rate": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


@dataclasses.dataclass
class Stepper:
    """Model, optimizer, state shardings and the jitted train steps of a run (train.py and the benchmark)."""

    model: m3model.BGEM3
    tx: optax.GradientTransformation
    schedule: Any
    mesh: Any
    param_shardings: Any
    state_shardings: TrainState
    abstract_params: Any
    abstract_opt: Any
    step_fn: Any
    _jitted: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, config, model_cfg: m3model.ModelConfig, mesh, total_steps: int) -> "Stepper":
        model = m3model.BGEM3(model_cfg)
        abstract_boxed = m3model.abstract_params(model_cfg)["params"]
        param_shardings = shard_lib.logical_shardings(abstract_boxed, mesh, config.sharding_rules)
        abstract_params = nn.unbox(abstract_boxed)
        tx, schedule = optim.make_optimizer(config, abstract_params, total_steps)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = shard_lib.state_shardings_like(abstract_opt, abstract_params, param_shardings, mesh)
        state_shardings = TrainState(step=shard_lib.replicated(mesh), params=param_shardings,
                                     opt_state=opt_shardings)
        loss_cfg = loss_config_from(config, model_cfg, shard_lib.num_batch_shards(mesh))
        step_fn = make_train_step(model, loss_cfg, tx, schedule, config, seed=config.seed)
        return cls(model, tx, schedule, mesh, param_shardings, state_shardings, abstract_params, abstract_opt, step_fn)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state (what a checkpoint restores into)."""
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                              opt_state=self.abstract_opt)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def init_state(self, params) -> TrainState:
        """Step 0 from params already placed in their shardings; the optimizer state is created sharded."""
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state)

    def random_params(self, seed: int = 0):
        """Randomly initialised params created directly in their shardings (benchmarks; never on one device)."""
        ids = jnp.zeros((1, 4), jnp.int32)
        init = lambda key: nn.unbox(self.model.init(key, ids, jnp.ones_like(ids))["params"])
        return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))

    def step(self, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        """The jitted step for one batch kind (donates the state); each new input shape compiles once more."""
        key = (group_size, no_in_batch_neg, has_teacher)
        if key not in self._jitted:
            fn = functools.partial(self.step_fn, group_size=group_size, no_in_batch_neg=no_in_batch_neg,
                                   has_teacher=has_teacher)
            self._jitted[key] = jax.jit(
                fn, in_shardings=(self.state_shardings, shard_lib.batch_sharding(self.mesh)),
                out_shardings=(self.state_shardings, shard_lib.replicated(self.mesh)), donate_argnums=(0,))
        return self._jitted[key]


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------

class MetricsLogger:
    """Console progress bar with ETA, log lines, TensorBoard events and metrics.jsonl (process 0 only)."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        self.writer = None
        self.bar = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.jsonl.flush()
        if prefix == "train":
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
        line = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
        self.bar.write(f"{prefix} step {step}: {line}" if prefix != "train" else f"step {step}: {line}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


# ----------------------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------------------

def train(config) -> dict:
    """Run (or resume) a fine-tuning run; returns a summary dict (final step, last metrics, per-step losses)."""
    from m3jax import data as data_lib
    from m3jax import hf_io

    # --- config and processes ---------------------------------------------------------------------------------
    config_lib.validate(config)
    initialize_distributed(config.distributed)
    enable_compilation_cache()
    output_dir = os.path.abspath(config.output_dir)
    os.makedirs(output_dir, exist_ok=True)

    # --- mesh -------------------------------------------------------------------------------------------------
    mesh = shard_lib.make_mesh(config.mesh)
    num_blocks = shard_lib.num_batch_shards(mesh)
    logger.info("mesh %s over %d devices (%d processes); batch split over %d devices",
                dict(mesh.shape), mesh.size, jax.process_count(), num_blocks)

    # --- data -------------------------------------------------------------------------------------------------
    tokenizer = hf_io.load_tokenizer(config.model_name_or_path)
    train_data = data_lib.build_train_data(config, tokenizer, num_batch_shards=num_blocks,
                                           process_index=jax.process_index(), process_count=jax.process_count())
    data_lib.log_unknown_token_share(tokenizer, train_data)  # a broken or mismatched tokenizer is otherwise silent
    total_steps = config.max_steps if config.max_steps > 0 else config.num_train_epochs * train_data.steps_per_epoch
    shapes = train_data.shapes()
    logger.info("%d steps (%d per epoch); %d possible step shapes (each compiles once): %s", total_steps,
                train_data.steps_per_epoch, len(shapes), shapes)

    # --- model and params (loaded straight into their shardings) ---------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(output_dir, max_to_keep=config.save_total_limit)
    resume_step = None if config.overwrite_output_dir else checkpointer.latest_step()
    hf = hf_io.load_hf_checkpoint(config.model_name_or_path)
    colbert_dim = config.colbert_dim if hf.colbert is None or config.colbert_dim > 0 else hf.colbert["weight"].shape[0]
    if hf.colbert is not None and config.colbert_dim > 0 and hf.colbert["weight"].shape[0] != config.colbert_dim:
        raise config_lib.ConfigError(
            f"config.colbert_dim={config.colbert_dim} but {config.model_name_or_path}/colbert_linear.pt has "
            f"{hf.colbert['weight'].shape[0]} output dims")
    model_cfg = model_config_from(config, hf.config, colbert_dim, "pooler.dense.weight" in hf.encoder)
    if model_cfg.attention_implementation == "cudnn" and model_cfg.attention_probs_dropout_prob > 0:
        logger.warning("cuDNN fused attention has no dropout: attention_probs_dropout_prob=%g is not applied "
                       "(set --config.model.attention_implementation=xla to apply it, at a speed cost)",
                       model_cfg.attention_probs_dropout_prob)
    stepper = Stepper.build(config, model_cfg, mesh, total_steps)

    # --- restore, or start from the pretrained checkpoint ---------------------------------------------------
    data_iter = train_data.iterator()
    if resume_step is not None:
        state = checkpointer.restore(resume_step, stepper.abstract_state(), data_iter)
        logger.info("resumed from %s step %d", checkpointer.directory, resume_step)
    else:
        ckpt_lib.copy_base_model_files(config.model_name_or_path, output_dir)
        np_params = m3model.params_from_hf(hf.encoder, hf.colbert, hf.sparse, model_cfg, seed=config.seed)
        state = stepper.init_state(shard_lib.put_tree(np_params, stepper.param_shardings))
    del hf
    start_step = int(resume_step or 0)

    # --- loop -------------------------------------------------------------------------------------------------
    config_json = ckpt_lib.config_to_json(config)
    # Preemption: one process alone catches SIGTERM and saves at the current step. With several processes the save
    # is collective, so they must agree on the step: jax's preemption service (on with jax.distributed) catches
    # SIGTERM on any host and names the same sync step on all of them.
    multi_process = jax.process_count() > 1
    stop = {"signal": None}
    previous_handler = None
    if not multi_process:
        previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    def preempted(step: int) -> bool:
        if multi_process:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                stop["signal"] = signal.SIGTERM
        return stop["signal"] is not None

    metrics_log = MetricsLogger(output_dir, total_steps, start_step)
    pending: list[tuple[int, dict, int]] = []  # (step, device metrics, tokens) since the last host read
    history: dict[int, float] = {}
    last: dict[str, float] = {}
    window_start = time.perf_counter()

    def flush() -> None:
        """Read the pending metrics to host (the only host sync), fail on non-finite, log the averages."""
        nonlocal window_start, last
        if not pending:
            return
        host = jax.device_get([m for _, m, _ in pending])
        for (step, _, _), m in zip(pending, host):
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                good = checkpointer.latest_step()
                kept = (f"The last good checkpoint, step {good} in {checkpointer.directory}, is intact."
                        if good is not None else "No checkpoint had been saved yet.")
                raise NonFiniteLossError(
                    f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; stopping. {kept}")
            history[step] = float(m["loss"])
        elapsed = time.perf_counter() - window_start
        tokens = sum(t for _, _, t in pending)
        last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        last.update(step_time_s=elapsed / len(pending), tokens_per_s=tokens / elapsed)
        metrics_log.log(pending[-1][0] + 1, last)
        pending.clear()
        window_start = time.perf_counter()

    def save(step: int) -> None:
        flush()  # never save a state whose loss was not checked
        checkpointer.save(step, state, data_iter, config_json)

    def run_eval(step: int) -> None:
        from m3jax import evaluate
        results = evaluate.evaluate_from_config(config, model_cfg, state.params, tokenizer)
        metrics_log.log(step, evaluate.flatten_metrics(results, prefix=""), prefix="eval")

    step = start_step
    try:
        while step < total_steps:
            local = next(data_iter)
            group = local["passage_input_ids"].shape[0] // local["query_input_ids"].shape[0]
            kind = (int(group), bool(local["no_in_batch_neg"]), bool(local["has_teacher_scores"]))
            arrays = {k: local[k] for k in ("query_input_ids", "query_attention_mask", "passage_input_ids",
                                            "passage_attention_mask", "teacher_scores")}
            tokens = int(arrays["query_attention_mask"].sum() + arrays["passage_attention_mask"].sum())
            state, metrics = stepper.step(*kind)(state, shard_lib.global_batch(arrays, mesh))
            pending.append((step, metrics, tokens * jax.process_count()))
            step += 1
            metrics_log.advance()
            if step % config.logging_steps == 0 or step == total_steps:
                flush()
            if preempted(step):
                logger.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                save(step)
                break
            if step % config.save_steps == 0 or step == total_steps:
                save(step)
            if config.eval_steps > 0 and (step % config.eval_steps == 0 or step == total_steps):
                flush()
                run_eval(step)
    finally:
        checkpointer.wait()
        checkpointer.close()
        metrics_log.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return {"step": step, "metrics": last, "losses": history, "preempted": stop["signal"] is not None,
            "state": state, "model_config": model_cfg}
