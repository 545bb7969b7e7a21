"""The gradient cache (config.gradient_cache, m3jax/train/step.py gradient_cache_loss_and_grads) against the uncached step.

Exactness: the loss and every parameter gradient of the cached step equal the uncached step's within 1e-5 relative
(fp32; per tensor, relative to the tensor's largest uncached gradient floored at 1% of the largest of all tensors,
as in tests/test_losses.py) for the loss settings of the parity table
(self-distillation, kl_div / m3_kd_loss teacher scores, no_in_batch_neg, negatives_cross_device,
cross_device_all_heads), with the fine-tuning controls (heads, LoRA, Matryoshka, fix_encoder), remat, and on
multi-device meshes (data and data x fsdp over the simulated CPU devices). With dropout the masks are the same as
the uncached step's when its passages are encoded with sub_batch_size = the chunk size and the queries fit one
chunk (step.Chunking: chunk k draws the k-th of split(key, n) in encode's sub-batches and in both cache passes);
the dropout cases are compared that way, the dropout-free cases also with several query chunks against the plain
uncached step. Then: a toy training run matches the uncached run step for step, and the compiled step's temporary
memory grows with the batch only through the cached representations (XLA memory analysis at two batch sizes, on
the tiny model and at bge-m3's dimensions).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax import trainer
from m3jax.core import sharding as shard_lib
from m3jax.core import xla_stats
from m3jax.core.xla_stats import memory_record
from m3jax.model import loading
from m3jax.train import losses
from m3jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU: LLVM -O0, half the compile time (both steps alike)
TENSOR_FLOOR = 1e-2  # as in tests/test_losses.py
QLEN, PLEN = 8, 16


def _config(tiny_ckpt, output_dir, **overrides):
    spec = importlib.util.spec_from_file_location("toy", os.path.join(REPO, "configs", "toy.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    c = toy.get_config()
    c.model_name_or_path, c.output_dir = str(tiny_ckpt), str(output_dir)
    c.mesh.data = 1
    c.eval_steps = 0
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    config_lib.validate(c)
    return c


def _batch(vocab: int, queries: int, group: int, seed: int = 0) -> dict:
    """Random rows with cls first, eos last and padding after (lengths vary), plus random teacher scores."""
    rng = np.random.default_rng(seed)

    def rows(n, length):
        ids = np.ones((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        for i in range(n):
            k = int(rng.integers(3, length + 1))
            ids[i, :k] = rng.integers(5, vocab, size=k)
            ids[i, 0], ids[i, k - 1] = 0, 2
            mask[i, :k] = 1
        return ids, mask

    q, qm = rows(queries, QLEN)
    p, pm = rows(queries * group, PLEN)
    return dict(query_input_ids=q, query_attention_mask=qm, passage_input_ids=p, passage_attention_mask=pm,
                teacher_scores=rng.normal(size=(queries, group)).astype(np.float32))


def _loss_and_grads(tiny_ckpt, tmp_path, overrides, batch, *, step, group, nibn, teacher):
    config = _config(tiny_ckpt, tmp_path, **overrides)
    mesh = shard_lib.make_mesh(config_lib.mesh_settings(config))
    model_cfg, params, _ = loading.load_model(tiny_ckpt, config_lib.model_settings(config))
    config_lib.validate_against_model(config, model_cfg)
    stepper = trainer.Stepper.build(config_lib.step_settings(config), model_cfg, mesh, total_steps=10)
    fn = jax.jit(lambda p, b, s: stepper.loss_and_grads(p, b, s, group_size=group, no_in_batch_neg=nibn,
                                                        has_teacher=teacher),
                 in_shardings=(stepper.param_shardings, stepper.batch_sharding, shard_lib.replicated(mesh)))
    args = (shard_lib.put_tree(params, stepper.param_shardings), stepper.global_batch(batch), np.int32(step))
    compiled = fn.lower(*args).compile(FAST_COMPILE)
    (loss, parts), grads = compiled(*args)
    return float(loss), jax.tree.map(float, parts), jax.tree.map(np.asarray, grads)


def _assert_same(cached, uncached):
    (l_c, parts_c, g_c), (l_u, parts_u, g_u) = cached, uncached
    assert abs(l_c - l_u) <= RTOL * abs(l_u), (l_c, l_u)
    for k in parts_u:
        assert abs(parts_c[k] - parts_u[k]) <= RTOL * max(abs(parts_u[k]), 1e-6), (k, parts_c[k], parts_u[k])
    flat_c, flat_u = jax.tree_util.tree_leaves_with_path(g_c), jax.tree_util.tree_leaves_with_path(g_u)
    assert [p for p, _ in flat_c] == [p for p, _ in flat_u]
    largest = max(float(np.abs(b).max()) for _, b in flat_u)
    assert largest > 0
    for (path, a), (_, b) in zip(flat_c, flat_u):
        # Relative to the tensor's largest gradient, floored at 1% of the largest of all tensors: some gradients
        # are rounding noise around an exact 0 (the attention key bias: softmax ignores a per-row shift).
        scale = max(float(np.abs(b).max()), TENSOR_FLOOR * largest)
        assert float(np.abs(a - b).max()) <= RTOL * scale, (jax.tree_util.keystr(path), np.abs(a - b).max(), scale)


NO_DROPOUT = {"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0}
LORA = {"lora.rank": 2, "lora.dropout": 0.1, "lora.targets": ("query", "value", "intermediate")}

# id, overrides shared by both steps, chunk rows, uncached sub_batch_size, batch (queries per device, group, mesh
# shards), step, no_in_batch_neg, teacher scores. Dropout cases: queries per device <= chunk, uncached sub_batch =
# chunk (the same masks); dropout-free cases chunk the queries too, against the plain uncached step.
CASES = [
    ("recipe-sd-kldiv-lora-remat-dropout", dict(use_self_distill=True, knowledge_distillation=True,
                                                **{"model.remat_policy": "full"}, **LORA), 2, 2, (2, 4, 1), 0,
     False, True),
    ("m3kd-heads-mrl-query-chunks", dict(kd_loss_type="m3_kd_loss", knowledge_distillation=True,
                                         use_self_distill=True, heads=("dense", "colbert"), mrl_dims=(32, 16),
                                         mrl_colbert=True, **NO_DROPOUT), 1, -1, (3, 2, 1), 0, False, True),
    ("nibn-sd-fix-encoder-data2-dropout", dict(use_self_distill=True, fix_encoder=True, **{"mesh.data": 2}), 4, 4,
     (2, 4, 2), 3, True, False),
    ("cross-device-dense-m3kd-sdoff-data2-dropout", dict(negatives_cross_device=True, knowledge_distillation=True,
                                                         kd_loss_type="m3_kd_loss", **{"mesh.data": 2}), 2, 2,
     (2, 4, 2), 0, False, True),
    ("cross-device-all-heads-sd-data4-fsdp2", dict(negatives_cross_device=True, cross_device_all_heads=True,
                                                   use_self_distill=True, **{"mesh.data": 4, "mesh.fsdp": 2},
                                                   **NO_DROPOUT), 1, -1, (2, 2, 8), 0, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cached_step_equals_uncached_step(tiny_ckpt, tmp_path, case):
    _, overrides, chunk, sub_batch, (queries, group, shards), step, nibn, teacher = case
    if shards == 8 and not os.environ.get("M3JAX_TEST_CHILD"):
        # Eight devices in a fresh process: in the full suite, after other in-process tests, XLA:CPU's in-process
        # collectives deadlocked on this step (device threads parked at different all-gathers, load 0).
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                f"{__file__}::test_cached_step_equals_uncached_step[{case[0]}]"],
                               env=dict(os.environ, M3JAX_TEST_CHILD="1"), capture_output=True, text=True,
                               timeout=1200)
        assert child.returncode == 0 and "1 passed" in child.stdout, child.stdout[-4000:] + child.stderr[-4000:]
        return
    vocab = loading.load_model(tiny_ckpt)[0].vocab_size
    batch = _batch(vocab, queries * shards, group)
    kw = dict(step=step, group=group, nibn=nibn, teacher=teacher)
    uncached = _loss_and_grads(tiny_ckpt, tmp_path, dict(overrides, sub_batch_size=sub_batch), batch, **kw)
    cached = _loss_and_grads(tiny_ckpt, tmp_path, dict(overrides, gradient_cache=True,
                                                       gradient_cache_chunk_size=chunk), batch, **kw)
    _assert_same(cached, uncached)


def test_gradient_cache_rejects_sub_batch_size(tiny_ckpt, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"config.sub_batch_size=4: expected -1 with gradient_cache"):
        _config(tiny_ckpt, tmp_path, gradient_cache=True, sub_batch_size=4)
    with pytest.raises(config_lib.ConfigError, match=r"config.gradient_cache_chunk_size=0: expected 'auto' "):
        _config(tiny_ckpt, tmp_path, gradient_cache=True, gradient_cache_chunk_size=0)


@pytest.mark.parametrize("value", ["big", 0, -4, 2.5, True])
def test_chunk_size_is_auto_or_a_positive_int(value):
    c = config_lib.default_config()
    c.model_name_or_path, c.output_dir, c.train_data = "m", "o", "d"
    assert c.gradient_cache_chunk_size == "auto"  # the default
    config_lib.validate(c)
    c.gradient_cache_chunk_size = 8
    config_lib.validate(c)
    c.gradient_cache_chunk_size = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert str(err.value) == (f"config.gradient_cache_chunk_size={value!r}: expected 'auto' (chosen per step shape "
                              "by memory) or a positive int (rows per device per chunk)")


def test_chunk_auto_without_a_memory_budget_is_chunk_16_bitwise(tiny_ckpt, tmp_path, caplog):
    """On CPU without auto_batch_memory_gib nothing can be judged: gradient_cache_chunk_size="auto" trains with
    chunks of 16 rows, the same losses to the bit as gradient_cache_chunk_size=16 (8 queries x 4 passages per
    device: passages in 2 chunks), and says so at start."""
    common = dict(max_steps=2, save_steps=1000, logging_steps=1, gradient_cache=True, per_device_train_batch_size=8)
    fixed = trainer.train(_config(tiny_ckpt, tmp_path / "fixed", gradient_cache_chunk_size=16, **common))["losses"]
    with caplog.at_level("INFO", logger="m3jax"):
        auto = trainer.train(_config(tiny_ckpt, tmp_path / "auto", **common))["losses"]
    assert sorted(auto) == [0, 1] and auto == fixed
    lines = [r.getMessage() for r in caplog.records if "gradient_cache_chunk_size='auto'" in r.getMessage()]
    assert lines and all("16 rows per device, remat none (no memory budget to judge by)" in line for line in lines)


def test_toy_run_with_gradient_cache_matches_the_uncached_run(tiny_ckpt, tmp_path):
    """Four toy steps with dropout: 4 queries x 4 passages per device at 32 / 128 tokens; gradient_cache_chunk_tokens
    = 256 puts the 4 queries in one chunk and the passages in chunks of 2 rows: the masks of sub_batch_size=2."""
    common = dict(max_steps=4, save_steps=1000, logging_steps=1, seq_len_buckets=(128,))
    plain = trainer.train(_config(tiny_ckpt, tmp_path / "plain", sub_batch_size=2, **common))["losses"]
    cached = trainer.train(_config(tiny_ckpt, tmp_path / "cached", gradient_cache=True,
                                   gradient_cache_chunk_tokens=256, **common))["losses"]
    assert sorted(plain) == sorted(cached) == list(range(4))
    for step in range(4):
        assert abs(cached[step] - plain[step]) <= 1e-4 * abs(plain[step]), (step, cached[step], plain[step])


def _temp_bytes(tiny_ckpt, tmp_path, queries: int, group: int, **overrides) -> int:
    config = _config(tiny_ckpt, tmp_path, **overrides)
    mesh = shard_lib.make_mesh(config_lib.mesh_settings(config))
    model_cfg = loading.load_model(tiny_ckpt, config_lib.model_settings(config))[0]
    config_lib.validate_against_model(config, model_cfg)
    stepper = trainer.Stepper.build(config_lib.step_settings(config), model_cfg, mesh, total_steps=10)
    s = lambda rows, cols, dt: jax.ShapeDtypeStruct((rows, cols), dt, sharding=stepper.batch_sharding)
    batch = dict(query_input_ids=s(queries, QLEN, np.int32), query_attention_mask=s(queries, QLEN, np.int32),
                 passage_input_ids=s(queries * group, PLEN, np.int32),
                 passage_attention_mask=s(queries * group, PLEN, np.int32),
                 teacher_scores=s(queries, group, np.float32))
    compiled = stepper.step(group, False, False).lower(stepper.abstract_state(), batch).compile(FAST_COMPILE)
    return memory_record(compiled)["temp_bytes"], model_cfg


def _loss_bytes(config, model_cfg, queries: int, group: int) -> int:
    """Everything the loss alone needs at once: the representations (arguments), their gradient (outputs) and the
    loss's own working memory (temp: lexical vectors [N, V], score matrices, ...), from XLA's memory analysis of
    value_and_grad(m3_loss) with respect to the representations."""
    loss_cfg = step_lib.loss_config_from(config_lib.loss_settings(config), model_cfg, 1)
    h, d = model_cfg.hidden_size, model_cfg.colbert_out_dim
    f32, i32 = np.float32, np.int32
    reps = lambda n, length: dict(dense=jax.ShapeDtypeStruct((n, h), f32),
                                  sparse_weights=jax.ShapeDtypeStruct((n, length), f32),
                                  colbert=jax.ShapeDtypeStruct((n, length - 1, d), f32))
    ids = lambda n, length: jax.ShapeDtypeStruct((n, length), i32)

    def grads(q, p, q_ids, p_ids, q_mask):
        loss = lambda q, p: losses.m3_loss(q, p, q_ids, p_ids, q_mask, None, 0, cfg=loss_cfg, group_size=group)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(q, p)

    n = queries * group
    compiled = jax.jit(grads).lower(reps(queries, QLEN), reps(n, PLEN), ids(queries, QLEN), ids(n, PLEN),
                                    ids(queries, QLEN)).compile(FAST_COMPILE)
    rec = memory_record(compiled)
    return rec["argument_bytes"] + rec["output_bytes"] + rec["temp_bytes"]


def test_temp_memory_grows_only_through_the_cached_representations(tiny_ckpt, tmp_path):
    """Compiled temp bytes of the cached step at 8 and 16 queries x 4 passages (chunks of 4 rows): the growth per
    query is at most that of the loss alone (the cached representations, their gradient and what the loss computes
    from them -- also there without the cache) plus one more copy of the cache (the chunk-layout copies of the
    representations and their gradient); the uncached step's growth (encoder activations) is over twice that."""
    group = 4
    over = dict(gradient_cache=True, gradient_cache_chunk_size=4, **NO_DROPOUT)
    (t8, model_cfg), (t16, _) = (_temp_bytes(tiny_ckpt, tmp_path, b, group, **over) for b in (8, 16))
    config = _config(tiny_ckpt, tmp_path, **over)
    loss_slope = (_loss_bytes(config, model_cfg, 16, group) - _loss_bytes(config, model_cfg, 8, group)) / 8
    h, d = model_cfg.hidden_size, model_cfg.colbert_out_dim
    row = lambda length: 4 * h + 4 * length + 4 * (length - 1) * d  # dense + sparse weights + colbert (fp32)
    cache_per_query = row(QLEN) + group * row(PLEN)
    slope = (t16 - t8) / 8
    assert slope <= loss_slope + cache_per_query, (slope, loss_slope, cache_per_query)
    u8, u16 = (_temp_bytes(tiny_ckpt, tmp_path, b, group, **NO_DROPOUT)[0] for b in (8, 16))
    assert (u16 - u8) / 8 > 2 * slope, ((u16 - u8) / 8, slope)


