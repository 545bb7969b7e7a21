"""The cross-encoder reranker (bge-reranker-v2-m3's layout) against FlagEmbedding's FlagReranker and transformers'
XLMRobertaForSequenceClassification on a tiny random reranker (m3jax.io.tiny_checkpoint.make_tiny_reranker)."""
import json
import os

import numpy as np
import pytest

from m3jax import FlagReranker
from m3jax.io import hf_layout, hf_read, hf_write
from m3jax.io.tiny_checkpoint import make_tiny_reranker
from m3jax.model import loading

pytestmark = pytest.mark.stack_sensitive  # .ci/run runs this module on the latest stack too
LONG = ("Large language models are trained on text gathered from many sources, filtered for quality, deduplicated "
        "and tokenised into subword units before training begins on thousands of accelerators. ") * 8
SHORT = [("what is the capital of France", "Paris is the capital and most populous city of France."),
         ("why is the sky blue", "Rayleigh scattering sends short wavelengths across the whole sky."),
         ("a", "b"), ("?", "")]
LONG_PAIRS = [("how are language models trained", LONG),  # the passage is cut to fit max_length
              ("how are language models trained " * 12, LONG),  # the query too (3/4 of max_length)
              (LONG, "short passage")]
MULTILINGUAL = [("Hauptstadt von Deutschland", "Die Hauptstadt von Deutschland ist Berlin."),
                ("中国的首都", "北京是中华人民共和国的首都，也是全国的政治中心。"),
                ("日本の首都", "東京は日本の首都です。"), ("столица России", "Москва — столица России."),
                ("عاصمة مصر", "القاهرة هي عاصمة مصر"), ("भारत की राजधानी", "नई दिल्ली भारत की राजधानी है"),
                ("수도", "서울은 대한민국의 수도입니다."), ("emoji", "😀🚀")]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory):
    return make_tiny_reranker(tmp_path_factory.mktemp("reranker") / "rr")


