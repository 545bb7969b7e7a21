"""The Flax encoder and heads against transformers' XLMRobertaModel, and the HF <-> Flax weight mapping."""
import functools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from m3jax.io import hf_layout, hf_read
from m3jax.model import encoder as m3model
from m3jax.model import loading

TEXTS = [
    "What is the boiling point of water at sea level?",
    "Wasser kocht bei 100 Grad Celsius.",
    "北京是中国的首都。",
    "a",
    "the the the the the the the the the the",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product "
    "of splitting water molecules inside the chloroplasts of plant cells.",
]


def _batch(path, texts, max_length=48):
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@pytest.mark.stack_sensitive
def test_encoder_matches_transformers_fp32(tiny_ckpt):
    ids, mask = _batch(tiny_ckpt, TEXTS)
    assert len(set(mask.sum(1))) > 3  # a padded batch of varied lengths
    torch_model = AutoModel.from_pretrained(tiny_ckpt).eval()
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
    cfg, params, _ = loading.load_model(tiny_ckpt)
    out = m3model.BGEM3(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                   method=m3model.BGEM3.encode_hidden)
    real = mask.astype(bool)  # padded positions are never used downstream
    assert np.abs(np.asarray(out)[real] - ref[real]).max() <= 1e-5


def test_safetensors_and_pytorch_bin_give_identical_params(tiny_ckpt, tmp_path):
    only_bin = tmp_path / "bin"
    shutil.copytree(tiny_ckpt, only_bin)
    os.remove(only_bin / "model.safetensors")
    _, from_safetensors, _ = loading.load_model(tiny_ckpt)
    _, from_bin, _ = loading.load_model(str(only_bin))
    jax.tree.map(np.testing.assert_array_equal, from_safetensors, from_bin)


@pytest.mark.stack_sensitive
def test_hf_flax_mapping_round_trips_bitwise(tiny_ckpt):
    ckpt = hf_read.load_hf_checkpoint(tiny_ckpt)
    cfg, params, _ = loading.load_model(tiny_ckpt)
    encoder, colbert, sparse = m3model.params_to_hf(params, cfg)
    assert encoder.keys() == ckpt.encoder.keys()
    for name, array in ckpt.encoder.items():
        np.testing.assert_array_equal(encoder[name], array, err_msg=name)
    for got, want in ((colbert, ckpt.colbert), (sparse, ckpt.sparse)):
        for k in ("weight", "bias"):
            np.testing.assert_array_equal(got[k], want[k])


def test_flax_param_tree_matches_init_and_every_param_has_logical_axes(tiny_ckpt):
    cfg, params, _ = loading.load_model(tiny_ckpt)
    boxed = m3model.abstract_params(cfg)["params"]
    assert jax.tree.map(lambda a: a.shape, nn.unbox(boxed)) == jax.tree.map(np.shape, params)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    layer_kernel = boxed["encoder"]["layers"]["query"]["kernel"]
    assert layer_kernel.names == ("layers", "embed", "heads", "kv")


def test_layers_are_scanned_so_program_size_does_not_grow_with_depth():
    def n_ops(layers):
        cfg = m3model.ModelConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=40)
        model = m3model.BGEM3(cfg)
        ids = jnp.ones((2, 8), jnp.int32)
        params = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
        return len(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, ids))(params).eqns)

    assert n_ops(2) == n_ops(12)


def test_heads_follow_flagembedding_definitions(tiny_ckpt):
    ids, mask = _batch(tiny_ckpt, TEXTS)
    cfg, params, _ = loading.load_model(tiny_ckpt)
    model = m3model.BGEM3(cfg)
    out = model.apply({"params": params}, ids, mask)
    hidden = np.asarray(model.apply({"params": params}, ids, mask, method=m3model.BGEM3.encode_hidden))
    dense = hidden[:, 0] / np.linalg.norm(hidden[:, 0], axis=-1, keepdims=True)
    np.testing.assert_allclose(out["dense"], dense, atol=1e-6)
    w = np.maximum(hidden @ params["sparse_linear"]["kernel"] + params["sparse_linear"]["bias"], 0)[..., 0]
    np.testing.assert_allclose(out["sparse_weights"], w, atol=1e-6)
    col = (hidden[:, 1:] @ params["colbert_linear"]["kernel"] + params["colbert_linear"]["bias"]) * mask[:, 1:, None]
    col = col / np.maximum(np.linalg.norm(col, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(out["colbert"], col, atol=1e-6)
    assert np.all(np.asarray(out["colbert"])[mask[:, 1:] == 0] == 0)

    mean_cfg = m3model.ModelConfig(**{**cfg.__dict__, "sentence_pooling_method": "mean", "normalize_embeddings": False})
    mean = m3model.BGEM3(mean_cfg).apply({"params": params}, ids, mask)["dense"]
    np.testing.assert_allclose(mean, (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True), atol=1e-6)


def test_bf16_compute_and_remat_policies_stay_close_to_fp32(tiny_ckpt):
    ids, mask = _batch(tiny_ckpt, TEXTS)
    cfg, params, _ = loading.load_model(tiny_ckpt)
    ref = m3model.BGEM3(cfg).apply({"params": params}, ids, mask)["dense"]
    def grads(policy):
        model = m3model.BGEM3(m3model.ModelConfig(**{**cfg.__dict__, "remat_policy": policy}))
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, ids, mask)["dense"].sum()))(params)

    plain = grads("none")
    for policy in ("full", "dots", "dots_no_batch"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads(policy), plain)
    bf16 = m3model.BGEM3(m3model.ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"}))
    assert np.abs(np.asarray(bf16.apply({"params": params}, ids, mask)["dense"]) - np.asarray(ref)).max() < 0.05


def test_dropout_is_active_only_when_not_deterministic(tiny_ckpt):
    ids, mask = _batch(tiny_ckpt, TEXTS[:3])
    cfg, params, _ = loading.load_model(tiny_ckpt)
    assert cfg.hidden_dropout_prob == 0.1 and cfg.attention_probs_dropout_prob == 0.1  # bge-m3's config
    model = m3model.BGEM3(cfg)
    det = model.apply({"params": params}, ids, mask)["dense"]
    apply = jax.jit(lambda key: model.apply({"params": params}, ids, mask, deterministic=False,
                                            rngs={"dropout": key})["dense"])
    run = lambda seed: apply(jax.random.key(seed))
    assert not np.allclose(run(0), det, atol=1e-4)
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2), atol=1e-4)