# bge-m3's dimensions (hidden 1024, 16 heads, FFN 4096, vocab 250002, colbert 1024) with BGE_M3_LAYERS layers: the
# slope through the cache does not depend on depth (the cache holds last-layer outputs; a chunk's activations are
# the same at any batch), and 2 layers keep the two compiles within the CI budget.
BGE_M3_LAYERS = 2
BGE_M3_GROUP, BGE_M3_QLEN, BGE_M3_PLEN = 8, 64, 256
BGE_M3_SLOPE_BATCHES = (128, 256)


def _bge_m3_bench(cache: str):
    from benchmarks import train_step

    class FewLayers(train_step.Bench):
        def _model_config(self, hf_config):
            return super()._model_config(dict(hf_config, num_hidden_layers=BGE_M3_LAYERS))

    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    args = parser.parse_args(["--mesh", "data=1", "--remat", "none", "--attention", "xla", "--dtype", "bfloat16",
                              "--gradient-cache", cache])
    return FewLayers(args, remat="none", for_run=False)


def _bge_m3_bytes(bench, queries: int) -> dict:
    """XLA's memory analysis of the step compiled (never run; abstract state) at queries x 8:64:256."""
    shape = xla_stats.Shape(queries, BGE_M3_GROUP, BGE_M3_QLEN, BGE_M3_PLEN)
    compiled, _, _ = bench.compile(shape, abstract=True)
    return memory_record(compiled)


