"""The train step: encode queries and passages, the unified loss, AdamW, as one jitted function per batch kind.

    stepper = Stepper.build(config, model_cfg, mesh, total_steps)    # model, optimizer, shardings
    state = stepper.init_state(params)                                # params already placed in their shardings
    state, metrics = stepper.step(group_size, no_in_batch_neg, has_teacher)(state, batch)

The step donates the state and returns device metrics (no host sync). Everything the step depends on is fixed when
it is built -- the loss settings, the per-device passage chunk (sub_batch_size), whether the encoder trains, which
parameters train -- and passed to it explicitly; the run config is read only in `Stepper.build`. `train.py` and the
benchmarks share this class.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m3jax import config as config_lib
from m3jax import losses
from m3jax import model as m3model
from m3jax import optimizer as optim
from m3jax import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def loss_config_from(config, model_cfg: m3model.ModelConfig, num_blocks: int) -> losses.LossConfig:
    return losses.LossConfig(
        temperature=float(config.temperature), unified_finetuning=config.unified_finetuning,
        use_self_distill=config.use_self_distill, self_distill_start_step=config.self_distill_start_step,
        kd_loss_type=config.kd_loss_type, negatives_cross_device=config.negatives_cross_device,
        cross_device_all_heads=config.cross_device_all_heads, num_blocks=num_blocks,
        vocab_size=model_cfg.vocab_size, unused_token_ids=model_cfg.unused_token_ids,
        heads=config_lib.trained_heads(config), mrl_dims=config_lib.mrl_dims(config),
        mrl_weights=config_lib.mrl_weights(config), mrl_colbert=bool(config.mrl_colbert),
        normalize_embeddings=model_cfg.normalize_embeddings)


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
                    schedule, *, trainable, seed: int, sub_batch_size: int = -1, train_encoder: bool = True,
                    tracing_context=contextlib.nullcontext):
    """The step function (not yet jitted) for `Stepper.step`.

    trainable: what trains (optimizer.trainable_mask, or its label tree), for the gradient norm;
    seed: the dropout seed (each step folds in its number, so a resumed run draws the same masks);
    sub_batch_size: passages per device encoded at once (-1: all); train_encoder: False backpropagates into the
    heads only (fix_encoder); tracing_context: entered while the step is traced (sharding.tracing_context: the mesh
    and logical rules, for the Pallas kernels).
    """
    deterministic = not model.cfg.has_dropout
    base_key = jax.random.key(seed)
    enc = functools.partial(encode, model, deterministic=deterministic, train_encoder=train_encoder,
                            num_blocks=loss_cfg.num_blocks)

    def step_fn(state: TrainState, batch: dict, *, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        with tracing_context():
            return _step(state, batch, group_size=group_size, no_in_batch_neg=no_in_batch_neg,
                         has_teacher=has_teacher)

    def _step(state: TrainState, batch: dict, *, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        rng_q, rng_p = jax.random.split(jax.random.fold_in(base_key, state.step))

        def loss_fn(params):
            q = enc(params, batch["query_input_ids"], batch["query_attention_mask"], rng_q)
            p = enc(params, batch["passage_input_ids"], batch["passage_attention_mask"], rng_p,
                    sub_batch_size=sub_batch_size)
            return losses.m3_loss(q, p, batch["query_input_ids"], batch["passage_input_ids"],
                                  batch["query_attention_mask"], batch["teacher_scores"] if has_teacher else None,
                                  state.step, cfg=loss_cfg, group_size=group_size, no_in_batch_neg=no_in_batch_neg)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()},
                   "grad_norm": optax.tree.norm(optim.keep_trainable(grads, trainable)),
                   "update_norm": optax.tree.norm(updates),
                   "param_norm": optax.tree.norm(params),
                   "learning_rate": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


@dataclasses.dataclass
class Stepper:
    """Model, optimizer, state shardings and the jitted train steps of a run (train.py and the benchmarks)."""

    model: m3model.BGEM3
    tx: optax.GradientTransformation
    schedule: Any
    mesh: Any
    batch_sharding: Any
    param_shardings: Any
    state_shardings: TrainState
    abstract_params: Any
    abstract_opt: Any
    step_fn: Any
    trainable: Any  # optimizer.trainable_mask of the params
    _rules: tuple = ()  # config.sharding_rules
    _jitted: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, config, model_cfg: m3model.ModelConfig, mesh, total_steps: int) -> Stepper:
        """Everything from the run config: optimizer and schedule, loss settings, shardings by the logical rules."""
        config_lib.validate_against_model(config, model_cfg)
        model = m3model.BGEM3(model_cfg)
        abstract_boxed = m3model.abstract_params(model_cfg)["params"]
        param_shardings = shard_lib.logical_shardings(abstract_boxed, mesh, config.sharding_rules)
        abstract_params = nn.unbox(abstract_boxed)
        tx, schedule = optim.make_optimizer(config, abstract_params, total_steps)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = shard_lib.state_shardings_like(abstract_opt, abstract_params, param_shardings, mesh)
        state_shardings = TrainState(step=shard_lib.replicated(mesh), params=param_shardings,
                                     opt_state=opt_shardings)
        loss_cfg = loss_config_from(config, model_cfg, shard_lib.num_batch_shards(mesh, config.sharding_rules))
        trainable = optim.trainable_mask(abstract_params, config)
        step_fn = make_train_step(model, loss_cfg, tx, schedule, trainable=trainable, seed=config.seed,
                                  sub_batch_size=config.sub_batch_size, train_encoder=not config.fix_encoder,
                                  tracing_context=functools.partial(shard_lib.tracing_context, mesh,
                                                                    config.sharding_rules))
        return cls(model, tx, schedule, mesh, shard_lib.batch_sharding(mesh, config.sharding_rules), param_shardings,
                   state_shardings, abstract_params, abstract_opt, step_fn, trainable,
                   tuple(tuple(r) for r in config.sharding_rules))

    def parameter_summary(self) -> dict:
        """How many parameters train and how many do not; the optimizer state's size (all devices together)."""
        trained, frozen = optim.count_parameters(self.abstract_params, self.trainable)
        opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.abstract_opt))
        return dict(trained=trained, frozen=frozen, optimizer_state_bytes=int(opt_bytes))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state (what a checkpoint restores into)."""
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                              opt_state=self.abstract_opt)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_shardings)

    def abstract_batch(self, batch: int, group: int, query_len: int, passage_len: int) -> dict:
        """Shapes, dtypes and sharding of a step's inputs for `batch` queries per batch shard (what the data
        pipeline's global batch looks like), for compiling without data."""
        rows = batch * shard_lib.num_batch_shards(self.mesh, self._rules)
        s = lambda n, cols, dt: jax.ShapeDtypeStruct((n, cols), dt, sharding=self.batch_sharding)
        return dict(query_input_ids=s(rows, query_len, jnp.int32), query_attention_mask=s(rows, query_len, jnp.int32),
                    passage_input_ids=s(rows * group, passage_len, jnp.int32),
                    passage_attention_mask=s(rows * group, passage_len, jnp.int32),
                    teacher_scores=s(rows, group, jnp.float32))

    def state_bytes_per_device(self) -> int:
        """Bytes of params + optimizer state one device holds under the state shardings (largest shard)."""
        state = self.abstract_state()
        return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state)))

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

    def global_batch(self, local_batch: dict) -> dict:
        """This process's slice of a batch -> global arrays sharded like the step expects (no host sync)."""
        return shard_lib.global_batch(local_batch, self.batch_sharding)

    def step(self, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        """The jitted step for one batch kind (donates the state); each new input shape compiles once more."""
        key = (group_size, no_in_batch_neg, has_teacher)
        if key not in self._jitted:
            fn = functools.partial(self.step_fn, group_size=group_size, no_in_batch_neg=no_in_batch_neg,
                                   has_teacher=has_teacher)
            self._jitted[key] = jax.jit(
                fn, in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, shard_lib.replicated(self.mesh)), donate_argnums=(0,))
        return self._jitted[key]