def test_explicit_colbert_dim_must_match_the_head_file(make_ckpt):
    path = make_ckpt(colbert_dim=16)
    cfg, params, _ = loading.load_model(path)
    assert cfg.colbert_out_dim == 16 and params["colbert_linear"]["kernel"].shape == (32, 16)
    with pytest.raises(hf_layout.CheckpointFormatError, match="colbert_linear.pt.*16 output dims.*colbert_dim=8"):
        loading.load_model(path, loading.ModelSettings(colbert_dim=8))


def test_missing_heads_start_fresh_with_a_warning(make_ckpt):
    path = make_ckpt(with_heads=False)
    with pytest.warns(UserWarning, match="(?i)initiali"):
        cfg, params = loading.load_model(path, loading.ModelSettings(colbert_dim=12), seed=3)[:2]
    assert params["colbert_linear"]["kernel"].shape == (32, 12)
    bound = 1 / np.sqrt(32)  # torch.nn.Linear's default init
    assert 0 < np.abs(params["colbert_linear"]["kernel"]).max() <= bound


def test_colbert_scores_in_passage_blocks_equal_one_block():
    from m3jax.core import scores

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((12, 7, 8)), jnp.float32).at[:, 5:].set(0.0)  # padded tokens: zero vectors
    mask = jnp.asarray(np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]), jnp.int32)
    per_passage = 3 * 5 * 7 * 4

    def colbert(q, p, block_bytes=256 * 2**20):
        return scores.colbert_scores(scores.TokenVecs(q, mask[:, 1:]), scores.TokenVecs(p), block_bytes=block_bytes)

    def f(q, p, block_bytes):
        return jnp.sum(jnp.sin(colbert(q, p, block_bytes)))

    for block_bytes in (per_passage * 4, per_passage * 5, per_passage):  # blocks of 4 passages, of 3, of 1
        np.testing.assert_allclose(colbert(q, p, block_bytes), colbert(q, p), atol=1e-6)
        for a, b in zip(jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(q, p, block_bytes),
                        jax.grad(f, argnums=(0, 1))(q, p, 2**30)):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_unrolled_layers_equal_the_layer_scan(tiny_ckpt, policy):
    """The layer loop (scan_layers=False: GPU training, cuDNN's attention dropout) reads the scan's stacked
    parameters: with dropout rates 0 it computes what the scan computes, its gradients land in the same stacked
    layout, and inference keeps the scan."""
    ids, mask = _batch(tiny_ckpt, TEXTS)
    cfg, params, _ = loading.load_model(tiny_ckpt)
    cfg = m3model.ModelConfig(**{**cfg.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                 "remat_policy": policy})
    model, loop_model = m3model.BGEM3(cfg), m3model.BGEM3(m3model.ModelConfig(**{**cfg.__dict__, "scan_layers": False}))

    def loss(p, model=model):
        out = model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
        return out["dense"].sum() + out["sparse_weights"].sum() + out["colbert"].astype(jnp.float32).sum()

    scan_loss, scan_grads = jax.value_and_grad(loss)(params)
    loop_loss_fn = functools.partial(loss, model=loop_model)
    jaxpr = str(jax.make_jaxpr(loop_loss_fn)(params))
    assert "scan[" not in jaxpr and "while[" not in jaxpr  # one call site per layer
    assert "scan[" in str(jax.make_jaxpr(lambda p: loop_model.apply({"params": p}, ids, mask))(params))  # inference
    loop_loss, loop_grads = jax.value_and_grad(loop_loss_fn)(params)
    np.testing.assert_allclose(loop_loss, scan_loss, rtol=1e-6)
    # float32 sums in another order: within 1e-6 of the largest gradient (some, like the key bias's, are 0 + noise)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(scan_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=0), loop_grads, scan_grads)


def test_unrolled_layers_give_each_layer_and_stream_its_own_cudnn_seed(tiny_ckpt, monkeypatch):
    """cuDNN's dropout seed is static per call site: layer i of stream s (queries 0, passages 1) gets
    dropout_seed + s * layers + i, so no two call sites of a step share a keep mask."""
    ids, mask = _batch(tiny_ckpt, TEXTS[:2])
    cfg, params, _ = loading.load_model(tiny_ckpt)
    cfg = m3model.ModelConfig(**{**cfg.__dict__, "dropout_seed": 100, "scan_layers": False})
    seeds = []
    monkeypatch.setattr(m3model.attention, "attention",
                        lambda q, k, v, lengths, **kw: seeds.append(kw["cudnn_seed"]) or q)
    for stream in (0, 1):
        m3model.BGEM3(cfg).apply({"params": params}, ids, mask, deterministic=False, dropout_stream=stream,
                                 rngs={"dropout": jax.random.key(0)})
    n = cfg.num_hidden_layers
    assert seeds == [100 + i for i in range(2 * n)]
