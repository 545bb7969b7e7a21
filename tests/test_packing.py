"""Packed encoding (m3jax.core.packing): several texts per row, attention confined to each, equal to padded encoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import BGEM3FlagModel
from m3jax.core import packing
from m3jax.core.padding import length_buckets
from m3jax.model import attention, flash_dropout

WORDS = ["the", "water", "of", "rivers", "flows", "to", "the", "sea", "while", "mountains", "stand", "in", "the",
         "quiet", "morning", "light", "and", "people", "walk", "along", "old", "roads", "between", "villages",
         "towns", "and", "cities"]


def _texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: one-word texts, sentences, paragraphs, and a few longer than the max length."""
    rng = np.random.default_rng(seed)
    out = ["a", "?", "北京是中华人民共和国的首都。", "Die Hauptstadt von Deutschland ist Berlin."]
    for _ in range(n - len(out)):
        k = int(min(rng.lognormal(2.5, 1.0) + 1, 120))
        out.append(" ".join(rng.choice(WORDS, k)))
    return out


MAX_LENGTH = 64
TEXTS = _texts(40) + [" ".join(WORDS * 4)]  # the last one fills a row of MAX_LENGTH tokens alone


@pytest.fixture(scope="module")
def both(tiny_ckpt):
    kw = dict(use_fp16=False, devices="cpu", batch_size=8)
    return BGEM3FlagModel(tiny_ckpt, packing=True, **kw), BGEM3FlagModel(tiny_ckpt, packing=False, **kw)


def _assert_same(a: dict, b: dict, tol: float = 1e-5):
    assert a["dense_vecs"].shape == b["dense_vecs"].shape
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= tol
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        assert x.shape == y.shape
        assert np.abs(x - y).max(initial=0) <= tol
    for x, y in zip(a["lexical_weights"], b["lexical_weights"]):
        assert set(x) == set(y)
        assert all(abs(float(x[k]) - float(y[k])) <= tol for k in x)


def test_rows_hold_every_text_once_and_bound_shapes():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(2, 40, 500), rng.integers(200, 1025, 20), [1024, 2, 2]])
    ladder = length_buckets(1024)
    plan = packing.plan_batches(lengths, 16, ladder, n_dev=2)
    seen = sorted(i for _, _, _, rows in plan for row in rows for i in row.texts)
    assert seen == list(range(len(lengths)))
    for n_rows, length, slots, rows in plan:
        assert n_rows % 2 == 0 and len(rows) <= n_rows <= 16 and length in ladder
        for row in rows:
            assert sum(lengths[i] for i in row.texts) <= length
            assert len(row.texts) <= min(slots, packing.max_segments_per_row(length))
    shapes = {(n, length, slots) for n, length, slots, _ in plan}
    assert len(shapes) <= 12
    assert plan == packing.plan_batches(lengths, 16, ladder, n_dev=2)  # deterministic
    real = int(lengths.sum())
    packed, ladder = (real / packing.packed_computed_tokens(lengths, 16, ladder, 2),
                      real / packing.ladder_computed_tokens(lengths, 16, ladder, 2))
    assert packed > 0.8 and ladder < 0.6, (packed, ladder)


def test_packed_batch_layout():
    toks = [[0, 5, 6, 2], [0, 7, 2], [0, 2], [0] + [9] * 6 + [2]]
    # longest first, best fit: the 8-token text alone, 4 + 3 tokens in one row, the 2-token text in a third; three
    # rows make batches of 2 and 1 rows (batch_row_counts: powers of two)
    first, second = packing.packed_batches(toks, 4, [8], 1, pad_id=1)
    assert first.input_ids.shape == (2, 8) and second.input_ids.shape == (1, 8)
    assert first.input_ids[0].tolist() == toks[3]
    assert first.input_ids[1].tolist() == [0, 5, 6, 2, 0, 7, 2, 1]
    assert first.segment_ids[1].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert first.position_ids[1].tolist() == [2, 3, 4, 5, 2, 3, 4, 1]  # XLM-R: pad_id + 1 + index, pad: pad_id
    assert first.starts[1, :2].tolist() == [0, 4]
    assert first.texts == [(3, 0, 0, 8), (0, 1, 0, 4), (1, 1, 4, 3)]
    assert second.input_ids[0].tolist() == [0, 2] + [1] * 6 and second.texts == [(2, 0, 0, 2)]


def test_batch_row_counts():
    assert packing.batch_row_counts(391, 256) == [256, 128, 8]  # 1 filler row
    assert packing.batch_row_counts(300, 256) == [256, 32, 12]
    assert packing.batch_row_counts(300, 256, n_dev=8) == [256, 32, 16]
    assert packing.batch_row_counts(3, 256) == [3]


