"""Packed sequences in the train step (config.packing; m3jax.data.pipeline.pack_batch, m3jax.train.step.packed_outputs).

The packed step encodes each device block's queries and passages together in rows of several texts and gathers
every text's tokens back into the padded layout before the heads, so its loss and gradients must equal the padded
step's on the same examples (float32, dropout off: within 1e-5 relative, per tensor as in tests/test_gradient_cache.py)
for each head, with self-distillation, teacher scores, no_in_batch_neg and on two devices. Then the pipeline: the
packed batches are a deterministic function of the step, and a packed run resumes bitwise.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax import trainer
from m3jax.core import packing
from m3jax.core import sharding as shard_lib
from m3jax.data.pipeline import pack_batch
from m3jax.io import checkpoint as ckpt_lib
from m3jax.model import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
TENSOR_FLOOR = 1e-2  # as in tests/test_losses.py
FAST_COMPILE = {"xla_backend_optimization_level": 0}
QLEN, PLEN = 16, 32
LADDER = (16, 32, 64)
NO_DROPOUT = {"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0}


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
    """Random texts with cls first and eos last, right-padded (lengths 3 .. the pad length; some full rows)."""
    rng = np.random.default_rng(seed)

    def rows(n, length):
        ids = np.ones((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        for i in range(n):
            k = length if i % 5 == 0 else int(rng.integers(3, length))
            ids[i, :k] = rng.integers(5, vocab, size=k)
            ids[i, 0], ids[i, k - 1] = 0, 2
            mask[i, :k] = 1
        return ids, mask

    q, qm = rows(queries, QLEN)
    p, pm = rows(queries * group, PLEN)
    return dict(query_input_ids=q, query_attention_mask=qm, passage_input_ids=p, passage_attention_mask=pm,
                teacher_scores=rng.normal(size=(queries, group)).astype(np.float32))


PACKED_ONLY = ("packed_input_ids", "packed_segment_ids", "packed_position_ids", "packed_starts", "query_index",
               "passage_index", "teacher_scores")


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
    (loss, parts), grads = fn.lower(*args).compile(FAST_COMPILE)(*args)
    return float(loss), jax.tree.map(float, parts), jax.tree.map(np.asarray, grads)


def _assert_same(packed, padded):
    (l_c, parts_c, g_c), (l_u, parts_u, g_u) = packed, padded
    assert abs(l_c - l_u) <= RTOL * abs(l_u), (l_c, l_u)
    for k in parts_u:
        assert abs(parts_c[k] - parts_u[k]) <= RTOL * max(abs(parts_u[k]), 1e-6), (k, parts_c[k], parts_u[k])
    flat_c, flat_u = jax.tree_util.tree_leaves_with_path(g_c), jax.tree_util.tree_leaves_with_path(g_u)
    assert [p for p, _ in flat_c] == [p for p, _ in flat_u]
    largest = max(float(np.abs(b).max()) for _, b in flat_u)
    assert largest > 0
    for (path, a), (_, b) in zip(flat_c, flat_u):
        scale = max(float(np.abs(b).max()), TENSOR_FLOOR * largest)
        assert float(np.abs(a - b).max()) <= RTOL * scale, (jax.tree_util.keystr(path), np.abs(a - b).max(), scale)


SD = dict(use_self_distill=True)
KD = dict(knowledge_distillation=True)
# id, overrides, (queries per device, group, devices), step, no_in_batch_neg, teacher scores, base row length
CASES = [
    ("all-heads-self-distill", SD, (3, 4, 1), 3, False, False, 64),
    ("dense-only", dict(heads=("dense",)), (3, 4, 1), 0, False, False, 64),
    ("sparse-only", dict(heads=("sparse",)), (3, 4, 1), 0, False, False, 64),
    ("colbert-only", dict(heads=("colbert",)), (3, 4, 1), 0, False, False, 64),
    ("teacher-kl-div-sd", dict(SD, **KD), (3, 4, 1), 3, False, True, 32),
    ("teacher-m3-kd-loss", dict(KD, kd_loss_type="m3_kd_loss"), (3, 4, 1), 0, False, True, 64),
    ("no-in-batch-neg-sd", SD, (3, 4, 1), 3, True, False, 64),
    ("mean-pooling-fix-encoder", dict(sentence_pooling_method="mean", fix_encoder=True), (3, 2, 1), 0, False,
     False, 32),
    ("two-devices-cross-device-sd", dict(SD, negatives_cross_device=True, **{"mesh.data": 2}), (2, 4, 2), 3, False,
     False, 64),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_packed_step_equals_padded_step(tiny_ckpt, tmp_path, case):
    _, overrides, (queries, group, devices), step, nibn, teacher, base = case
    overrides = dict(overrides, **NO_DROPOUT)
    vocab = loading.load_model(tiny_ckpt)[0].vocab_size
    batch = _batch(vocab, queries * devices, group)
    packed = pack_batch(batch, devices, base, LADDER, pad_id=1)
    # several texts share rows: fewer tokens computed than padded
    assert packed["packed_input_ids"].size < batch["query_input_ids"].size + batch["passage_input_ids"].size
    assert (packed["packed_segment_ids"].max(axis=1) > 1).any()
    kw = dict(step=step, group=group, nibn=nibn, teacher=teacher)
    padded_result = _loss_and_grads(tiny_ckpt, tmp_path, overrides, batch, **kw)
    packed_result = _loss_and_grads(tiny_ckpt, tmp_path, overrides, {k: packed[k] for k in PACKED_ONLY}, **kw)
    _assert_same(packed_result, padded_result)


def test_packed_step_with_flash_dropout_equals_the_xla_path(tiny_ckpt, tmp_path):
    """Attention and hidden dropout on (the tiny model's 0.1): the packed step with the flash-dropout kernel
    (interpreted) on rows of 128 equals the packed step on XLA's materialised probabilities (loss and gradients
    within 1e-5): the kernel takes the rows' segment ids and draws the same hash mask."""
    vocab = loading.load_model(tiny_ckpt)[0].vocab_size
    batch = _batch(vocab, 3, 4, seed=1)
    packed = pack_batch(batch, 1, 128, LADDER + (128,), pad_id=1)
    assert packed["packed_input_ids"].shape[1] == 128 and (packed["packed_segment_ids"].max(axis=1) > 3).all()
    arrays = {k: packed[k] for k in PACKED_ONLY}
    kw = dict(step=3, group=4, nibn=False, teacher=False)
    results = {impl: _loss_and_grads(tiny_ckpt, tmp_path, dict(SD, **{"model.attention_implementation": impl}),
                                     arrays, **kw) for impl in ("xla", "flash-dropout")}
    _assert_same(results["flash-dropout"], results["xla"])
    no_attention_dropout = _loss_and_grads(tiny_ckpt, tmp_path, dict(SD, **{"model.attention_probs_dropout_prob": 0.0}),
                                           arrays, **kw)
    assert abs(no_attention_dropout[0] - results["xla"][0]) > 1e-3  # the attention dropout did something