def _bge_m3_loss_bytes(bench, queries: int) -> int:
    """What the loss alone needs at once at bge-m3's dimensions (as `_loss_bytes`, representations in the cache's
    dtypes: dense and sparse weights float32, colbert vectors in the compute dtype)."""
    config, model_cfg = bench.config, bench.model_cfg
    loss_cfg = step_lib.loss_config_from(config_lib.loss_settings(config), model_cfg, 1)
    h, d, g = model_cfg.hidden_size, model_cfg.colbert_out_dim, BGE_M3_GROUP
    sds = jax.ShapeDtypeStruct
    reps = lambda n, length: dict(dense=sds((n, h), np.float32), sparse_weights=sds((n, length), np.float32),
                                  colbert=sds((n, length - 1, d), model_cfg.compute_dtype))
    ids = lambda n, length: sds((n, length), np.int32)

    def grads(q, p, q_ids, p_ids, q_mask, step):
        loss = lambda q, p: losses.m3_loss(q, p, q_ids, p_ids, q_mask, None, step, cfg=loss_cfg, group_size=g)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(q, p)

    n = queries * g
    compiled = jax.jit(grads).lower(reps(queries, BGE_M3_QLEN), reps(n, BGE_M3_PLEN), ids(queries, BGE_M3_QLEN),
                                    ids(n, BGE_M3_PLEN), ids(queries, BGE_M3_QLEN),
                                    sds((), np.int32)).compile(FAST_COMPILE)
    rec = memory_record(compiled)
    return rec["argument_bytes"] + rec["output_bytes"] + rec["temp_bytes"]


