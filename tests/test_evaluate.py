"""m3jax.evaluation.evaluate and `m3jax eval`: BEIR files, exact search on the device, nDCG / Recall / MRR.

Metrics are checked against hand-computed values on a tiny fixture and against pytrec_eval (trec_eval's C code,
package pytrec_eval_terrier) on the toy eval set; the device search against brute-force numpy scores computed with
FlagEmbedding's scoring formulas.
"""
import json
import logging
import math
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax.cli import common as cli_common
from m3jax.cli import main as cli
from m3jax.evaluation import evaluate as ev
from m3jax.evaluation import metrics as eval_metrics
from m3jax.evaluation import options as eval_options
from m3jax.evaluation import search as eval_search
from m3jax.evaluation.data import EvalDataError, load_corpus, load_eval_set, load_qrels
from m3jax.evaluation.evaluate import evaluate
from m3jax.evaluation.metrics import compute_metrics, runs_from_search
from m3jax.evaluation.search import search
from m3jax.io import checkpoint as ckpt_lib
from m3jax.model import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = {name: os.path.join(REPO, "toy_eval_data", f) for name, f in
       (("corpus", "corpus.jsonl"), ("queries", "queries.jsonl"), ("qrels", "qrels.tsv"))}
BATCH, QLEN, PLEN = 32, 32, 128  # 79 toy passages -> 3 passage blocks


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _jsonl(path, objs):
    return _write(path, [json.dumps(o, ensure_ascii=False) for o in objs])


# ---------------------------------------------------------------------------------------------------------------
# metrics: hand-computed values

QRELS = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"x": 1}, "q3": {"m": 1, "n": 1}, "q4": {"p": 0}}
RUN = {"q1": {"a": 0.1, "b": 0.9, "c": 0.8, "d": 0.5},
       "q2": {"y": 0.5, "z": 0.5, "x": 0.5, "w": 0.7},  # ties: trec_eval ranks them z, y, x (id descending)
       "q4": {"p": 1.0}}  # q3 has no run at all; q4 has no relevant passage


def test_metrics_hand_computed():
    means, each = compute_metrics(QRELS, RUN, ["ndcg@10", "recall@100", "mrr@10", "ndcg@3", "recall@3", "mrr@3"],
                                  per_query=True)
    # q1: ranking b(1) c(0) d(-) a(2); ideal a(2) b(1)
    q1_ndcg10 = (1 / math.log2(2) + 2 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3))
    q1_ndcg3 = (1 / math.log2(2)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert each["q1"] == pytest.approx({"ndcg@10": q1_ndcg10, "recall@100": 1.0, "mrr@10": 1.0,
                                        "ndcg@3": q1_ndcg3, "recall@3": 0.5, "mrr@3": 1.0}, abs=1e-12)
    # q2: ranking w z y x -> x at rank 4
    assert each["q2"] == pytest.approx({"ndcg@10": 1 / math.log2(5), "recall@100": 1.0, "mrr@10": 0.25,
                                        "ndcg@3": 0.0, "recall@3": 0.0, "mrr@3": 0.0}, abs=1e-12)
    assert set(each["q3"].values()) == {0.0} and set(each["q4"].values()) == {0.0}
    assert means == pytest.approx({"ndcg@10": (q1_ndcg10 + 1 / math.log2(5)) / 4, "recall@100": 0.5,
                                   "mrr@10": 1.25 / 4, "ndcg@3": q1_ndcg3 / 4, "recall@3": 0.125, "mrr@3": 0.25},
                                  abs=1e-12)
    assert round(means["ndcg@10"], 6) == 0.284541  # (0.707493 + 0.430677) / 4


def _trec_top(docs, k):
    """The first k of a run in trec_eval's order (score descending, then id descending), for pytrec's recip_rank."""
    return dict(sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])


def _pytrec(qrels, run):
    """{query: {ndcg@10, recall@100, mrr@10}} from pytrec_eval (queries of qrels missing from the run: 0)."""
    import pytrec_eval

    full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
        {q: _trec_top(d, 10) for q, d in run.items()})
    return {q: {"ndcg@10": full.get(q, {}).get("ndcg_cut_10", 0.0), "recall@100": full.get(q, {}).get("recall_100", 0.0),
                "mrr@10": rr.get(q, {}).get("recip_rank", 0.0)} for q in qrels}


def test_metrics_match_pytrec_eval_on_the_fixture():
    _, each = compute_metrics(QRELS, RUN, per_query=True)
    reference = _pytrec(QRELS, RUN)
    for q in QRELS:
        assert each[q] == pytest.approx(reference[q], abs=1e-12), q