def test_row_count_ladder():
    assert [packing.row_count(n) for n in (0, 1, 16, 17, 32, 33, 35, 65, 1000)] == [1, 1, 16, 17, 32, 34, 36, 68, 1024]
    counts = {packing.row_count(n) for n in range(1, 4097)}
    assert len(counts) == 16 + 16 * 8  # 1..16, then 16 per octave up to 4096
    assert all(packing.row_count(n) - n < max(1, n / 16) for n in range(1, 4097))


def test_pack_batch_layout():
    """Two device blocks of 2 queries x 2 passages: each block's texts in its own rows, tokens found again by the
    gather index at their padded positions."""
    ids = lambda *texts: (np.array([t + [1] * (8 - len(t)) for t in texts], np.int32),
                          np.array([[1] * len(t) + [0] * (8 - len(t)) for t in texts], np.int32))
    q, qm = ids([0, 5, 2], [0, 6, 6, 2], [0, 7, 2], [0, 8, 8, 8, 8, 8, 8, 2])
    p, pm = ids(*[[0] + [10 + i] * (i % 7) + [2] for i in range(8)])
    batch = dict(query_input_ids=q, query_attention_mask=qm, passage_input_ids=p, passage_attention_mask=pm)
    out = pack_batch(batch, 2, 16, (8, 16), pad_id=1)
    rows = out["packed_input_ids"]
    assert rows.shape[1] == 16 and rows.shape[0] % 2 == 0
    half = rows.shape[0] // 2
    for side, n_per_block in (("query", 2), ("passage", 4)):
        index, src, mask = out[f"{side}_index"], batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        assert index.shape == src.shape
        np.testing.assert_array_equal(index >= 0, mask > 0)
        for i in range(len(src)):
            block = rows[(i // n_per_block) * half:(i // n_per_block + 1) * half].reshape(-1)
            np.testing.assert_array_equal(block[index[i][mask[i] > 0]], src[i][mask[i] > 0])
    seg, pos = out["packed_segment_ids"], out["packed_position_ids"]
    assert ((seg == 0) == (rows == 1)).all()
    assert (pos[seg == 0] == 1).all() and (pos[(seg > 0) & (rows == 0)] == 2).all()  # positions restart per text
    assert out["packed_starts"].shape[1] == packing.segment_slots(int(seg.max()))
    again = pack_batch(batch, 2, 16, (8, 16), pad_id=1)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # deterministic


# ---- the pipeline and the run ---------------------------------------------------------------------------------

def _train_data(tiny_ckpt, tmp_path, **overrides):
    from m3jax.data import build as data_build

    config = _config(tiny_ckpt, tmp_path, packing=True, **overrides)
    tokenizer = loading.load_tokenizer(loading.find_model(str(tiny_ckpt)))
    return data_build.build_train_data(config_lib.data_settings(config), tokenizer, num_batch_shards=2)


def test_packed_batches_are_deterministic_and_resume_exactly(tiny_ckpt, tmp_path, caplog):
    caplog.set_level("INFO", logger="m3jax")
    a = _train_data(tiny_ckpt, tmp_path / "a")
    assert "packing: rows of 128 tokens" in caplog.text  # 8 toy texts of ~40 tokens: room for 8 of the mean
    b = _train_data(tiny_ckpt, tmp_path / "b")
    steps = range(5)
    first = [a.batch(s) for s in steps]
    for s, batch in zip(steps, first):
        again = b.batch(s)
        assert sorted(batch) == sorted(again)
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])
        rows, seg = batch["packed_input_ids"], batch["packed_segment_ids"]
        assert rows.shape[0] % 2 == 0 and rows.shape[1] in (128,)
        assert int((seg > 0).sum()) == int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum())
        assert rows.size < batch["query_input_ids"].size + batch["passage_input_ids"].size
    it = a.iterator(0)
    next(it), next(it)
    state = it.get_state()
    resumed = b.iterator(0)
    resumed.set_state(state)
    for s in (2, 3, 4):
        got = next(resumed)
        for k in first[s]:
            np.testing.assert_array_equal(got[k], first[s][k])
    it.close(), resumed.close()


