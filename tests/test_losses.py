"""m3jax.train.losses.m3_loss (+ the model's heads and encoder) against FlagEmbedding 1.4.2's EncoderOnlyEmbedderM3Model.

Reference: FlagEmbedding in training mode with dropout off (tests/fe_reference.py), on the same checkpoint and the
same tokenized batch (texts truncated / padded to L tokens, so short texts carry padding and long ones none).
Checkpoints: conftest's tiny one, and a "flat" copy with 10x smaller encoder weights, whose CLS embeddings are
nearly identical across texts (see flattened()): a degenerate but valid regime. Compared: the loss, |l_jax - l_fe| <= 1e-5 |l_fe|, and the gradient of EVERY parameter (encoder,
pooler, colbert_linear, sparse_linear) mapped to HF names with `params_to_hf`, per tensor within 1e-4 of the
tensor's own largest reference gradient, floored at 1% of the largest over all tensors (see compare()).

JAX side, for one compile per distinct shape: every single-device batch is laid out as ROWS x L token rows (B
queries, B*G passages, then filler rows nothing reads); the encoder forward and its VJP are jitted once for that
shape, and the heads + m3_loss + their gradient once per static setting (heads config, LossConfig, B, G,
no_in_batch_neg); the optimizer step is a traced argument. Parameter gradients are the encoder VJP of the loss's
gradient w.r.t. the hidden states (the chain rule across the two jits). The cross-device tests run model.apply +
m3_loss under one jax.jit on a 2-device mesh.

FlagEmbedding 1.4.2 gets two no_in_batch_neg settings wrong (ensemble over a [B, 1] diagonal, or IndexError); m3jax
computes the formula, and those cases are compared with `fe_reference.PatchedM3Model`, which fixes exactly those
two index bugs. The test_upstream_* tests pin the upstream behaviour, so a FlagEmbedding fix shows up here.

M3JAX_PARITY_DATA=/path/file.jsonl adds parity checks on batches built from that file (test_parity_data_file).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from m3jax.core import scores
from m3jax.io import hf_read, hf_write
from m3jax.model import encoder as m3model
from m3jax.model import loading
from m3jax.train import losses

pytestmark = pytest.mark.needs_flagembedding  # conftest deselects these where FlagEmbedding does not import
try:
    import fe_reference as fer
except ImportError:  # no FlagEmbedding: the module still collects, for conftest to deselect (or fail the pinned stack)
    fer = None

L = 64  # tokens per text (truncation and padding length)
ROWS = 20  # encoder rows per single-device batch: B queries + B*G passages <= ROWS
SD_START = 4  # self_distill_start_step of the self-distillation cases
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
TENSOR_FLOOR = 1e-2  # see compare()

# ---------------------------------------------------------------------------------------------------------------
# The covering table. sd: "off" (use_self_distill False), "inactive" (on, step == start: FlagEmbedding and m3jax
# both require step > start), "active" (on, step == start + 1). B per G: as large as ROWS allows (B*(1+G) <= 20),
# so B > G for G in (1, 2) and B < G for G = 8 -- the two no_in_batch_neg + unified regimes of the upstream bug.

CASES = [
    dict(id="none-g1-sdoff-inbatch-unified-cls-cb16-tiny", B=6, G=1, kd="none", nibn=False, unified=True, sd="off",
         pooling="cls", colbert_dim=16, ckpt="flat"),
    dict(id="none-g2-sdinactive-nibn-dense-mean-tiny", B=4, G=2, kd="none", nibn=True, unified=False,
         sd="inactive", pooling="mean", colbert_dim=-1, ckpt="flat"),
    dict(id="none-g8-sdactive-nibn-dense-mean-cb16", B=2, G=8, kd="none", nibn=True, unified=False, sd="active",
         pooling="mean", colbert_dim=16, ckpt="tiny"),
    dict(id="m3kd-g1-sdinactive-inbatch-dense-cls-cb16", B=6, G=1, kd="m3_kd_loss", nibn=False, unified=False,
         sd="inactive", pooling="cls", colbert_dim=16, ckpt="tiny"),
    dict(id="m3kd-g2-sdactive-nibn-unified-cls", B=4, G=2, kd="m3_kd_loss", nibn=True, unified=True, sd="active",
         pooling="cls", colbert_dim=-1, ckpt="tiny"),
    dict(id="m3kd-g8-sdoff-nibn-dense-mean-cb16", B=2, G=8, kd="m3_kd_loss", nibn=True, unified=False, sd="off",
         pooling="mean", colbert_dim=16, ckpt="tiny"),
    # G = 1 without in-batch negatives: one column per row, every term is exactly 0 (both implementations).
    dict(id="kldiv-g1-sdactive-nibn-dense-cls", B=6, G=1, kd="kl_div", nibn=True, unified=False, sd="active",
         pooling="cls", colbert_dim=-1, ckpt="tiny"),
    dict(id="kldiv-g2-sdoff-inbatch-unified-mean-tiny", B=4, G=2, kd="kl_div", nibn=False, unified=True, sd="off",
         pooling="mean", colbert_dim=-1, ckpt="flat"),
    dict(id="kldiv-g8-sdinactive-nibn-unified-mean-cb16", B=2, G=8, kd="kl_div", nibn=True, unified=True,
         sd="inactive", pooling="mean", colbert_dim=16, ckpt="tiny"),
    dict(id="m3kd-g8-sdactive-inbatch-unified-cls-cb16", B=2, G=8, kd="m3_kd_loss", nibn=False, unified=True,
         sd="active", pooling="cls", colbert_dim=16, ckpt="tiny"),
    # the recipe: unified + self-distillation, in-batch negatives, with and without teacher scores
    dict(id="none-g8-sdactive-inbatch-unified-cls", B=2, G=8, kd="none", nibn=False, unified=True, sd="active",
         pooling="cls", colbert_dim=-1, ckpt="tiny"),
    dict(id="kldiv-g2-sdactive-inbatch-unified-cls", B=4, G=2, kd="kl_div", nibn=False, unified=True, sd="active",
         pooling="cls", colbert_dim=-1, ckpt="tiny"),
]

SWITCHES = {
    "G": (1, 2, 8),
    "kd": ("none", "m3_kd_loss", "kl_div"),
    "nibn": (False, True),
    "unified": (False, True),
    "sd": ("off", "inactive", "active"),
    "pooling": ("cls", "mean"),
    "colbert_dim": (-1, 16),
    # checkpoint: "tiny" = conftest's tiny checkpoint; "flat" = the same with 10x smaller encoder weights, whose CLS
    # embeddings barely differ between texts (see flattened())
    "ckpt": ("tiny", "flat"),
}
# Switches that change each other's computation: every combination of values of each pair must be in the table.
INTERACTING_PAIRS = [
    ("kd", "nibn"),  # kd on [B, B*G] vs own-group [B, G] scores (and the upstream m3_kd_loss bug)
    ("sd", "unified"),  # self-distillation only exists with the unified heads
    ("G", "kd"),  # teacher over the group; m3_kd_loss loops over the group
    ("unified", "nibn"),  # per-head no-in-batch scores (and the upstream ensemble bug)
    ("sd", "nibn"),  # self-distillation teacher from own-group ensemble scores
    ("pooling", "unified"),
    ("kd", "unified"),  # kd applies to sparse, colbert and ensemble too
    ("sd", "kd"),  # ensemble (self-distillation teacher) includes the kd terms' scores
    ("G", "nibn"),  # G = 1 without in-batch negatives is degenerate (loss 0)
    ("G", "unified"),
    ("colbert_dim", "unified"),
    ("colbert_dim", "kd"),
    ("pooling", "nibn"),
    ("ckpt", "pooling"),  # the raw tiny checkpoint's CLS embeddings are all alike: cls and mean behave differently
    ("ckpt", "unified"),
]


def _sd_settings(sd: str) -> tuple[bool, int, int]:
    """(use_self_distill, self_distill_start_step, step) of a case."""
    return sd != "off", SD_START, SD_START + (0 if sd == "inactive" else 1)


def test_case_table_covers_switches_and_pairs():
    ids = [c["id"] for c in CASES]
    assert len(set(ids)) == len(ids)
    for c in CASES:
        assert set(c) == {"id", "B"} | set(SWITCHES), c["id"]
        assert c["B"] * (1 + c["G"]) <= ROWS, c["id"]
    for name, values in SWITCHES.items():
        assert {c[name] for c in CASES} == set(values), name
    for a, b in INTERACTING_PAIRS:
        missing = set(itertools.product(SWITCHES[a], SWITCHES[b])) - {(c[a], c[b]) for c in CASES}
        assert not missing, f"({a}, {b}) combinations missing from CASES: {sorted(missing, key=str)}"
    # both regimes of the upstream no_in_batch_neg + unified bug, and the m3_kd_loss one, are compared
    nibn_unified = [c for c in CASES if c["nibn"] and c["unified"]]
    assert any(c["B"] > c["G"] for c in nibn_unified) and any(c["B"] <= c["G"] for c in nibn_unified)
    assert any(c["nibn"] and c["kd"] == "m3_kd_loss" and not c["unified"] and c["B"] > 1 for c in CASES)
    # and the recipe (unified, active self-distillation, in-batch negatives) with and without a teacher
    recipe = [c for c in CASES if c["unified"] and c["sd"] == "active" and not c["nibn"]]
    assert {c["kd"] for c in recipe} == set(SWITCHES["kd"])


# ---------------------------------------------------------------------------------------------------------------
# Reference models and the JAX loss


@dataclasses.dataclass
class Ref:
    path: str
    tokenizer: object
    base: dict  # FlagEmbedding's {model, colbert_linear, sparse_linear}
    cfg: m3model.ModelConfig
    params: dict  # JAX params from the same files


FLATTEN = 0.1  # see flattened()


def flattened(src, dst) -> str:
    """src with the encoder's linear kernels (attention q/k/v/output, FFN) scaled by FLATTEN, written with hf_write.

    The tiny checkpoint's layer weights are ~N(0, 0.2) so that texts get different CLS vectors; at 0.02 (the
    initializer_range) two layers barely mix tokens, every CLS embedding is the same to four decimals and the dense
    head's gradient is rounding noise. That regime is kept as a switch value. Both sides load the scaled files.
    """
    ckpt = hf_read.load_hf_checkpoint(src)
    for name in ckpt.encoder:
        if name.startswith("encoder.layer.") and name.endswith(".weight") and "LayerNorm" not in name:
            ckpt.encoder[name] = ckpt.encoder[name] * np.float32(FLATTEN)
    hf_write.save_hf_checkpoint(dst, ckpt, tokenizer_dir=src, heads_dtype="float32")
    return os.fspath(dst)


@pytest.fixture(scope="module")
def refs(tiny_ckpt, make_ckpt, tmp_path_factory):
    """refs(colbert_dim, ckpt) -> Ref: one FlagEmbedding base model and one JAX param tree per checkpoint.

    ckpt "tiny": the conftest checkpoint (tiny_ckpt, or make_ckpt(colbert_dim=...)); "flat": its flattened copy."""
    cache = {}

    def get(colbert_dim: int = -1, ckpt: str = "tiny") -> Ref:
        if (colbert_dim, ckpt) not in cache:
            path = tiny_ckpt if colbert_dim == -1 else make_ckpt(colbert_dim=colbert_dim)
            if ckpt == "flat":
                path = flattened(path, tmp_path_factory.mktemp("flat") / "ckpt")
            tok = AutoTokenizer.from_pretrained(path)
            assert (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 2, 1, 3)
            cfg, params, _ = loading.load_model(path)
            cache[colbert_dim, ckpt] = Ref(path, tok, fer.load_fe_base(path, colbert_dim), cfg,
                                           jax.device_put(params))
        return cache[colbert_dim, ckpt]

    return get


def _encoder_cfg(cfg: m3model.ModelConfig) -> m3model.ModelConfig:
    # The encoder does not depend on the head settings: one compile serves every checkpoint variant.
    return dataclasses.replace(cfg, colbert_dim=-1, sentence_pooling_method="cls")


@functools.partial(jax.jit, static_argnums=0)
def encoder_hidden(cfg, enc_params, ids, mask):
    return m3model.Encoder(cfg).apply({"params": enc_params}, ids, mask, True)


@functools.partial(jax.jit, static_argnums=0)
def encoder_vjp(cfg, enc_params, ids, mask, cotangent):
    _, vjp = jax.vjp(lambda p: m3model.Encoder(cfg).apply({"params": p}, ids, mask, True), enc_params)
    return vjp(cotangent)[0]


def _heads_and_loss(head_params, hidden, ids, mask, teacher, step, *, mcfg, lcfg, B, G, nibn):
    """(loss, parts), (d head params, d hidden): heads on all ROWS rows, m3_loss on the first B*(1+G)."""

    def f(head_params, hidden):
        out = m3model.BGEM3(mcfg).apply({"params": head_params}, hidden, mask, method="heads")
        n = B * (1 + G)
        q = {k: v[:B] for k, v in out.items()}
        p = {k: v[B:n] for k, v in out.items()}
        return losses.m3_loss(q, p, ids[:B], ids[B:n], mask[:B], teacher, step, cfg=lcfg, group_size=G,
                              no_in_batch_neg=nibn)

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(head_params, hidden)


heads_and_loss = jax.jit(_heads_and_loss, static_argnames=("mcfg", "lcfg", "B", "G", "nibn"))


@dataclasses.dataclass(frozen=True)
class Setting:
    kd: str  # none | m3_kd_loss | kl_div
    nibn: bool
    unified: bool
    use_sd: bool
    sd_start: int
    pooling: str

    @classmethod
    def of(cls, case: dict) -> Setting:
        use_sd, start, _ = _sd_settings(case["sd"])
        return cls(case["kd"], case["nibn"], case["unified"], use_sd, start, case["pooling"])

    @property
    def kd_loss_type(self) -> str:
        return "kl_div" if self.kd == "none" else self.kd

    def loss_config(self, vocab_size: int, **extra) -> losses.LossConfig:
        return losses.LossConfig(temperature=fer.TEMPERATURE, unified_finetuning=self.unified,
                                 use_self_distill=self.use_sd, self_distill_start_step=self.sd_start,
                                 kd_loss_type=self.kd_loss_type, vocab_size=vocab_size, **extra)


def _rows(batch: fer.Batch) -> tuple[np.ndarray, np.ndarray]:
    """[ROWS, L] ids and mask: queries, passages, then copies of the first query (filler; the loss never reads it)."""
    ids = np.concatenate([batch.q_ids, batch.p_ids])
    mask = np.concatenate([batch.q_mask, batch.p_mask])
    n = len(ids)
    assert n <= ROWS and ids.shape[1] == L, (n, ids.shape)
    fill = np.repeat(np.arange(1), ROWS - n)
    return (np.concatenate([ids, ids[fill]]).astype(np.int32), np.concatenate([mask, mask[fill]]).astype(np.int32))


def hf_named(grads: dict, cfg: m3model.ModelConfig) -> dict[str, np.ndarray]:
    enc, col, sp = m3model.params_to_hf(grads, cfg)
    return {**enc, **{f"colbert_linear.{k}": v for k, v in col.items()},
            **{f"sparse_linear.{k}": v for k, v in sp.items()}}


def jax_loss_and_grads(ref: Ref, batch: fer.Batch, setting: Setting, step: int, fn=heads_and_loss):
    """m3jax's loss, its parts and every parameter's gradient (HF names) on `batch`, fp32, deterministic."""
    ids, mask = _rows(batch)
    ecfg = _encoder_cfg(ref.cfg)
    mcfg = dataclasses.replace(ref.cfg, sentence_pooling_method=setting.pooling)
    hidden = encoder_hidden(ecfg, ref.params["encoder"], ids, mask)
    teacher = None
    if setting.kd != "none":
        teacher = jnp.asarray(np.asarray(batch.teacher, np.float32).reshape(batch.batch_size, batch.group_size))
    head_params = {k: ref.params[k] for k in ("colbert_linear", "sparse_linear")}
    (loss, parts), (g_heads, g_hidden) = fn(head_params, hidden, ids, mask, teacher, jnp.int32(step), mcfg=mcfg,
                                            lcfg=setting.loss_config(ref.cfg.vocab_size), B=batch.batch_size,
                                            G=batch.group_size, nibn=setting.nibn)
    grads = jax.tree.map(jnp.zeros_like, ref.params)
    grads["encoder"] = encoder_vjp(ecfg, ref.params["encoder"], ids, mask, g_hidden)
    grads.update(g_heads)
    return float(loss), {k: float(v) for k, v in parts.items()}, hf_named(grads, mcfg)


def fe_loss_and_grads(ref: Ref, batch: fer.Batch, setting: Setting, step: int, *, patched: bool | None = None):
    """FlagEmbedding's loss and gradients; the patched class only where upstream's index bugs bite."""
    if patched is None:
        patched = fer.fe_needs_patch(batch.batch_size, batch.group_size, setting.kd, setting.nibn, setting.unified)
    fe = fer.make_fe(ref.base, ref.tokenizer, kd_loss_type=setting.kd_loss_type, unified=setting.unified,
                     use_self_distill=setting.use_sd, self_distill_start_step=setting.sd_start,
                     pooling=setting.pooling, patched=patched)
    assert (type(fe) is fer.PatchedM3Model) == patched
    loss, grads = fer.run_fe(fe, ref.base, batch, step=step, no_in_batch_neg=setting.nibn,
                             use_teacher=setting.kd != "none")
    return loss, grads


def compare(label: str, l_jax: float, g_jax: dict, l_fe: float, g_fe: dict) -> dict:
    """Assert loss and gradient parity; returns the observed figures (also printed).

    Gradient criterion, per tensor t: max|g_jax[t] - g_fe[t]| <= GRAD_RTOL * max(max|g_fe[t]|, TENSOR_FLOOR * G)
    where G = max over all tensors of |g_fe|. That is the issue's criterion (GRAD_RTOL * G) made up to
    1 / TENSOR_FLOOR = 100 times stricter for every tensor: each is held to its own scale down to 1% of G. Below
    that floor sit the tensors whose gradient is a sum with heavy cancellation -- the attention key biases (zero
    true gradient: softmax ignores q.b_k, both sides are ~1e-11 of rounding noise) and, with a pooled
    L2-normalised dense head, some LayerNorm biases -- whose float32 rounding is set by the summation order.
    """
    assert sorted(g_jax) == sorted(g_fe), set(g_jax) ^ set(g_fe)
    loss_diff = abs(l_jax - l_fe)
    loss_rel = loss_diff / abs(l_fe) if l_fe else loss_diff
    global_max = max(float(np.abs(g).max()) for g in g_fe.values())
    worst_tensor, worst_name, worst_global, bad = 0.0, "", 0.0, []
    for name, ref in g_fe.items():
        assert g_jax[name].shape == ref.shape, name
        diff = float(np.abs(g_jax[name] - ref).max())
        scale = max(float(np.abs(ref).max()), TENSOR_FLOOR * global_max)
        if diff > GRAD_RTOL * scale:
            bad.append(f"{name}: max|diff| {diff:.3e} > {GRAD_RTOL} x {scale:.3e} (max|g_fe| over all tensors "
                       f"{global_max:.3e})")
        if scale and diff / scale > worst_tensor:
            worst_tensor, worst_name = diff / scale, name
        worst_global = max(worst_global, diff / global_max if global_max else diff)
    print(f"{label}: loss fe {l_fe:.7f} jax {l_jax:.7f} rel {loss_rel:.2e} | grad max|g_fe| {global_max:.3e} "
          f"worst rel (per tensor, floored) {worst_tensor:.2e} [{worst_name}] (global) {worst_global:.2e}")
    assert loss_diff <= LOSS_RTOL * abs(l_fe), f"{label}: loss jax {l_jax!r} vs FlagEmbedding {l_fe!r}"
    assert not bad, f"{label}: gradients differ:\n" + "\n".join(bad)
    return dict(loss_rel=loss_rel, grad_rel_tensor=worst_tensor, grad_rel_global=worst_global)


# ---------------------------------------------------------------------------------------------------------------
# Batches

_DATA = {name: fer.read_jsonl(fer.TOY_DATA_DIR / f"retrieval_{name}.jsonl")
         for name in ("en", "multilingual", "kd")} if fer else {}


def case_batch(ref: Ref, case: dict) -> fer.Batch:
    """Deterministic batch of a case: kd cases from retrieval_kd (teacher scores), others alternate en /
    multilingual; each case starts at its own offset so the cases see different texts."""
    k = [c["id"] for c in CASES].index(case["id"]) if case in CASES else 0
    use_teacher = case["kd"] != "none"
    rows = _DATA["kd"] if use_teacher else _DATA["en" if k % 2 else "multilingual"]
    start = (3 * k) % len(rows)
    examples = [rows[(start + i) % len(rows)] for i in range(case["B"])]
    return fer.make_batch(examples, case["G"], ref.tokenizer, L, use_teacher, pos_index=k)


def test_batches_have_padding_and_truncation(refs):
    """Padding matters: short texts are padded, long passages fill all L tokens; G=8 uses repeated negatives."""
    ref = refs()
    for case in CASES:
        b = case_batch(ref, case)
        lengths = np.concatenate([b.q_mask.sum(1), b.p_mask.sum(1)])
        assert lengths.min() < L, case["id"]
        if case["G"] > 1:
            assert (b.p_mask.sum(1) == L).any() and (b.p_mask.sum(1) < L).any(), case["id"]
    g8 = case_batch(ref, next(c for c in CASES if c["G"] == 8))
    assert len(set(g8.passages[:8])) < 8  # fewer than 7 distinct negatives: the repeat rule


# ---------------------------------------------------------------------------------------------------------------
# Parity over the covering table


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_loss_and_grads_match_flagembedding(refs, case):
    ref = refs(case["colbert_dim"], case["ckpt"])
    batch = case_batch(ref, case)
    setting = Setting.of(case)
    step = _sd_settings(case["sd"])[2]
    l_fe, g_fe = fe_loss_and_grads(ref, batch, setting, step)
    l_jax, parts, g_jax = jax_loss_and_grads(ref, batch, setting, step)
    compare(case["id"], l_jax, g_jax, l_fe, g_fe)
    if case["G"] == 1 and case["nibn"]:
        assert l_fe == l_jax == 0.0
    elif case["sd"] == "active" and case["unified"]:
        assert parts["self_distill"] > 0
    else:
        assert parts.get("self_distill", 0.0) == 0.0


def test_self_distill_step_is_traced(refs):
    """Crossing self_distill_start_step changes the value, not the program: one trace, one compile, and at every
    step the loss and gradients match FlagEmbedding with fe.step set to that step."""
    case = next(c for c in CASES if c["id"] == "kldiv-g2-sdactive-inbatch-unified-cls")
    ref = refs(case["colbert_dim"], case["ckpt"])
    batch = case_batch(ref, case)
    setting = Setting.of(case)
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return _heads_and_loss(*args, **kwargs)

    fn = jax.jit(counted, static_argnames=("mcfg", "lcfg", "B", "G", "nibn"))
    values = {}
    for step in (0, SD_START, SD_START + 1, SD_START + 50):
        l_fe, g_fe = fe_loss_and_grads(ref, batch, setting, step)
        l_jax, parts, g_jax = jax_loss_and_grads(ref, batch, setting, step, fn=fn)
        compare(f"self-distill step {step} (start {SD_START})", l_jax, g_jax, l_fe, g_fe)
        values[step] = l_jax
        assert (parts["self_distill"] > 0) == (step > SD_START)
    assert len(traces) == 1 and fn._cache_size() == 1
    assert values[0] == values[SD_START] != values[SD_START + 1] == values[SD_START + 50]


# ---------------------------------------------------------------------------------------------------------------
# FlagEmbedding 1.4.2's no_in_batch_neg bugs, pinned (if one of these fails, FlagEmbedding changed: revisit
# fe_reference.PatchedM3Model and m3jax/train/losses.py's note)


def _record_no_in_batch_calls(fe) -> list:
    calls = []
    upstream = fe._compute_no_in_batch_neg_loss

    def recording(q_reps, p_reps, teacher_targets=None, compute_score_func=None, **kwargs):
        s, loss = upstream(q_reps, p_reps, teacher_targets=teacher_targets, compute_score_func=compute_score_func,
                           **kwargs)
        calls.append((compute_score_func.__name__, tuple(s.shape), float(loss.item())))
        return s, loss

    fe._compute_no_in_batch_neg_loss = recording
    return calls


def test_upstream_nibn_unified_ensemble_is_zero(refs):
    """B <= G: upstream's ensemble scores are the [B, 1] diagonal of the [B, G] matrix and its loss is exactly 0;
    the upstream total is m3jax's formula with the ensemble term left out."""
    case = next(c for c in CASES if c["id"] == "kldiv-g8-sdinactive-nibn-unified-mean-cb16")
    ref = refs(case["colbert_dim"], case["ckpt"])
    batch = case_batch(ref, case)
    setting = Setting.of(case)
    step = _sd_settings(case["sd"])[2]
    fe = fer.make_fe(ref.base, ref.tokenizer, kd_loss_type=setting.kd_loss_type, unified=True,
                     use_self_distill=setting.use_sd, self_distill_start_step=setting.sd_start,
                     pooling=setting.pooling)
    calls = _record_no_in_batch_calls(fe)
    upstream = float(fer.fe_forward(fe, batch, step=step, no_in_batch_neg=True).loss.item())
    b, g = batch.batch_size, batch.group_size
    assert [c[:2] for c in calls] == [("compute_dense_score", (b, g)), ("compute_sparse_score", (b, g)),
                                      ("compute_colbert_score", (b, g)), ("ensemble_score", (b, 1))]
    assert calls[-1][2] == 0.0
    l_jax, parts, _ = jax_loss_and_grads(ref, batch, setting, step)
    assert parts["ensemble"] > 0
    without_ensemble = (parts["dense"] + 0.1 * parts["sparse"] + parts["colbert"]) / 4
    assert upstream == pytest.approx(without_ensemble, rel=LOSS_RTOL)
    assert abs(upstream - l_jax) > 100 * LOSS_RTOL * l_jax
    print(f"upstream {upstream:.6f} = m3jax without ensemble {without_ensemble:.6f}; m3jax / patched {l_jax:.6f}")