def test_metric_and_mode_names():
    assert eval_options.parse_metrics("NDCG@10, Recall@100,mrr@10,ndcg@10") == ("ndcg@10", "recall@100", "mrr@10")
    assert eval_options.parse_modes("sparse+dense,colbert+sparse+dense,lexical") == ("dense+sparse", "all", "sparse")
    for bad in ("map@10", "ndcg", "ndcg@0"):
        with pytest.raises(ValueError, match="unknown metric"):
            eval_options.parse_metrics(bad)
    with pytest.raises(ValueError, match="unknown mode 'bm25'"):
        eval_options.parse_modes("dense,bm25")
    assert eval_options.top_k_for(["ndcg@10", "recall@1000"]) == 1000 and eval_options.top_k_for(["mrr@10"]) == 100
    with pytest.raises(ValueError, match="weights of mode 'dense\\+sparse' sum to 0"):
        eval_options.check_weights([0, 0, 1], ["dense+sparse"])


# ---------------------------------------------------------------------------------------------------------------
# BEIR files


def test_loading_beir_files(tmp_path, caplog):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"_id": "d1", "title": "Title", "text": "body"},
                                           {"_id": 2, "title": "", "text": "no title"}, {"_id": "d3", "text": "t"}])
    assert load_corpus(corpus) == (["d1", "2", "d3"], ["Title body", "no title", "t"])
    queries = _jsonl(tmp_path / "q.jsonl", [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"},
                                            {"_id": "q3", "text": "c"}])
    qrels = _write(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t2", "q1\t2\t0", "q2\td3\t1",
                                            "q9\td1\t1", "q2\tmissing\t1", ""])
    with caplog.at_level(logging.WARNING, logger="m3jax.evaluation.data"):
        s = load_eval_set(corpus, queries, qrels)
    assert (s.query_ids, s.query_texts) == (["q1", "q2"], ["a", "b"])  # q3 has no qrels: not evaluated
    assert s.qrels == {"q1": {"d1": 2, "2": 0}, "q2": {"d3": 1, "missing": 1}}
    assert (s.unknown_query_qrels, s.unknown_passage_qrels, s.queries_without_qrels) == (1, 1, 1)
    assert "1 qrels lines name 1 queries that are not in" in caplog.text
    assert "1 qrels lines name passages that are not in" in caplog.text
    # TREC format, no header
    trec = _write(tmp_path / "qrels.trec", ["q1 0 d1 1", "q1 0 d3 0"])
    assert load_qrels(trec) == {"q1": {"d1": 1, "d3": 0}}


@pytest.mark.parametrize("kind, lines, message", [
    ("corpus", ['{"_id": "a", "text": "x"}', "", '{"_id": "b", "text": }'], r"c\.jsonl:3: invalid JSON"),
    ("corpus", ['{"_id": "a", "text": "x"}', '{"_id": "a", "text": "y"}'],
     r"c\.jsonl:2: duplicate _id 'a' \(first on line 1\)"),
    ("corpus", ['{"_id": "a", "body": "x"}'], r'c\.jsonl:1: "text" must be a string, found nothing'),
    ("corpus", ['{"text": "x"}'], r'c\.jsonl:1: missing "_id"'),
    ("corpus", ['["a", "b"]'], r"c\.jsonl:1: expected a JSON object, found list"),
    ("corpus", [""], r"c\.jsonl: the corpus is empty"),
    ("queries", ['{"_id": "q", "text": 5}'], r'q\.jsonl:1: "text" must be a string, found 5'),
    ("qrels", ["query-id\tcorpus-id\tscore", "q1\td1"], r"qrels\.tsv:2: expected 3 tab-separated fields"),
    ("qrels", ["q1\td1\t1.5"], r"qrels\.tsv:1: score '1.5' is not an integer relevance grade"),
    ("qrels", ["q1\td1\t1", "q1\td1\t2"], r"qrels\.tsv:2: \(q1, d1\) graded 2 here and 1 on line 1"),
])
def test_malformed_files_name_file_and_line(tmp_path, kind, lines, message):
    paths = {"corpus": _jsonl(tmp_path / "c.jsonl", [{"_id": "d1", "text": "x"}]),
             "queries": _jsonl(tmp_path / "q.jsonl", [{"_id": "q1", "text": "x"}]),
             "qrels": _write(tmp_path / "qrels.tsv", ["q1\td1\t1"])}
    name = {"corpus": "c.jsonl", "queries": "q.jsonl", "qrels": "qrels.tsv"}[kind]
    paths[kind] = _write(tmp_path / name, lines)
    with pytest.raises(EvalDataError, match=message):
        load_eval_set(paths["corpus"], paths["queries"], paths["qrels"])