@pytest.mark.parametrize("overrides", [{}, dict(shuffle_ratio=0.5, knowledge_distillation=True)],
                         ids=["plain", "shuffled-teacher"])
def test_two_processes_pack_the_global_batch_of_one(tiny_ckpt, tmp_path, monkeypatch, overrides):
    """Two processes (built here side by side, as each would in its own job): the same base row length, the same
    packed shape at every step, and their local packed batches, stacked, are the one-process batch bitwise -- each
    process packs its own device blocks into the shape planned from the global batch's token lengths."""
    from m3jax.data import build as data_build

    monkeypatch.setenv("M3JAX_CACHE_DIR", str(tmp_path / "cache"))
    config = _config(tiny_ckpt, tmp_path, packing=True, per_device_train_batch_size=1, **overrides)
    tokenizer = loading.load_tokenizer(loading.find_model(str(tiny_ckpt)))
    settings = config_lib.data_settings(config)
    build = lambda p, n: data_build.build_train_data(settings, tokenizer, num_batch_shards=4, process_index=p,
                                                     process_count=n)
    one, procs = build(0, 1), [build(0, 2), build(1, 2)]
    bases = {stage.base_row_length for d in (one, *procs) for stage in d._pipeline.stages if hasattr(stage, "ladder")}
    assert len(bases) == 1
    base, = bases
    ladder = data_build.packing_ladder(settings)
    own_shape_differs = 0
    for step in range(one.steps_per_epoch):
        whole, halves = one.batch(step), [d.batch(step) for d in procs]
        assert halves[0]["packed_input_ids"].shape == halves[1]["packed_input_ids"].shape  # the same shapes
        assert halves[0]["packed_starts"].shape == halves[1]["packed_starts"].shape
        assert sorted(halves[0]) == sorted(whole)  # the pack_to hand-over is gone
        for k in whole:
            if np.ndim(whole[k]):
                np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k], err_msg=k)
        # what a process planning from its own slice alone would build: another shape at some steps
        own = [pack_batch(h, 2, base, ladder, pad_id=1)["packed_input_ids"].shape for h in halves]
        own_shape_differs += own[0] != own[1]
    assert own_shape_differs > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_packed_two_process_run_equals_the_packed_one_process_run(tiny_ckpt, tmp_path):
    """train.py as 2 processes x 4 devices (jax.distributed, gloo on loopback) with packing=True: the losses of the
    one-process packed run on 8 devices with the same global batch within 1e-5 (its packed batch is the processes'
    stacked, bitwise: the test above; the same program on the same mesh shape). Not bitwise: steps 1-2 are, step 3
    is one float32 ulp apart, presumably as gloo's cross-process all-reduces sum in another order than XLA's
    in-process ones."""
    from test_train import _two_processes, cli_args, read_metrics

    common = dict(max_steps=3, save_steps=1000, eval_steps=0, per_device_train_batch_size=1, packing=True)
    single = trainer.train(_config(tiny_ckpt, tmp_path / "single", **{"mesh.data": 8}, **common))["losses"]
    out_dir = str(tmp_path / "multi")
    procs = _two_processes(cli_args(tiny_ckpt, out_dir, seq_len_buckets="(32,64)", **{"mesh.data": -1}, **common))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    multi = read_metrics(out_dir)
    for step in range(3):  # observed: steps 1-2 bitwise, step 3 one float32 ulp apart (cross-process reductions)
        assert abs(multi[step + 1]["loss"] - single[step]) <= 1e-5 * abs(single[step]), (step, multi[step + 1],
                                                                                         single[step])


