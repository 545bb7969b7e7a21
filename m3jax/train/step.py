"""The train step: encode queries and passages, the unified loss, AdamW, as one jitted function per batch kind.

    stepper = Stepper.build(settings, model_cfg, mesh, total_steps)  # model, optimizer, shardings
    state = stepper.init_state(params)                                # params already placed in their shardings
    state, metrics = stepper.step(group_size, no_in_batch_neg, has_teacher)(state, batch)

The step donates the state and returns device metrics (no host sync). Everything the step depends on is fixed when
it is built -- the loss settings, the per-device passage chunk (sub_batch_size) or the gradient cache and its chunk
(`gradient_cache_loss_and_grads`), whether the encoder trains, which parameters train -- and passed to it
explicitly; `Stepper.build` reads them from `StepSettings` (m3jax.config.step_settings converts the run config).
`train.py` and the benchmarks share this class.
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

from m3jax.core import sharding as shard_lib
from m3jax.model import encoder as m3model
from m3jax.train import losses
from m3jax.train import optimizer as optim

# XLA's GPU command buffers (CUDA graphs) update and relaunch a loop body's graph on every iteration of the layer
# scan, which holds the host until the device has run the iteration before (dispatch_s was 0.39 of a 0.45 s step on
# an H200, BENCHMARKS.md) and which cuDNN's attention dropout cannot be recorded into. Kernels launched one by one
# cost the host about 20 ms of a step whose 6,500 kernels average 70 us each: the device stays busy and the host
# returns at once. Passed to every jit of a step whose devices are GPUs.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


def compiler_options(mesh, *, gpu_command_buffers: bool = False) -> dict | None:
    """The jit compiler options for the mesh's devices: GPU_COMPILER_OPTIONS on GPUs unless command buffers are
    wanted (StepSettings.gpu_command_buffers), none elsewhere."""
    gpu = mesh.devices.flat[0].platform == "gpu"
    return dict(GPU_COMPILER_OPTIONS) if gpu and not gpu_command_buffers else None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the train step is built from (m3jax.config.step_settings); defaults and documentation:
    m3jax.config.default_config."""

    seed: int  # the dropout seed (and cuDNN's static dropout seeds)
    sub_batch_size: int
    fix_encoder: bool
    gradient_cache: bool
    gradient_cache_chunk_size: int
    gradient_cache_chunk_tokens: int
    sharding_rules: tuple  # config.sharding_rules, each rule a tuple
    gpu_command_buffers: bool  # config.model.gpu_command_buffers
    loss: losses.LossConfig  # the run config's loss fields; the model's and the mesh's are filled in by build
    optimizer: optim.OptimizerSettings


def loss_config_from(loss: losses.LossConfig, model_cfg: m3model.ModelConfig, num_blocks: int) -> losses.LossConfig:
    """The run's loss settings completed by the model's (vocabulary, unused token ids, normalisation) and the
    mesh's (num_blocks: devices the batch is split over)."""
    return dataclasses.replace(loss, num_blocks=num_blocks, vocab_size=model_cfg.vocab_size,
                               unused_token_ids=model_cfg.unused_token_ids,
                               normalize_embeddings=model_cfg.normalize_embeddings)


def _sub_batch_rows(rows_per_block: int, sub_batch_size: int) -> int:
    """Largest divisor of the per-device row count that is <= sub_batch_size (a fixed chunk shape)."""
    return max(d for d in range(1, min(rows_per_block, sub_batch_size) + 1) if rows_per_block % d == 0)