def test_missing_files_and_no_overlap(tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"_id": "d1", "text": "x"}])
    queries = _jsonl(tmp_path / "q.jsonl", [{"_id": "q1", "text": "x"}])
    with pytest.raises(EvalDataError, match="qrels file does not exist"):
        load_eval_set(corpus, queries, tmp_path / "none.tsv")
    with pytest.raises(EvalDataError, match="none of its query ids is in"):
        load_eval_set(corpus, queries, _write(tmp_path / "qrels.tsv", ["q7\td1\t1"]))


def test_toy_eval_set_is_complete():
    s = load_eval_set(TOY["corpus"], TOY["queries"], TOY["qrels"])
    assert (len(s.corpus_ids), len(s.query_ids)) == (79, 30)
    assert (s.unknown_query_qrels, s.unknown_passage_qrels, s.queries_without_qrels) == (0, 0, 0)
    assert sum(len(r) for r in s.qrels.values()) == 44
    assert {g for r in s.qrels.values() for g in r.values()} == {1, 2}  # graded
    assert all(any(g == 2 for g in r.values()) for r in s.qrels.values())


# ---------------------------------------------------------------------------------------------------------------
# search with a stub encoder: exact, hand-checkable scores

STUB = {  # text -> (dense, lexical weights, colbert vectors)
    "Q1": ([1, 0], {"5": 1.0, "7": 0.5}, [[1, 0], [0, 1]]),
    "Q2": ([0, 1], {"9": 2.0}, [[0, 1]]),
    "Q3": ([0.6, 0.8], {}, [[0.6, 0.8], [1, 0], [0, 1]]),
    "P0": ([1, 0], {"5": 0.5}, [[1, 0]]),
    "P1": ([0, 1], {"7": 2.0, "9": 0.25}, [[0, 1], [0, -1]]),
    "T P2": ([0.6, 0.8], {"5": 1.0, "7": 1.0}, [[0.6, 0.8]]),
    "P3": ([-1, 0], {}, [[-1, 0], [0, -1]]),
    "P4": ([0.8, 0.6], {"9": 1.0}, [[0.8, 0.6], [1, 0], [0, 1]]),
    "P5": ([0, -1], {"11": 3.0}, [[0, -1]]),  # every colbert similarity with Q2 is -1: padding must not count
}
QUERIES, PASSAGES = ["Q1", "Q2", "Q3"], ["P0", "P1", "T P2", "P3", "P4", "P5"]


class StubModel:
    """Duck-typed BGEM3FlagModel: fixed outputs per text; records how it was called."""

    def __init__(self):
        self.cfg = types.SimpleNamespace(vocab_size=16)
        self.devices = [jax.devices()[0]]
        self.calls = []

    def _encode(self, kind, texts, batch_size=None, max_length=None, return_dense=True, return_sparse=False,
                return_colbert_vecs=False):
        self.calls.append((kind, len(texts), batch_size, max_length, return_dense, return_sparse,
                           return_colbert_vecs))
        return {"dense_vecs": np.array([STUB[t][0] for t in texts], np.float32) if return_dense else None,
                "lexical_weights": [dict(STUB[t][1]) for t in texts] if return_sparse else None,
                "colbert_vecs": [np.array(STUB[t][2], np.float32) for t in texts] if return_colbert_vecs else None}

    def encode_queries(self, texts, **kw):
        return self._encode("queries", texts, **kw)

    def encode_corpus(self, texts, **kw):
        return self._encode("corpus", texts, **kw)


def _reference_scores(weights=(1.0, 1.0, 1.0)):
    """FlagEmbedding's formulas, in plain Python/numpy."""
    from m3jax.model.inference import BGEM3FlagModel

    d = np.array([[np.dot(STUB[q][0], STUB[p][0]) for p in PASSAGES] for q in QUERIES])
    s = np.array([[BGEM3FlagModel.compute_lexical_matching_score(STUB[q][1], STUB[p][1]) for p in PASSAGES]
                  for q in QUERIES], float)
    c = np.array([[BGEM3FlagModel.colbert_score(np.array(STUB[q][2], np.float32), np.array(STUB[p][2], np.float32))
                   for p in PASSAGES] for q in QUERIES], float)
    wd, ws, wc = weights
    return {"dense": d, "sparse": s, "colbert": c, "dense+sparse": (wd * d + ws * s) / (wd + ws),
            "all": (wd * d + ws * s + wc * c) / (wd + ws + wc)}