def test_upstream_nibn_unified_b_gt_g_raises(refs):
    ref = refs()
    case = next(c for c in CASES if c["id"] == "m3kd-g2-sdactive-nibn-unified-cls")
    batch = case_batch(ref, dict(case, kd="none"))
    assert batch.batch_size > batch.group_size
    fe = fer.make_fe(ref.base, ref.tokenizer, unified=True)
    with pytest.raises(IndexError, match="out of bounds"):
        fer.fe_forward(fe, batch, step=0, no_in_batch_neg=True)


def test_upstream_m3_kd_loss_nibn_raises(refs):
    ref = refs()
    case = next(c for c in CASES if c["id"] == "m3kd-g8-sdoff-nibn-dense-mean-cb16")
    batch = case_batch(ref, dict(case, colbert_dim=-1))
    assert batch.batch_size > 1
    fe = fer.make_fe(ref.base, ref.tokenizer, kd_loss_type="m3_kd_loss", unified=False)
    with pytest.raises(IndexError, match="Target 8 is out of bounds"):
        fer.fe_forward(fe, batch, step=0, no_in_batch_neg=True)


@pytest.mark.parametrize("kd,B,G", [("none", 4, 2), ("kl_div", 2, 8), ("m3_kd_loss", 1, 8)])
def test_patched_reference_equals_upstream_where_upstream_works(refs, kd, B, G):
    """PatchedM3Model changes nothing on no_in_batch_neg settings upstream computes correctly."""
    ref = refs()
    case = dict(id="", B=B, G=G, kd=kd, nibn=True, unified=False, sd="off", pooling="cls", colbert_dim=-1,
                ckpt="tiny")
    batch = case_batch(ref, case)
    setting = Setting.of(case)
    assert not fer.fe_needs_patch(B, G, kd, True, False)
    l_up, g_up = fe_loss_and_grads(ref, batch, setting, 0, patched=False)
    l_fix, g_fix = fe_loss_and_grads(ref, batch, setting, 0, patched=True)
    assert l_up == pytest.approx(l_fix, rel=1e-6) and l_up > 0
    for name in g_up:
        np.testing.assert_allclose(g_fix[name], g_up[name], rtol=1e-5, atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Cross-device negatives: FlagEmbedding under torch.distributed (gloo, 2 CPU processes) vs a 2-device mesh

XDEV_W, XDEV_B, XDEV_G = 2, 2, 4  # 2 ranks x 2 queries x group 4: global batch 4 queries, 16 passages
# All with self-distillation active (start -1, step 0) and cls pooling (the recipe). The no_in_batch_neg one needs
# PatchedM3Model (unified, B <= G: upstream's ensemble would be 0).
XDEV_FE_CONFIGS = {
    "nokd": dict(kd_loss_type="kl_div", teacher=False, unified=True, nibn=False),
    "kl_div": dict(kd_loss_type="kl_div", teacher=True, unified=True, nibn=False),
    "m3_kd_loss": dict(kd_loss_type="m3_kd_loss", teacher=True, unified=True, nibn=False),
    "dense_only_m3_kd_loss": dict(kd_loss_type="m3_kd_loss", teacher=True, unified=False, nibn=False),
    "no_in_batch_neg_kl_div": dict(kd_loss_type="kl_div", teacher=True, unified=True, nibn=True),
}
# m3jax's cross_device_all_heads on 2 blocks vs the plain loss on 1 block, same global batch
XDEV_ALL_HEADS = {"kl_div": ("kl_div", True), "m3_kd_loss": ("m3_kd_loss", True)}


def _xdev_loss_configs(vocab_size: int) -> dict[str, tuple[losses.LossConfig, bool, bool]]:
    """name -> (LossConfig, use the teacher scores, no_in_batch_neg)."""
    def cfg(kd_loss_type, unified=True, **extra):
        return losses.LossConfig(temperature=fer.TEMPERATURE, unified_finetuning=unified, use_self_distill=True,
                                 self_distill_start_step=-1, kd_loss_type=kd_loss_type, vocab_size=vocab_size,
                                 **extra)

    out = {name: (cfg(c["kd_loss_type"], c["unified"], num_blocks=XDEV_W, negatives_cross_device=True),
                  c["teacher"], c["nibn"]) for name, c in XDEV_FE_CONFIGS.items()}
    for name, (kd, teacher) in XDEV_ALL_HEADS.items():
        out[f"all_heads_{name}"] = (cfg(kd, num_blocks=XDEV_W, negatives_cross_device=True,
                                        cross_device_all_heads=True), teacher, False)
        out[f"one_block_{name}"] = (cfg(kd, num_blocks=1), teacher, False)
    return out


@pytest.fixture(scope="module")
def xdev(refs, tmp_path_factory):
    """Runs FlagEmbedding's 2-process gloo job (in the background) and m3jax's sharded jit on the same global batch;
    returns (fe results, jax losses by name, jax HF-named grads by name)."""
    ref = refs()
    tmp = tmp_path_factory.mktemp("xdev")
    examples = [_DATA["kd"][i] for i in range(XDEV_W * XDEV_B)]
    batch = fer.make_batch(examples, XDEV_G, ref.tokenizer, L, use_teacher=True)
    np.savez(tmp / "batch.npz", q_ids=batch.q_ids, q_mask=batch.q_mask, p_ids=batch.p_ids, p_mask=batch.p_mask,
             teacher=np.asarray(batch.teacher, np.float32))
    spec = dict(checkpoint=ref.path, world_size=XDEV_W, group_size=XDEV_G, batch=str(tmp / "batch.npz"),
                configs=[dict(name=n, kd_loss_type=c["kd_loss_type"], use_teacher=c["teacher"], unified=c["unified"],
                              no_in_batch_neg=c["nibn"], use_self_distill=True, self_distill_start_step=-1, step=0,
                              pooling="cls", patched=fer.fe_needs_patch(XDEV_B, XDEV_G, c["kd_loss_type"],
                                                                        c["nibn"], c["unified"]))
                         for n, c in XDEV_FE_CONFIGS.items()])
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, fer.__file__, "ddp", str(tmp / "spec.json"), str(tmp / "out.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        jax_losses, jax_grads = _xdev_jax(ref, batch)  # while the gloo job runs
        t_jax = time.time() - t0
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"FlagEmbedding gloo run failed:\n{log[-6000:]}"
    print(f"cross-device: m3jax compile + run {t_jax:.1f}s; both sides done after {time.time() - t0:.1f}s")
    with np.load(tmp / "out.npz") as f:
        fe = {k: f[k] for k in f.files}
    return fe, jax_losses, jax_grads


def _xdev_jax(ref: Ref, batch: fer.Batch):
    """On a 2-device mesh (batch axis sharded): ONE jit runs model.apply and m3_loss for every config and returns
    the losses and their gradients w.r.t. the model outputs; a second jit, compiled once, maps each config's
    output gradient to parameter gradients through the model's VJP (the chain rule, one backward pass per config).

    (Not one backward pass vmapped over the configs' cotangents: jaxlib 0.10.2's CPU backend miscompiles such
    programs -- its YNNPACK fusion gets every vmapped entry but the first wrong, e.g. for the VJP of
    x * sum(x * x, -1) on a [16, 63, 32] array, and for the colbert L2 normalisation here.)
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    configs = _xdev_loss_configs(ref.cfg.vocab_size)
    names = list(configs)
    model = m3model.BGEM3(ref.cfg)
    mesh = Mesh(jax.devices()[:XDEV_W], ("b",))
    shard = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("b")))
    params = jax.device_put(ref.params, NamedSharding(mesh, P()))
    b, g = batch.batch_size, batch.group_size
    inputs = [shard(batch.q_ids.astype(np.int32)), shard(batch.q_mask.astype(np.int32)),
              shard(batch.p_ids.astype(np.int32)), shard(batch.p_mask.astype(np.int32))]
    teacher = shard(np.asarray(batch.teacher, np.float32).reshape(b, g))

    def encode(params, q_ids, q_mask, p_ids, p_mask):
        return (model.apply({"params": params}, q_ids, q_mask), model.apply({"params": params}, p_ids, p_mask))

    @jax.jit
    def losses_and_output_grads(params, q_ids, q_mask, p_ids, p_mask, teacher):
        outs = encode(params, q_ids, q_mask, p_ids, p_mask)
        values, cotangents = [], []
        for name in names:
            lcfg, use_teacher, nibn = configs[name]

            def loss_fn(outs, lcfg=lcfg, use_teacher=use_teacher, nibn=nibn):
                return losses.m3_loss(outs[0], outs[1], q_ids, p_ids, q_mask, teacher if use_teacher else None,
                                      jnp.int32(0), cfg=lcfg, group_size=g, no_in_batch_neg=nibn)[0]

            value, ct = jax.value_and_grad(loss_fn)(outs)
            values.append(value)
            # one layout for every config's cotangent, so that param_grads compiles once
            cotangents.append(jax.lax.with_sharding_constraint(ct, NamedSharding(mesh, P("b"))))
        return jnp.stack(values), cotangents

    @jax.jit
    def param_grads(params, q_ids, q_mask, p_ids, p_mask, cotangent):
        _, vjp = jax.vjp(lambda p: encode(p, q_ids, q_mask, p_ids, p_mask), params)
        return vjp(cotangent)[0]

    values, cotangents = losses_and_output_grads(params, *inputs, teacher)
    values = np.asarray(values)
    grads = {n: hf_named(param_grads(params, *inputs, ct), ref.cfg) for n, ct in zip(names, cotangents)}
    assert param_grads._cache_size() == 1
    return {n: float(values[i]) for i, n in enumerate(names)}, grads


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(XDEV_FE_CONFIGS))
def test_cross_device_matches_flagembedding_gloo(xdev, name):
    """negatives_cross_device: m3jax's loss on 2 blocks = the mean of FlagEmbedding's per-rank losses (what the HF
    Trainer logs), and its gradient = the DDP-averaged gradient (sum over ranks / 2)."""
    fe, jax_losses, jax_grads = xdev
    per_rank = fe[f"{name}/losses"]
    c = XDEV_FE_CONFIGS[name]
    if c["unified"] or c["nibn"]:  # terms over each rank's local batch
        assert per_rank[0] != per_rank[1]
    else:  # dense only, in-batch: every rank computes the same loss over the gathered batch
        assert per_rank[0] == pytest.approx(per_rank[1], rel=1e-6)
    prefix = f"{name}/grad/"
    g_fe = {k[len(prefix):]: v for k, v in fe.items() if k.startswith(prefix)}
    compare(f"cross-device {name} (FE per rank {per_rank.tolist()})", jax_losses[name], jax_grads[name],
            float(per_rank.mean()), g_fe)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", list(XDEV_ALL_HEADS))
def test_cross_device_all_heads_is_a_function_of_the_global_batch(xdev, name):
    """cross_device_all_heads=True on 2 blocks: the same loss and gradient as the 1-block loss of the global batch."""
    _, jax_losses, jax_grads = xdev
    two, one = jax_losses[f"all_heads_{name}"], jax_losses[f"one_block_{name}"]
    compare(f"all heads, 2 blocks vs 1 block, {name}", two, jax_grads[f"all_heads_{name}"], one,
            jax_grads[f"one_block_{name}"])
    # ... and it is not the FlagEmbedding-style loss (sparse / colbert / ensemble over local blocks only)
    if name in XDEV_FE_CONFIGS:
        assert abs(jax_losses[name] - two) > 1e-3 * two


# ---------------------------------------------------------------------------------------------------------------
# Sparse memory at bge-m3 size (compiled, never run)

V_BGE_M3 = 250002
MEM_BQ, MEM_G, MEM_LQ, MEM_LP = 32, 8, 64, 256
UNUSED = (0, 2, 1, 3)


def _sparse_ce_grad_memory(bq: int, lq: int, lp: int):
    p = bq * MEM_G

    def sparse_ce(q_w, p_w, q_ids, p_ids):
        q_lex = scores.lexical_vectors(q_w, q_ids, V_BGE_M3, UNUSED)
        p_lex = scores.lexical_vectors(p_w, p_ids, V_BGE_M3, UNUSED)
        s = scores.sparse_scores(q_lex, p_lex) / fer.TEMPERATURE
        logp = jax.nn.log_softmax(s, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, (jnp.arange(bq) * MEM_G)[:, None], axis=-1))

    sds = jax.ShapeDtypeStruct
    fn = jax.jit(jax.value_and_grad(sparse_ce, argnums=(0, 1)))
    compiled = fn.lower(sds((bq, lq), jnp.float32), sds((p, lp), jnp.float32), sds((bq, lq), jnp.int32),
                        sds((p, lp), jnp.int32)).compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes


def test_sparse_path_memory_scales_with_batch_times_vocab():
    """lexical_vectors (queries and passages) + sparse_scores + CE and its gradient w.r.t. the token weights, at
    V=250002, 32 queries x 8 passages of 256 tokens (queries 64): temp+output bytes under 4 (batch x V) fp32
    tensors, far below one (passages x L x V) tensor, and unchanged when the sequences double."""
    n = MEM_BQ * (1 + MEM_G)
    bv = n * V_BGE_M3 * 4  # one fp32 [queries + passages, V] tensor
    blv = MEM_BQ * MEM_G * MEM_LP * V_BGE_M3 * 4  # FlagEmbedding's [passages, L, V] scatter tensor
    used = _sparse_ce_grad_memory(MEM_BQ, MEM_LQ, MEM_LP)
    used_2l = _sparse_ce_grad_memory(MEM_BQ, 2 * MEM_LQ, 2 * MEM_LP)
    print(f"sparse path: temp+output {used / 2**20:.0f} MiB = {used / bv:.2f} x (B x V x 4 bytes, "
          f"{bv / 2**20:.0f} MiB); with L doubled {used_2l / 2**20:.0f} MiB; B x L x V x 4 = {blv / 2**30:.1f} GiB")
    assert used < 4 * bv
    assert used < blv / 50
    assert used_2l < 1.1 * used  # a (batch, seq, vocab) buffer would double


def test_full_loss_memory_at_bge_m3_size():
    """The whole m3_loss (unified, self-distillation active, kl_div teacher) and its gradient w.r.t. the model
    outputs (given as inputs, hidden 1024): temp+output bytes within 4 (batch x V) tensors plus 4 colbert
    token-score tensors (queries x Lq x passages x Lp) -- batch x vocab and batch x seq^2, not batch x seq x vocab."""
    sds = jax.ShapeDtypeStruct
    bq, p, h = MEM_BQ, MEM_BQ * MEM_G, 1024
    outs = lambda n, l: dict(dense=sds((n, h), jnp.float32), sparse_weights=sds((n, l), jnp.float32),
                             colbert=sds((n, l - 1, h), jnp.float32))
    cfg = losses.LossConfig(use_self_distill=True, vocab_size=V_BGE_M3)

    def loss(q, pp, q_ids, p_ids, q_mask, teacher):
        return losses.m3_loss(q, pp, q_ids, p_ids, q_mask, teacher, jnp.int32(1), cfg=cfg, group_size=MEM_G)[0]

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        outs(bq, MEM_LQ), outs(p, MEM_LP), sds((bq, MEM_LQ), jnp.int32), sds((p, MEM_LP), jnp.int32),
        sds((bq, MEM_LQ), jnp.int32), sds((bq, MEM_G), jnp.float32)).compile()
    m = compiled.memory_analysis()
    used = m.temp_size_in_bytes + m.output_size_in_bytes
    bv = (bq + p) * V_BGE_M3 * 4
    colbert_tokens = bq * MEM_LQ * p * MEM_LP * 4
    blv = p * MEM_LP * V_BGE_M3 * 4
    print(f"full m3_loss: temp {m.temp_size_in_bytes / 2**20:.0f} MiB + output {m.output_size_in_bytes / 2**20:.0f} "
          f"MiB; bound 4 x {bv / 2**20:.0f} MiB (B x V) + 4 x {colbert_tokens / 2**20:.0f} MiB (colbert tokens); "
          f"B x L x V x 4 = {blv / 2**30:.1f} GiB")
    assert used < 4 * bv + 4 * colbert_tokens
    assert used < blv / 20


# ---------------------------------------------------------------------------------------------------------------
# Extra batches from M3JAX_PARITY_DATA


def test_parity_data_file(refs, record_property):
    """M3JAX_PARITY_DATA=file.jsonl (toy_train_data format; unset: 2 batches of toy_train_data/retrieval_kd.jsonl):
    consecutive B=4 examples with G=4 (negatives repeated
    when short), compared under two settings: the recipe (unified, self-distillation active, kl_div if the file has
    teacher scores) and no_in_batch_neg + m3_kd_loss (or no kd) without self-distillation. At most
    M3JAX_PARITY_MAX_BATCHES batches (default 16; 0 = all)."""
    path = os.environ.get("M3JAX_PARITY_DATA")
    default_limit = "16"
    if not path:  # still exercise the path: two batches of a toy file
        path, default_limit = os.path.join(os.path.dirname(__file__), "..", "toy_train_data", "retrieval_kd.jsonl"), "2"
    examples = [ex for ex in fer.read_jsonl(path) if ex.get("pos") and ex.get("neg")]
    limit = int(os.environ.get("M3JAX_PARITY_MAX_BATCHES", default_limit))
    b, g = 4, 4
    available = len(examples) // b
    n_batches = available if limit <= 0 else min(available, limit)
    assert n_batches > 0, f"{path}: fewer than {b} usable examples (each needs a positive and a negative)"
    ref = refs()
    teacher = all(fer.has_teacher_scores(ex) for ex in examples)
    settings = [Setting("kl_div" if teacher else "none", False, True, True, -1, "cls"),
                Setting("m3_kd_loss" if teacher else "none", True, True, False, -1, "cls")]
    worst = dict(loss_rel=0.0, grad_rel_tensor=0.0, grad_rel_global=0.0)
    for i in range(n_batches):
        batch = fer.make_batch(examples[i * b:(i + 1) * b], g, ref.tokenizer, L, teacher)
        for s in settings:
            l_fe, g_fe = fe_loss_and_grads(ref, batch, s, 0)
            l_jax, _, g_jax = jax_loss_and_grads(ref, batch, s, 0)
            stats = compare(f"{os.path.basename(path)} batch {i} {s}", l_jax, g_jax, l_fe, g_fe)
            worst = {k: max(v, stats[k]) for k, v in worst.items()}
    message = (f"M3JAX_PARITY_DATA: compared {n_batches} extra batches (of {available}) x {len(settings)} settings "
               f"from {path}; worst loss rel {worst['loss_rel']:.1e}, grad rel {worst['grad_rel_tensor']:.1e}")
    record_property("parity_extra_batches", n_batches)
    print(message)
    warnings.warn(message, stacklevel=1)
