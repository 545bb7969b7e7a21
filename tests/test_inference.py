"""BGEM3FlagModel (m3jax) against FlagEmbedding's own BGEM3FlagModel on the same tiny checkpoint.

Extra texts, one per line, are read from the file named by M3JAX_PARITY_TEXTS when it is set.
"""
import os

import numpy as np
import pytest

from m3jax import BGEM3FlagModel
from m3jax.io import hf_layout

LONG = ("Large language models are trained on text gathered from many sources, filtered for quality, deduplicated "
        "and tokenised into subword units before training begins on thousands of accelerators. ") * 8
TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "北京是中华人民共和国的首都，也是全国的政治中心。",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر",
    "नई दिल्ली भारत की राजधानी है",
    "서울은 대한민국의 수도입니다.",
    "a",
    "?",
    "😀🚀",  # unknown to the tiny tokenizer: <unk>, which the lexical weights drop
    "the the the the the the the the water water water",
    LONG,  # longer than max_length: truncated
    "How do I reverse a list in Python? Use reversed(x) or x[::-1].",
]
MAX_LENGTH = 64


def _parity_texts():
    texts = list(TEXTS)
    extra = os.environ.get("M3JAX_PARITY_TEXTS")
    if extra:
        with open(extra, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    return texts


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=8)


@pytest.fixture(scope="module")
def models(tiny_ckpt, ours):
    from FlagEmbedding import BGEM3FlagModel as FlagModel

    theirs = FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=8)
    return ours, theirs


@pytest.mark.needs_flagembedding
def test_encode_matches_flagembedding(models, record_property):
    ours, theirs = models
    texts = _parity_texts()
    kw = dict(batch_size=8, max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = ours.encode(texts, **kw), theirs.encode(texts, **kw)
    assert a["dense_vecs"].shape == b["dense_vecs"].shape
    assert np.abs(a["dense_vecs"] - b["dense_vecs"]).max() <= 1e-5
    for i, (x, y) in enumerate(zip(a["colbert_vecs"], b["colbert_vecs"])):
        assert x.shape == y.shape, texts[i]
        assert np.abs(x - y).max() <= 1e-5, texts[i]
    for i, (x, y) in enumerate(zip(a["lexical_weights"], b["lexical_weights"])):
        assert set(x) == set(y), texts[i]
        assert all(abs(float(x[k]) - float(y[k])) <= 1e-5 for k in x), texts[i]
    assert any(len(lw) > 5 for lw in a["lexical_weights"])
    record_property("parity_texts_compared", len(texts))
    print(f"compared {len(texts)} texts ({len(texts) - len(TEXTS)} from M3JAX_PARITY_TEXTS)")


@pytest.mark.needs_flagembedding
def test_compute_score_matches_flagembedding(models):
    ours, theirs = models
    texts = _parity_texts()
    pairs = [(texts[i], texts[(i * 7 + 3) % len(texts)]) for i in range(len(texts))] + [(TEXTS[0], TEXTS[1])]
    for weights in (None, [0.4, 0.2, 0.4]):
        kw = dict(batch_size=4, max_query_length=32, max_passage_length=MAX_LENGTH,
                  weights_for_different_modes=weights)
        a, b = ours.compute_score(pairs, **kw), theirs.compute_score(pairs, **kw)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    single_a = ours.compute_score(pairs[0], max_passage_length=MAX_LENGTH)
    single_b = theirs.compute_score(pairs[0], max_passage_length=MAX_LENGTH)
    assert all(abs(single_a[k] - single_b[k]) <= 1e-5 for k in single_a)


@pytest.mark.needs_flagembedding
def test_scoring_helpers_match_flagembedding(models):
    ours, theirs = models
    kw = dict(max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q, p = ours.encode(TEXTS[:2], **kw), theirs.encode(TEXTS[:2], **kw)
    lw = q["lexical_weights"]
    assert abs(ours.compute_lexical_matching_score(lw[0], lw[1])
               - theirs.compute_lexical_matching_score(p["lexical_weights"][0], p["lexical_weights"][1])) <= 1e-5
    np.testing.assert_allclose(ours.compute_lexical_matching_score(lw, lw),
                               theirs.compute_lexical_matching_score(p["lexical_weights"], p["lexical_weights"]),
                               atol=1e-5)
    assert abs(ours.colbert_score(q["colbert_vecs"][0], q["colbert_vecs"][1])
               - float(theirs.colbert_score(p["colbert_vecs"][0], p["colbert_vecs"][1]))) <= 1e-5
    assert ours.convert_id_to_token(lw) == theirs.convert_id_to_token(lw)


@pytest.mark.needs_flagembedding
def test_single_string_and_flags_give_flagembedding_structure(models):
    ours, theirs = models
    a = ours.encode(TEXTS[0], return_sparse=True)
    b = theirs.encode(TEXTS[0], return_sparse=True)
    assert a["dense_vecs"].shape == b["dense_vecs"].shape and a["colbert_vecs"] is None and b["colbert_vecs"] is None
    assert isinstance(a["lexical_weights"], dict) and set(a["lexical_weights"]) == set(b["lexical_weights"])
    only_dense = ours.encode(TEXTS[:3])
    assert only_dense["lexical_weights"] is None and only_dense["dense_vecs"].shape[0] == 3


def test_query_instruction_is_prefixed(tiny_ckpt, ours):
    with_instruction = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu",
                                      query_instruction_for_retrieval="Represent this query: ")
    a = with_instruction.encode_queries(["capital of France"])["dense_vecs"]
    b = ours.encode(["Represent this query: capital of France"], max_length=512)["dense_vecs"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_large_encode_compiles_a_bounded_number_of_shapes(ours):
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(150)]
    before = ours._apply._cache_size()
    out = ours.encode(texts, batch_size=16, max_length=128)
    compiled = ours._apply._cache_size() - before
    assert out["dense_vecs"].shape[0] == 150
    # 150 texts of ~1..100 tokens: at most the length-ladder entries up to 128 (and one extra batch size)
    assert compiled <= 9, compiled


def test_missing_model_directory_gives_a_clear_error(tmp_path):
    with pytest.raises(hf_layout.CheckpointFormatError, match="does_not_exist"):
        BGEM3FlagModel(str(tmp_path / "does_not_exist"), devices="cpu")


@pytest.mark.needs_flagembedding
def test_truncate_dim_matches_flagembedding(tiny_ckpt):
    from FlagEmbedding import BGEM3FlagModel as FlagModel

    ours = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", truncate_dim=16)
    theirs = FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", truncate_dim=16)
    kw = dict(max_length=MAX_LENGTH, return_dense=True, return_colbert_vecs=True)
    a, b = ours.encode(TEXTS[:4], **kw), theirs.encode(TEXTS[:4], **kw)
    assert a["dense_vecs"].shape == b["dense_vecs"].shape == (4, 16)
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=1e-5)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        assert x.shape[-1] == 16 and np.abs(x - y).max() <= 1e-5
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3])]
    sa, sb = ours.compute_score(pairs), theirs.compute_score(pairs)
    for k in sa:  # compute_score uses the full width in both
        np.testing.assert_allclose(sa[k], sb[k], atol=1e-5)