@pytest.fixture(scope="module")
def ours(tiny_reranker):
    return FlagReranker(tiny_reranker, devices="cpu", batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def rerankers(ours, tiny_reranker):
    from FlagEmbedding import FlagReranker as TheirReranker

    theirs = TheirReranker(tiny_reranker, use_fp16=False, devices="cpu", batch_size=4, max_length=MAX_LENGTH)
    return ours, theirs


@pytest.mark.needs_flagembedding
@pytest.mark.parametrize("pairs", [SHORT, LONG_PAIRS, MULTILINGUAL], ids=["short", "long", "multilingual"])
def test_scores_equal_flagembedding(rerankers, pairs, record_property):
    ours, theirs = rerankers
    a, b = np.array(ours.compute_score(pairs)), np.array(theirs.compute_score(pairs))
    assert a.shape == b.shape == (len(pairs),)
    record_property("max_abs_diff", float(np.abs(a - b).max()))
    assert np.abs(a - b).max() <= 1e-5
    assert np.ptp(a) > 0.05  # the tiny reranker tells the pairs apart
    normalized = np.array(ours.compute_score(pairs, normalize=True))
    np.testing.assert_allclose(normalized, np.array(theirs.compute_score(pairs, normalize=True)), atol=1e-5)
    np.testing.assert_allclose(normalized, 1 / (1 + np.exp(-a)), atol=1e-7)


@pytest.mark.needs_flagembedding
def test_long_pairs_are_truncated_like_flagembedding(rerankers):
    ours, theirs = rerankers
    from FlagEmbedding.utils.tokenizer_compat import prepare_for_model_compat

    tok = theirs.tokenizer
    ids = ours.pair_token_ids(LONG_PAIRS + SHORT, MAX_LENGTH * 3 // 4, MAX_LENGTH)
    for (q, p), got in zip(LONG_PAIRS + SHORT, ids):
        q_ids = tok(q, add_special_tokens=False, max_length=MAX_LENGTH * 3 // 4, truncation=True)["input_ids"]
        p_ids = tok(p, add_special_tokens=False, max_length=MAX_LENGTH, truncation=True)["input_ids"]
        expected = prepare_for_model_compat(tok, q_ids, p_ids, truncation="only_second", max_length=MAX_LENGTH,
                                            padding=False)["input_ids"]
        assert got == expected
    assert len(ids[0]) == MAX_LENGTH and len(ids[1]) == MAX_LENGTH  # passage cut to fit
    # a query that fills max_length alone leaves the pair whole, as transformers does
    whole = ours.pair_token_ids([("word " * 80, "some passage")], 100, 40)[0]
    assert len(whole) > 40


def test_scores_equal_transformers_logits(ours, tiny_reranker):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reranker).eval()
    pairs = SHORT + LONG_PAIRS + MULTILINGUAL
    ids = ours.pair_token_ids(pairs, MAX_LENGTH * 3 // 4, MAX_LENGTH)
    expected = []
    with torch.no_grad():
        for row in ids:  # one pair at a time: no padding at all
            x = torch.tensor([row])
            expected.append(float(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, 0]))
    got = np.array(ours.compute_score(pairs))
    assert np.abs(got - np.array(expected)).max() <= 1e-5


def test_scores_do_not_depend_on_devices_or_batch(tiny_reranker, ours):
    pairs = SHORT + LONG_PAIRS + MULTILINGUAL
    sharded = FlagReranker(tiny_reranker, devices=None, batch_size=16, max_length=MAX_LENGTH)  # 8 CPU devices
    assert len(sharded.devices) == 8
    np.testing.assert_allclose(sharded.compute_score(pairs), ours.compute_score(pairs), atol=1e-6)
    np.testing.assert_allclose(ours.compute_score(pairs, batch_size=1), ours.compute_score(pairs), atol=1e-6)


@pytest.mark.needs_flagembedding
def test_instructions_like_flagembedding(tiny_reranker):
    from FlagEmbedding import FlagReranker as TheirReranker

    kw = dict(query_instruction_for_rerank="Query:", query_instruction_format="{}\\n{}",
              passage_instruction_for_rerank="Doc: ", max_length=MAX_LENGTH, batch_size=4)
    ours = FlagReranker(tiny_reranker, devices="cpu", **kw)
    theirs = TheirReranker(tiny_reranker, use_fp16=False, devices="cpu", **kw)
    np.testing.assert_allclose(ours.compute_score(SHORT), theirs.compute_score(SHORT), atol=1e-5)
    plain = FlagReranker(tiny_reranker, devices="cpu", max_length=MAX_LENGTH)
    assert ours.compute_score(SHORT) != pytest.approx(plain.compute_score(SHORT), abs=1e-4)


def test_reranker_layout_round_trip(tiny_reranker, tmp_path):
    ckpt = hf_read.load_reranker_checkpoint(tiny_reranker)
    assert ckpt.colbert is None and sorted(ckpt.classifier) == ["dense.bias", "dense.weight", "out_proj.bias",
                                                                "out_proj.weight"]
    assert not any(k.startswith(("roberta.", "pooler.")) for k in ckpt.encoder)
    hf_write.save_reranker_checkpoint(tmp_path / "copy", ckpt, tokenizer_dir=tiny_reranker)
    again = hf_read.load_reranker_checkpoint(tmp_path / "copy")
    for k, v in ckpt.encoder.items():
        np.testing.assert_array_equal(v, again.encoder[k])
    for k, v in ckpt.classifier.items():
        np.testing.assert_array_equal(v, again.classifier[k])
    assert loading.is_reranker(tiny_reranker) and not loading.is_reranker(tmp_path / "nothing")


def test_reranker_format_errors(tiny_reranker, tiny_ckpt, tmp_path):
    import shutil

    with pytest.raises(hf_layout.CheckpointFormatError, match="not a cross-encoder reranker"):
        hf_read.load_reranker_checkpoint(tiny_ckpt)
    headless = tmp_path / "headless"  # a bge-m3 directory that claims to be a reranker: no classification head
    shutil.copytree(tiny_ckpt, headless)
    config = json.loads((headless / "config.json").read_text())
    config.update(architectures=[hf_layout.RERANKER_ARCHITECTURE], id2label={"0": "LABEL_0"})
    (headless / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_layout.CheckpointFormatError, match=r"missing tensor 'classifier\.dense\.weight'"):
        hf_read.load_reranker_checkpoint(headless)
    two = tmp_path / "two_labels"
    shutil.copytree(tiny_reranker, two)
    config = json.loads((two / "config.json").read_text())
    config["id2label"] = {"0": "NO", "1": "YES"}
    (two / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_layout.CheckpointFormatError, match="2 labels"):
        hf_read.load_reranker_checkpoint(two)
    ckpt = hf_read.load_reranker_checkpoint(tiny_reranker)
    ckpt.classifier["out_proj.weight"] = ckpt.classifier["out_proj.weight"][:, :-1]
    with pytest.raises(hf_layout.CheckpointFormatError, match=r"out_proj\.weight' has shape \[1, 31\]"):
        hf_write.save_reranker_checkpoint(tmp_path / "bad", ckpt, tokenizer_dir=tiny_reranker)
    assert not os.path.exists(tmp_path / "bad")