@pytest.mark.parametrize("implementation", ["xla", "xla-dropout", "splash-interpret"])
def test_segment_attention_equals_each_text_alone(implementation):
    rng = np.random.default_rng(0)
    length, n, d = 128, 2, 8
    sizes = [50, 30, 40]  # and 8 tokens of padding
    q, k, v = (jnp.asarray(rng.normal(size=(1, length, n, d)), jnp.float32) for _ in range(3))
    segments = np.zeros((1, length), np.int32)
    at = 0
    for s, size in enumerate(sizes):
        segments[0, at:at + size] = s + 1
        at += size
    dropout = None
    if implementation == "xla-dropout":  # the training path (probabilities materialised), dropping nothing
        implementation = "xla"
        dropout = attention.Dropout(1e-12, flash_dropout.seed_words(jax.random.key(0)))
        assert flash_dropout.drop_threshold(dropout.rate) == 0  # keep iff the hash's top bits >= 0: always
    out = attention.attention(q, k, v, None, implementation=implementation, segment_ids=jnp.asarray(segments),
                              dropout=dropout)
    assert np.isfinite(np.asarray(out)).all()
    at = 0
    for size in sizes:
        part = slice(at, at + size)
        alone = jax.nn.dot_product_attention(q[:, part], k[:, part], v[:, part], implementation="xla")
        assert np.abs(np.asarray(out[:, part]) - np.asarray(alone)).max() <= 1e-5
        at += size


def test_segment_offsets():
    segments = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    offsets, seqlen = attention.segment_offsets(segments, 3)
    assert offsets.tolist() == [[0, 2, -1, -1], [0, -1, -1, -1]]
    assert seqlen.tolist() == [[2, 3, -1], [6, -1, -1]]


def test_packed_encode_equals_padded_encode(both):
    packed, padded = both
    kw = dict(max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = packed.encode(TEXTS, **kw), padded.encode(TEXTS, **kw)
    tokens = packed.tokenizer(TEXTS[-1:], truncation=True, max_length=MAX_LENGTH)["input_ids"][0]
    assert len(tokens) == MAX_LENGTH  # a row to itself
    _assert_same(a, b)
    one_a, one_b = packed.encode(TEXTS[5], **kw), padded.encode(TEXTS[5], **kw)  # a single string
    assert np.abs(one_a["dense_vecs"] - one_b["dense_vecs"]).max() <= 1e-5


def test_packed_encode_mean_pooling_and_truncate_dim(tiny_ckpt):
    kw = dict(use_fp16=False, devices="cpu", batch_size=4, pooling_method="mean", truncate_dim=16)
    packed, padded = BGEM3FlagModel(tiny_ckpt, **kw), BGEM3FlagModel(tiny_ckpt, packing=False, **kw)
    enc = dict(max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = packed.encode(TEXTS[:20], **enc), padded.encode(TEXTS[:20], **enc)
    assert a["dense_vecs"].shape == (20, 16)
    _assert_same(a, b)


def test_packed_compute_score_equals_padded(both):
    packed, padded = both
    pairs = [(TEXTS[i], TEXTS[(i * 7 + 3) % len(TEXTS)]) for i in range(len(TEXTS))]
    for weights in (None, [0.4, 0.2, 0.4]):
        a = packed.compute_score(pairs, max_query_length=32, max_passage_length=MAX_LENGTH,
                                 weights_for_different_modes=weights)
        b = padded.compute_score(pairs, max_query_length=32, max_passage_length=MAX_LENGTH,
                                 weights_for_different_modes=weights)
        for key in b:
            assert np.allclose(a[key], b[key], atol=1e-5, rtol=0, equal_nan=True), key


def test_packed_encode_sharded_over_devices(tiny_ckpt, both):
    sharded = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices=None, batch_size=8)  # 8 CPU devices
    _, padded = both
    kw = dict(max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    _assert_same(sharded.encode(TEXTS, **kw), padded.encode(TEXTS, **kw))


def test_packing_switch(tiny_ckpt, monkeypatch):
    kw = dict(use_fp16=False, devices="cpu")
    assert BGEM3FlagModel(tiny_ckpt, **kw).packing
    monkeypatch.setenv("M3JAX_PACKING", "0")  # the switch of m3jax eval / mine / score
    assert not BGEM3FlagModel(tiny_ckpt, **kw).packing
    assert BGEM3FlagModel(tiny_ckpt, packing=True, **kw).packing
    monkeypatch.setenv("M3JAX_PACKING", "1")
    assert BGEM3FlagModel(tiny_ckpt, **kw).packing


def test_length_sets_reach_the_packing_target():
    """benchmarks/length_sets.py (BENCHMARKS.md, "Real tokens"): seeded, and packing computes >= 95% real tokens
    on every set, where the ladder computes 31-74%."""
    from benchmarks import length_sets

    for name, (lengths, max_length, batch_size) in length_sets.sets(0).items():
        rec = length_sets.report(name, lengths, max_length, batch_size, packing.ROW_LENGTH)
        assert rec["packed_real_share"] >= 0.95, rec
        assert rec["ladder_real_share"] < 0.75, rec
    assert np.array_equal(length_sets.msmarco_queries(100, 3), length_sets.msmarco_queries(100, 3))


def test_base_row_length_from_the_data():
    ladder = length_buckets(512)
    assert packing.base_row_length([10] * 50 + [42], ladder) == 128  # queries: 8 x mean 10 -> 128
    assert packing.base_row_length([80] * 50, ladder) == 256  # passages: capped at ROW_LENGTH
    assert packing.base_row_length([300], ladder) == 256
    assert packing.base_row_length([5, 20], length_buckets(64)) == 64  # at most the max length