@dataclasses.dataclass(frozen=True)
class Chunking:
    """A [W*N, ...] batch (W device blocks of N rows) as `n` chunks of `chunk` rows per device: chunk k holds rows
    k*chunk..(k+1)*chunk-1 of every block, so each chunk is still split over the W devices. Chunk k's dropout key
    is the k-th of jax.random.split(rng, n) -- the whole batch's key itself when n == 1 -- the same layout in
    `encode`'s sub-batches and in both passes of the gradient cache, so the masks agree between them."""

    num_blocks: int
    rows: int  # N, rows per block
    chunk: int

    @classmethod
    def of(cls, total_rows: int, num_blocks: int, chunk_rows: int) -> Chunking:
        rows = total_rows // num_blocks
        return cls(num_blocks, rows, _sub_batch_rows(rows, chunk_rows) if chunk_rows > 0 else rows)

    @property
    def n(self) -> int:
        return self.rows // self.chunk

    def split(self, x):  # [W*N, ...] -> [n, W*chunk, ...]
        w, n, c = self.num_blocks, self.n, self.chunk
        x = x.reshape((w, n, c) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((n, w * c) + x.shape[3:])

    def join(self, x):  # [n, W*chunk, ...] -> [W*N, ...]
        w, n, c = self.num_blocks, self.n, self.chunk
        x = x.reshape((n, w, c) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape((w * self.rows,) + x.shape[3:])

    def rngs(self, rng):
        return rng[None] if self.n == 1 else jax.random.split(rng, self.n)


def encode(model: m3model.BGEM3, params, ids, mask, rng, *, deterministic: bool, train_encoder: bool,
           num_blocks: int, sub_batch_size: int = -1, dropout_stream: int = 0) -> dict:
    """Model outputs for a [W*N, L] batch; with sub_batch_size, each device encodes its N rows in chunks whose
    activations are recomputed in the backward pass (FlagEmbedding's sub_batch_size, as memory control).
    dropout_stream: the static stream of cuDNN's dropout seeds (queries 0, passages 1; m3jax.model.encoder.Encoder)."""
    apply = functools.partial(model.apply, deterministic=deterministic, train_encoder=train_encoder,
                              dropout_stream=dropout_stream)
    rows = ids.shape[0] // num_blocks
    if sub_batch_size <= 0 or sub_batch_size >= rows:
        return apply({"params": params}, ids, mask, rngs={"dropout": rng})
    ch = Chunking.of(ids.shape[0], num_blocks, sub_batch_size)

    @jax.checkpoint
    def one(args):
        c_ids, c_mask, c_rng = args
        return apply({"params": params}, c_ids, c_mask, rngs={"dropout": c_rng})

    out = jax.lax.map(one, (ch.split(ids), ch.split(mask), ch.rngs(rng)))
    return jax.tree.map(ch.join, out)


# The gradient cache's chunk, rows per device, where nothing chooses one: gradient_cache_chunk_size="auto" without a
# memory budget to judge by (a CPU without auto_batch_memory_gib), and make_loss_and_grads' default.
GRADIENT_CACHE_CHUNK_ROWS = 16


# A packed batch (m3jax.data.pipeline.PackRows): the rows of every device block and, per text, where its tokens are.
PACKED_KEYS = ("packed_input_ids", "packed_segment_ids", "packed_position_ids", "packed_starts", "query_index",
               "passage_index")


def unpack_tokens(x, index, num_blocks: int):
    """Packed per-token values x [W*R, L, ...] (W device blocks of R rows) -> [W*N, Lw, ...] in the padded layout:
    index [W*N, Lw] holds each text's tokens as block-local flat positions (row in the block * L + column,
    m3jax.core.packing.gather_index), -1 past the text, where the result is zero."""
    w = num_blocks
    flat = x.reshape((w, -1) + x.shape[2:])
    idx = index.reshape(w, -1)
    out = jax.vmap(lambda f, i: f[i])(flat, jnp.maximum(idx, 0))
    valid = (idx >= 0).reshape(idx.shape + (1,) * (x.ndim - 2))
    out = jnp.where(valid, out, jnp.zeros((), out.dtype))
    return shard_lib.rows_over_batch_axes(out.reshape(index.shape + x.shape[2:]))


def packed_outputs(model: m3model.BGEM3, params, batch: dict, rng, *, deterministic: bool,
                   train_encoder: bool, num_blocks: int) -> tuple[dict, dict, dict]:
    """Model outputs of a packed batch in the padded layout: (query outputs, passage outputs, padded arrays).

    Queries and passages are encoded together, one encoder pass over the packed rows (BGEM3.packed_hidden); each
    text's hidden states are gathered back into [N, Lq] / [N, Lp] rows (unpack_tokens) and the heads read them as
    in the padded step (BGEM3.heads), so dense, sparse weights and colbert vectors have the padded step's shapes
    and values, padding included. The padded arrays: query_input_ids, query_attention_mask, passage_input_ids,
    passage_attention_mask, rebuilt from the packed ids (what the loss reads)."""
    hidden = model.apply({"params": params}, batch["packed_input_ids"], batch["packed_segment_ids"],
                         batch["packed_position_ids"], batch["packed_starts"].shape[1], deterministic, train_encoder,
                         rngs={"dropout": rng}, method=m3model.BGEM3.packed_hidden)
    outs, padded = [], {}
    for side in ("query", "passage"):
        index = batch[f"{side}_index"]
        mask = (index >= 0).astype(jnp.int32)
        ids = unpack_tokens(batch["packed_input_ids"], index, num_blocks)
        padded[f"{side}_input_ids"] = jnp.where(mask > 0, ids, model.cfg.pad_token_id)
        padded[f"{side}_attention_mask"] = mask
        outs.append(model.apply({"params": params}, unpack_tokens(hidden, index, num_blocks), mask,
                                method=m3model.BGEM3.heads))
    return outs[0], outs[1], padded


# What m3_loss reads of the model outputs, per trained head (losses.representations).
CACHED_OUTPUTS = {"dense": "dense", "sparse": "sparse_weights", "colbert": "colbert"}


def gradient_cache_loss_and_grads(model: m3model.BGEM3, params, batch: dict, rng_q, rng_p, loss_fn, *,
                                  deterministic: bool, train_encoder: bool, num_blocks: int, chunk_rows: int,
                                  chunk_tokens: int = 0, heads: tuple[str, ...]):
    """((loss, parts), parameter gradients) of `loss_fn(q, p)` over the whole batch, by GradCache.

    Pass 1 encodes queries and passages chunk by chunk without keeping activations and keeps only the outputs the
    loss reads (CACHED_OUTPUTS of the trained heads: dense [N, H], sparse token weights [N, L], colbert vectors
    [N, L-1, D]); the loss and its gradient with respect to those outputs are taken over the whole (global)
    batch; pass 2 re-encodes each chunk with the same dropout key (Chunking.rngs) and backpropagates its slice of
    that gradient, summing the parameter gradients in a scan carry. Chunks hold chunk_rows rows per device, or
    with chunk_tokens > 0 max(1, chunk_tokens // padded length) (per side: short queries go in larger chunks),
    rounded down to a divisor of the rows per device. The chain rule makes the result the uncached
    step's gradient (same masks: the uncached step with sub_batch_size = chunk_rows for passages, and queries of
    at most chunk_rows per device).
    """
    keys = tuple(CACHED_OUTPUTS[h] for h in heads)

    def outputs(p, ids, mask, rng, stream):
        ids, mask = shard_lib.rows_over_batch_axes((ids, mask))
        out = model.apply({"params": p}, ids, mask, deterministic=deterministic, train_encoder=train_encoder,
                          dropout_stream=stream, rngs={"dropout": rng})
        return shard_lib.rows_over_batch_axes({k: out[k] for k in keys})

    sides = []
    for stream, (side, rng) in enumerate((("query", rng_q), ("passage", rng_p))):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        rows = max(1, chunk_tokens // ids.shape[1]) if chunk_tokens > 0 else chunk_rows
        ch = Chunking.of(ids.shape[0], num_blocks, rows)
        sides.append((ch, (ch.split(ids), ch.split(mask), ch.rngs(rng)), stream))

    # Pass 1: representations only (nothing is differentiated here, so no activation outlives its chunk).
    reps = [jax.tree.map(ch.join, jax.lax.map(lambda a, s=stream: outputs(params, *a, s), chunks))
            for ch, chunks, stream in sides]
    (loss, parts), rep_grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(*reps)

    # Pass 2: re-encode each chunk and pull its slice of the representation gradient back to the parameters (chunk
    # by chunk in pass 1's order, forward and backward in one iteration: cuDNN's dropout masks agree with pass 1's).
    def accumulate(stream, grads, args):
        *inputs, cotangent = args
        _, pullback = jax.vjp(lambda p: outputs(p, *inputs, stream), params)
        return jax.tree.map(jnp.add, grads, pullback(shard_lib.rows_over_batch_axes(cotangent))[0]), None

    grads = jax.tree.map(jnp.zeros_like, params)
    for (ch, chunks, stream), d_rep in zip(sides, rep_grads):
        grads, _ = jax.lax.scan(functools.partial(accumulate, stream), grads,
                                (*chunks, jax.tree.map(ch.split, d_rep)))
    return (loss, parts), grads


def make_loss_and_grads(model: m3model.BGEM3, loss_cfg: losses.LossConfig, *, seed: int, sub_batch_size: int = -1,
                        train_encoder: bool = True, gradient_cache: bool = False,
                        gradient_cache_chunk: int = GRADIENT_CACHE_CHUNK_ROWS, gradient_cache_tokens: int = 0):
    """`fn(params, batch, step, *, group_size, no_in_batch_neg, has_teacher) -> ((loss, parts), grads)`: the
    unified loss of a batch at optimizer step `step` (traced) and its parameter gradients, as the train step takes
    them (see make_train_step for the arguments)."""
    deterministic = not model.cfg.has_dropout
    base_key = jax.random.key(seed)
    enc = functools.partial(encode, model, deterministic=deterministic, train_encoder=train_encoder,
                            num_blocks=loss_cfg.num_blocks)

    def loss_and_grads(params, batch: dict, step: jax.Array, *, group_size: int, no_in_batch_neg: bool,
                       has_teacher: bool):
        rng_q, rng_p = jax.random.split(jax.random.fold_in(base_key, step))

        def loss_of(q, p, padded=batch):
            return losses.m3_loss(q, p, padded["query_input_ids"], padded["passage_input_ids"],
                                  padded["query_attention_mask"], batch["teacher_scores"] if has_teacher else None,
                                  step, cfg=loss_cfg, group_size=group_size, no_in_batch_neg=no_in_batch_neg)

        if "packed_input_ids" in batch:  # packed rows (config.packing): one encoder pass, the same loss
            def packed_loss(params):
                q, p, padded = packed_outputs(model, params, batch, rng_q, deterministic=deterministic,
                                              train_encoder=train_encoder, num_blocks=loss_cfg.num_blocks)
                return loss_of(q, p, padded)

            return jax.value_and_grad(packed_loss, has_aux=True)(params)
        if gradient_cache:
            return gradient_cache_loss_and_grads(
                model, params, batch, rng_q, rng_p, loss_of, deterministic=deterministic,
                train_encoder=train_encoder, num_blocks=loss_cfg.num_blocks, chunk_rows=gradient_cache_chunk,
                chunk_tokens=gradient_cache_tokens, heads=loss_cfg.trained_heads)

        def loss_fn(params):
            q = enc(params, batch["query_input_ids"], batch["query_attention_mask"], rng_q)
            p = enc(params, batch["passage_input_ids"], batch["passage_attention_mask"], rng_p,
                    sub_batch_size=sub_batch_size, dropout_stream=1)
            return loss_of(q, p)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return loss_and_grads


def make_train_step(loss_and_grads, tx: optax.GradientTransformation, schedule, *, trainable,
                    tracing_context=contextlib.nullcontext):
    """The step function (not yet jitted) for `Stepper.step`.

    loss_and_grads: `make_loss_and_grads(model, loss_cfg, ...)`, whose arguments are
      seed: the dropout seed (each step folds in its number, so a resumed run draws the same masks);
      sub_batch_size: passages per device encoded at once (-1: all); train_encoder: False backpropagates into the
      heads only (fix_encoder); gradient_cache: take the loss and gradients by the gradient cache
      (`gradient_cache_loss_and_grads`) with chunks of gradient_cache_chunk rows per device (or, when
      gradient_cache_tokens > 0, of that many tokens); sub_batch_size is then ignored (config validation rejects
      the two together);
    trainable: what trains (optimizer.trainable_mask, or its label tree), for the gradient norm;
    tracing_context: entered while the step is traced (sharding.tracing_context: the mesh and logical rules, for
    the Pallas kernels).
    """

    def step_fn(state: TrainState, batch: dict, *, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        with tracing_context():
            return _step(state, batch, group_size=group_size, no_in_batch_neg=no_in_batch_neg,
                         has_teacher=has_teacher)

    def _step(state: TrainState, batch: dict, *, group_size: int, no_in_batch_neg: bool, has_teacher: bool):
        (loss, parts), grads = loss_and_grads(state.params, batch, state.step, group_size=group_size,
                                              no_in_batch_neg=no_in_batch_neg, has_teacher=has_teacher)
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
    loss_and_grads: Any  # make_loss_and_grads: what the step differentiates (not jitted; tests and benchmarks)
    _rules: tuple = ()  # StepSettings.sharding_rules
    _gpu_command_buffers: bool = False  # StepSettings.gpu_command_buffers
    _chunk: int = GRADIENT_CACHE_CHUNK_ROWS  # StepSettings.gradient_cache_chunk_size
    # (remat policy, gradient cache chunk) -> (loss_and_grads, step_fn): the steps of the "auto" choices per shape
    _step_fn_for: Any = None
    _jitted: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, settings: StepSettings, model_cfg: m3model.ModelConfig, mesh, total_steps: int) -> Stepper:
        """Everything from the step settings: optimizer and schedule, loss settings, shardings by the logical
        rules. The caller has checked the run config against the model (m3jax.config.validate_against_model)."""
        s, rules = settings, settings.sharding_rules
        # cuDNN's attention dropout takes static seeds (m3jax.model.encoder.Encoder): the run's seed spaced past a
        # step's 2 x layers call sites
        model_cfg = dataclasses.replace(model_cfg, dropout_seed=int(s.seed) * 1000)
        model = m3model.BGEM3(model_cfg)
        abstract_boxed = m3model.abstract_params(model_cfg)["params"]
        param_shardings = shard_lib.logical_shardings(abstract_boxed, mesh, rules)
        abstract_params = nn.unbox(abstract_boxed)
        tx, schedule = optim.make_optimizer(s.optimizer, abstract_params, total_steps)
        abstract_opt = jax.eval_shape(tx.init, abstract_params)
        opt_shardings = shard_lib.state_shardings_like(abstract_opt, abstract_params, param_shardings, mesh)
        state_shardings = TrainState(step=shard_lib.replicated(mesh), params=param_shardings,
                                     opt_state=opt_shardings)
        loss_cfg = loss_config_from(s.loss, model_cfg, shard_lib.num_batch_shards(mesh, rules))
        trainable = optim.trainable_mask(abstract_params, s.optimizer)
        def step_fn_for(policy: str, chunk: int):
            """(loss_and_grads, step function) with the encoder under remat `policy` and gradient cache chunks of
            `chunk` rows per device (remat_policy="auto", gradient_cache_chunk_size="auto")."""
            m = model if policy == model_cfg.remat_policy else m3model.BGEM3(
                dataclasses.replace(model_cfg, remat_policy=policy))
            lag = make_loss_and_grads(
                m, loss_cfg, seed=s.seed, sub_batch_size=s.sub_batch_size, train_encoder=not s.fix_encoder,
                gradient_cache=s.gradient_cache, gradient_cache_chunk=chunk,
                gradient_cache_tokens=s.gradient_cache_chunk_tokens)
            return lag, make_train_step(lag, tx, schedule, trainable=trainable,
                                        tracing_context=functools.partial(shard_lib.tracing_context, mesh, rules))

        loss_and_grads, step_fn = step_fn_for(model_cfg.remat_policy, s.gradient_cache_chunk_size)
        return cls(model, tx, schedule, mesh, shard_lib.batch_sharding(mesh, rules), param_shardings,
                   state_shardings, abstract_params, abstract_opt, step_fn, trainable, loss_and_grads, rules,
                   s.gpu_command_buffers, s.gradient_cache_chunk_size, step_fn_for)

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

    def step(self, group_size: int, no_in_batch_neg: bool, has_teacher: bool, remat: str | None = None,
             chunk: int | None = None):
        """The jitted step for one batch kind (donates the state); each new input shape compiles once more. `remat`:
        the encoder's remat policy for this step (remat_policy="auto" chooses per shape), default the model's;
        `chunk`: the gradient cache's rows per device per chunk (gradient_cache_chunk_size="auto" chooses per
        shape), default the settings' gradient_cache_chunk_size."""
        remat = remat or self.model.cfg.remat_policy
        chunk = int(chunk or self._chunk)
        key = (group_size, no_in_batch_neg, has_teacher, remat, chunk)
        if key not in self._jitted:
            default = remat == self.model.cfg.remat_policy and chunk == self._chunk
            step_fn = self.step_fn if default else self._step_fn_for(remat, chunk)[1]
            fn = functools.partial(step_fn, group_size=group_size, no_in_batch_neg=no_in_batch_neg,
                                   has_teacher=has_teacher)
            self._jitted[key] = jax.jit(
                fn, in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, shard_lib.replicated(self.mesh)), donate_argnums=(0,),
                compiler_options=compiler_options(self.mesh, gpu_command_buffers=self._gpu_command_buffers))
        return self._jitted[key]