def test_reference_scores_by_hand():
    ref = _reference_scores()
    assert ref["sparse"][0, 2] == 1.5 and ref["sparse"][1, 1] == 0.5 and ref["sparse"][2].sum() == 0
    assert ref["colbert"][0, 1] == 0.5 and ref["colbert"][0, 3] == 0 and ref["colbert"][1, 5] == -1
    assert ref["colbert"][2, 4] == pytest.approx((0.96 + 1 + 1) / 3)  # [.6,.8] best matches [.8,.6]


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.4, 0.2, 0.4)])
def test_search_is_exact_over_blocks(monkeypatch, weights):
    monkeypatch.setattr(eval_search, "BLOCK_BYTES", 1)  # one query per block: 3 query blocks x 3 passage blocks
    model = StubModel()
    found = search(model, QUERIES, PASSAGES, weights=weights, top_k=3, batch_size=2, query_max_len=7,
                   passage_max_len=9)
    ref = _reference_scores(weights)
    for mode in eval_options.MODES:
        scores, index = found[mode]
        assert scores.shape == index.shape == (3, 3)
        expected = -np.sort(-ref[mode], axis=1)[:, :3]
        np.testing.assert_allclose(scores, expected, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(np.take_along_axis(ref[mode], index, axis=1), scores, atol=1e-6, err_msg=mode)
    assert found["dense"][1][0].tolist() == [0, 4, 2]  # Q1: P0 (1.0), P4 (0.8), T P2 (0.6)
    assert found["colbert"][0][0].tolist() == pytest.approx([1.0, 0.7, 0.5], abs=1e-6)  # Q1: P4, T P2, P0|P1
    assert found["colbert"][0][1].tolist() == pytest.approx([1.0, 1.0, 0.8], abs=1e-6)  # Q2: P1, P4, T P2
    every = search(model, QUERIES, PASSAGES, modes=["colbert"], top_k=6, batch_size=2)["colbert"]
    assert every[0][1, -1] == pytest.approx(-1.0) and every[1][1, -1] == 5  # Q2 vs P5: padding never counted
    assert ("queries", 3, 2, 7, True, True, True) in model.calls
    assert ("corpus", 6, 2, 9, True, True, True) in model.calls


def test_search_encodes_only_what_the_modes_need():
    model = StubModel()
    found = search(model, QUERIES, PASSAGES, modes=["dense"], top_k=100, batch_size=4)
    assert list(found) == ["dense"] and found["dense"][0].shape == (3, 6)  # k capped at the corpus size
    assert {c[4:] for c in model.calls} == {(True, False, False)}


def _stub_files(tmp_path):
    corpus = _jsonl(tmp_path / "c.jsonl", [{"_id": f"p{i}", "title": "T" if i == 2 else "", "text": f"P{i}"}
                                           for i in range(6)])
    queries = _jsonl(tmp_path / "q.jsonl", [{"_id": f"q{i + 1}", "text": f"Q{i + 1}"} for i in range(3)])
    qrels = _write(tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "q1\tp2\t2", "q1\tp1\t1", "q2\tp1\t1",
                                            "q3\tp4\t2"])
    return corpus, queries, qrels


def test_evaluate_end_to_end_hand_computed(tmp_path):
    results = evaluate(StubModel(), *_stub_files(tmp_path), batch_size=2, modes=["dense", "sparse"],
                       metrics=["ndcg@10", "mrr@10", "recall@2"])
    # dense: q1 ranks P0 P4 P2 P5 P1 P3 (P5 and P1 tie at 0: id descending); q2 ranks P1 first; q3 ranks P2, P4.
    q1 = (2 / math.log2(4) + 1 / math.log2(6)) / (2 + 1 / math.log2(3))
    assert results["dense"] == pytest.approx({"ndcg@10": (q1 + 1 + 1 / math.log2(3)) / 3,
                                              "mrr@10": (1 / 3 + 1 + 1 / 2) / 3, "recall@2": 2 / 3}, abs=1e-9)
    # sparse: q1 ranks P2 (1.5) P1 (1.0) P0 (0.5); q2 P4 (2.0) P1 (0.5); q3 all 0: P5 P4 (id descending)
    q1 = (2 + 1 / math.log2(3)) / (2 + 1 / math.log2(3))
    q2 = (1 / math.log2(3)) / 1
    q3 = (2 / math.log2(3)) / 2
    assert results["sparse"] == pytest.approx({"ndcg@10": (q1 + q2 + q3) / 3, "mrr@10": (1 + 1 / 2 + 1 / 2) / 3,
                                               "recall@2": 1.0}, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# the real model on the toy eval set


@pytest.fixture(scope="module")
def toy(tiny_ckpt):
    from m3jax.model.inference import BGEM3FlagModel

    model = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=BATCH)
    eval_set = load_eval_set(TOY["corpus"], TOY["queries"], TOY["qrels"])
    found = search(model, eval_set.query_texts, eval_set.corpus_texts, top_k=100, batch_size=BATCH,
                   query_max_len=QLEN, passage_max_len=PLEN)
    return types.SimpleNamespace(model=model, eval_set=eval_set, found=found)