def test_encoding_over_all_local_devices_matches_one_device(tiny_ckpt, ours):
    spread = BGEM3FlagModel(tiny_ckpt, use_fp16=False, batch_size=8)  # devices=None: the 8 simulated CPU devices
    assert len(spread.devices) == 8
    kw = dict(max_length=MAX_LENGTH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    a, b = spread.encode(TEXTS, **kw), ours.encode(TEXTS, **kw)
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=1e-6)
    assert all(np.abs(x - y).max() <= 1e-6 for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]))
    assert a["lexical_weights"] == b["lexical_weights"] or all(
        set(x) == set(y) and all(abs(x[k] - y[k]) <= 1e-6 for k in x)
        for x, y in zip(a["lexical_weights"], b["lexical_weights"]))


@pytest.mark.needs_flagembedding
def test_compute_score_without_tokens_after_the_first_matches_flagembedding(tiny_ckpt, tmp_path):
    """A tokenizer without special tokens turns a one-word text into one token: no colbert vector at all. Where
    FlagEmbedding returns a score (its padded chunk), m3jax returns the same: nan for an empty query (0 / 0), the
    padded zero vectors' 0 for an empty passage in a longer chunk."""
    import json
    import shutil

    from FlagEmbedding import BGEM3FlagModel as FlagModel

    folder = shutil.copytree(tiny_ckpt, tmp_path / "no_special_tokens")
    with open(folder / "tokenizer.json") as f:
        tokenizer = json.load(f)
    tokenizer["post_processor"] = None  # no <s> ... </s>
    with open(folder / "tokenizer.json", "w") as f:
        json.dump(tokenizer, f)
    ours = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu", batch_size=4)
    theirs = FlagModel(str(folder), use_fp16=False, devices="cpu", batch_size=4)
    one_token = next(w for w in ("the", "a", "de", "is") if len(ours.tokenizer(w)["input_ids"]) == 1)
    pairs = [(one_token, one_token), ("the quick brown fox", "jumps over the lazy dog"),
             (one_token, "the lazy dog"), ("the quick brown fox", one_token)]
    mine, ref = ours.compute_score(pairs), theirs.compute_score(pairs)
    assert np.isnan(mine["colbert"][0]) and np.isnan(ref["colbert"][0]) and np.isnan(mine["colbert"][2])
    assert mine["colbert"][3] == pytest.approx(ref["colbert"][3], abs=1e-5)  # the empty passage's zero vectors
    for key in ref:
        np.testing.assert_allclose(mine[key], ref[key], atol=1e-5, rtol=1e-5, equal_nan=True, err_msg=key)
    # A chunk whose passages all lack vectors (FlagEmbedding raises there) scores with one zero vector.
    alone = ours.compute_score([("the quick brown fox", one_token)])
    assert alone["colbert"] == [0.0] and np.isfinite(alone["dense"][0])