def test_packing_config_errors(tiny_ckpt, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"config.packing=True: expected False with sub_batch_size"):
        _config(tiny_ckpt, tmp_path, packing=True, sub_batch_size=2)
    with pytest.raises(config_lib.ConfigError, match=r"config.packing=True: expected False with sub_batch_size or "
                                                       r"gradient_cache"):
        _config(tiny_ckpt, tmp_path, packing=True, gradient_cache=True)


def test_packed_run_matches_the_padded_run_and_resumes_bitwise(tiny_ckpt, tmp_path):
    """The toy config without dropout: 6 steps packed equal 6 padded steps (float32 rounding of the encoder);
    a packed run stopped at step 3 and resumed gives the uninterrupted packed run's losses and params bitwise."""
    from test_train import final_params

    common = dict(save_steps=3, logging_steps=1, **NO_DROPOUT)
    padded = trainer.train(_config(tiny_ckpt, tmp_path / "padded", max_steps=6, **common))["losses"]
    packed = trainer.train(_config(tiny_ckpt, tmp_path / "packed", max_steps=6, packing=True, **common))["losses"]
    assert sorted(padded) == sorted(packed) == list(range(6))
    for step in range(6):
        assert abs(packed[step] - padded[step]) <= 1e-4 * abs(padded[step]), (step, packed[step], padded[step])
    # the packed run as if stopped after its step-3 checkpoint: a copy without step 6 resumes from step 3
    shutil.copytree(tmp_path / "packed", tmp_path / "resumed")
    shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(str(tmp_path / "resumed")), "6"))
    resumed = trainer.train(_config(tiny_ckpt, tmp_path / "resumed", max_steps=6, packing=True, **common))["losses"]
    assert sorted(resumed) == [3, 4, 5]
    for step in (3, 4, 5):
        assert resumed[step] == packed[step], step
    (step_a, params_a), (step_b, params_b) = final_params(str(tmp_path / "packed")), final_params(
        str(tmp_path / "resumed"))
    assert step_a == step_b == 6
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