def test_device_search_matches_brute_force(toy):
    m, s = toy.model, toy.eval_set
    kw = dict(batch_size=BATCH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q = m.encode_queries(s.query_texts, max_length=QLEN, **kw)
    p = m.encode_corpus(s.corpus_texts, max_length=PLEN, **kw)
    dense = q["dense_vecs"] @ p["dense_vecs"].T
    sparse = m.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    # FlagEmbedding's colbert_score, in float64 numpy (m.colbert_score, checked against FlagEmbedding in
    # test_inference.py, runs eagerly per pair: minutes for 30 x 79 pairs of varying shapes)
    colbert = np.array([[(np.float64(a) @ np.float64(b).T).max(-1).sum() / len(a) for b in p["colbert_vecs"]]
                        for a in q["colbert_vecs"]])
    full = {"dense": dense, "sparse": sparse, "colbert": colbert, "dense+sparse": (dense + sparse) / 2,
            "all": (dense + sparse + colbert) / 3}
    for mode, (scores, index) in toy.found.items():
        assert scores.shape == (30, 79)  # k = min(100, corpus)
        assert sorted(index[0].tolist()) == list(range(79))
        np.testing.assert_allclose(np.take_along_axis(full[mode], index, axis=1), scores, atol=2e-6, err_msg=mode)
        np.testing.assert_allclose(-np.sort(-full[mode], axis=1), scores, atol=2e-6, err_msg=mode)
        assert (np.diff(scores, axis=1) <= 0).all()


def test_metrics_match_pytrec_eval_on_the_toy_set(toy):
    s = toy.eval_set
    for mode, found in toy.found.items():
        run = runs_from_search(found, s.query_ids, s.corpus_ids)
        means, each = compute_metrics(s.qrels, run, per_query=True)
        reference = _pytrec(s.qrels, run)
        for q in s.qrels:
            assert each[q] == pytest.approx(reference[q], abs=1e-12), (mode, q)
        for metric in eval_options.DEFAULT_METRICS:
            assert means[metric] == pytest.approx(np.mean([reference[q][metric] for q in s.qrels]), abs=1e-12)
        assert means["recall@100"] == 1.0 and 0 < means["ndcg@10"] < 1


def test_evaluate_and_evaluate_from_config_agree(toy, tiny_ckpt):
    from transformers import AutoTokenizer

    expected = {mode: compute_metrics(toy.eval_set.qrels, runs_from_search(f, toy.eval_set.query_ids,
                                                                           toy.eval_set.corpus_ids))
                for mode, f in toy.found.items()}
    assert evaluate(toy.model, TOY["corpus"], TOY["queries"], TOY["qrels"], batch_size=BATCH, query_max_len=QLEN,
                    passage_max_len=PLEN) == expected

    config = config_lib.default_config()
    with config.unlocked():
        config.query_max_len, config.passage_max_len = QLEN, PLEN
        config.eval.update(corpus=TOY["corpus"], queries=TOY["queries"], qrels=TOY["qrels"], batch_size=BATCH)
        config.eval.modes = ("dense", "sparse")  # optional fields: all modes / default weights when absent
    model_cfg, params, _ = loading.load_model(tiny_ckpt)
    sharded = jax.device_put(params, jax.devices()[0])  # device arrays, as the trainer holds them
    results = ev.evaluate_legacy_set(config_lib.eval_settings(config), model_cfg, sharded,
                                     AutoTokenizer.from_pretrained(tiny_ckpt), devices="cpu")
    assert list(results) == ["dense", "sparse"]
    for mode in results:
        assert results[mode] == pytest.approx(expected[mode], abs=1e-9), mode  # same params, same numbers
    assert eval_metrics.flatten_metrics(results)["eval/sparse/ndcg@10"] == results["sparse"]["ndcg@10"]
    with config.unlocked():
        config.eval.qrels = ""
    with pytest.raises(EvalDataError, match="config.eval.qrels is empty"):
        ev.evaluate_legacy_set(config_lib.eval_settings(config), model_cfg, sharded, None)


def test_cli_eval_on_a_run_directory(toy, tiny_ckpt, tmp_path, capsys):
    """`m3jax eval --model <run dir>`: a run whose only step holds the tiny checkpoint's params scores exactly like
    the HF directory itself."""
    work = str(tmp_path / "run")
    _, params, _ = loading.load_model(tiny_ckpt)
    ckpt_lib.copy_base_model_files(tiny_ckpt, work)
    from m3jax.trainer import TrainState
    checkpointer = ckpt_lib.Checkpointer(work)
    checkpointer.save(1, TrainState(step=jnp.int32(1), params=params, opt_state={}), None,
                      config_lib.config_to_json(config_lib.default_config()))
    checkpointer.wait()
    checkpointer.close()

    s = toy.eval_set
    expected = {mode: compute_metrics(s.qrels, runs_from_search(toy.found[mode], s.query_ids, s.corpus_ids))
                for mode in ("dense", "colbert")}
    out = tmp_path / "results" / "run.json"
    assert cli.main(["eval", "--model", work, "--corpus", TOY["corpus"], "--queries", TOY["queries"], "--qrels",
                     TOY["qrels"], "--modes", "dense,colbert", "--batch-size", str(BATCH), "--query-max-len",
                     str(QLEN), "--passage-max-len", str(PLEN), "--devices", "cpu", "--fp32",
                     "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split() for line in table] == [
        ["mode", "ndcg@10", "recall@100", "mrr@10"],
        *[[mode] + [f"{expected[mode][m]:.4f}" for m in eval_options.DEFAULT_METRICS] for mode in ("dense", "colbert")]]
    with open(out) as f:
        payload = json.load(f)
    for mode in ("dense", "colbert"):
        assert payload["metrics"][mode] == pytest.approx(expected[mode], abs=1e-9)
    assert (payload["num_queries"], payload["num_passages"], payload["weights"]) == (30, 79, [1.0, 1.0, 1.0])
    assert payload["model"] == work and payload["unknown_passage_qrels"] == 0


def test_cli_loads_hf_directories(tiny_ckpt, tmp_path):
    """--model with config.json: m3jax's BGEM3FlagModel, pooling from m3jax_export.json when there is one."""
    args = cli.build_parser().parse_args(["eval", "--model", tiny_ckpt, "--corpus", "c", "--queries", "q", "--qrels",
                                          "r", "--devices", "cpu", "--batch-size", "8"])
    model = cli_common.load_model(args)
    assert (model.cfg.sentence_pooling_method, model.batch_size, model.passage_max_length) == ("cls", 8, 512)
    mean = shutil.copytree(tiny_ckpt, tmp_path / "mean")
    (mean / "m3jax_export.json").write_text(json.dumps({"sentence_pooling_method": "mean"}))
    args.model = str(mean)
    assert cli_common.load_model(args).cfg.sentence_pooling_method == "mean"
    args.step = 3
    with pytest.raises(cli_common.UsageError, match="--step and --base-model apply to an m3jax run directory"):
        cli_common.load_model(args)


def test_cli_eval_errors(tmp_path, capsys):
    corpus = _write(tmp_path / "c.jsonl", ['{"_id": "d1", "text": "x"}', "not json"])
    args = ["eval", "--model", str(tmp_path / "nothing"), "--corpus", corpus, "--queries", TOY["queries"],
            "--qrels", TOY["qrels"]]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == f"m3jax eval: error: {corpus}:2: invalid JSON (Expecting value at " \
                                              f"column 1)"
    args[4] = TOY["corpus"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == f"m3jax eval: error: {tmp_path / 'nothing'}: does not exist"
    (tmp_path / "empty").mkdir()
    args[2] = str(tmp_path / "empty")
    assert cli.main(args) == 2
    assert "not an HF model directory (no config.json) and not a usable m3jax checkpoint" in capsys.readouterr().err
    assert cli.main(args + ["--weights", "0", "0", "1", "--modes", "dense+sparse"]) == 2
    assert "weights of mode 'dense+sparse' sum to 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--modes", "bm25"])
    assert e.value.code == 2