def test_temp_memory_slope_at_bge_m3_dimensions_is_the_cache_and_the_loss():
    """The cached step at bge-m3's dimensions (bf16, chunks of 16 rows, remat none, the recipe's loss), compiled on
    CPU without weights at 128 and 256 queries x 8 passages of 64/256 tokens. At both sizes the loss alone (its
    inputs, their gradient and its working memory, `_bge_m3_loss_bytes`) is at least 80% of the step's temp, so
    the peak is in the loss phase. The step's temp grows per query by at most what the loss alone grows by (the
    cached representations, their gradient, and what the loss derives from them: lexical vectors [N, 250002],
    score matrices) plus one more copy of the cache (4.15 MiB per query; measured on this 2-core machine: 29.0
    MiB per query against 33.0 + 4.2), and by at most twice the cache, a float32 copy of its colbert vectors and
    the lexical vectors (41.9 MiB). The uncached step's slope (every layer's activations of 9 sequences, even at 2 layers: 938 MiB
    per query at 64 -> 128) is over ten times the bound, so the bound fails when the cache is off."""
    small, large = BGE_M3_SLOPE_BATCHES
    bench = _bge_m3_bench("16")
    t_small, t_large = (_bge_m3_bytes(bench, b)["temp_bytes"] for b in (small, large))
    l_small, l_large = (_bge_m3_loss_bytes(bench, b) for b in (small, large))
    slope, loss_slope = (t_large - t_small) / (large - small), (l_large - l_small) / (large - small)
    h, d, g = bench.model_cfg.hidden_size, bench.model_cfg.colbert_out_dim, BGE_M3_GROUP
    row = lambda length: 4 * h + 4 * length + 2 * (length - 1) * d  # dense, sparse weights (f32), colbert (bf16)
    cache_per_query = row(BGE_M3_QLEN) + g * row(BGE_M3_PLEN)
    bound = loss_slope + cache_per_query
    mib = lambda x: f"{x / 2**20:.1f} MiB"
    print(f"bge-m3 dims, {BGE_M3_LAYERS} layers: temp {mib(t_small)} -> {mib(t_large)}, loss alone {mib(l_small)} "
          f"-> {mib(l_large)}; per query: step {mib(slope)}, loss {mib(loss_slope)}, cache {mib(cache_per_query)}")
    assert l_small >= 0.8 * t_small and l_large >= 0.8 * t_large, (l_small, t_small, l_large, t_large)
    assert slope <= bound, (slope, loss_slope, cache_per_query)
    # ... and in absolute terms: at most the cache, a float32 copy of its colbert vectors (XLA:CPU runs bf16 dots
    # in float32), the 9 lexical vectors, and a gradient of each (41.9 MiB per query)
    colbert_f32 = 4 * (BGE_M3_QLEN - 1 + g * (BGE_M3_PLEN - 1)) * d
    lexical = (1 + g) * 4 * bench.model_cfg.vocab_size
    assert slope <= 2 * (cache_per_query + colbert_f32 + lexical), (slope, cache_per_query, colbert_f32, lexical)
    uncached = _bge_m3_bench("off")
    u_small, u_large = (_bge_m3_bytes(uncached, b)["temp_bytes"] for b in (small // 2, small))
    u_slope = (u_large - u_small) / (small - small // 2)
    print(f"uncached: temp {mib(u_small)} -> {mib(u_large)} at {small // 2} -> {small}: {mib(u_slope)} per query")
    assert u_slope > 10 * bound, (u_slope, bound)
