"""`m3jax mine` on the tiny bge-m3: the ranking against a brute-force numpy search for every mode, the dense
candidates against hn_mine's, each range and filter rule, resume after SIGKILL, and file:line errors.

FlagEmbedding's scripts/hn_mine.py is not part of the FlagEmbedding package and needs faiss; its search step is a
faiss IndexFlatIP over FlagEmbedding's dense vectors, which is an exact inner-product search, so
`test_dense_candidates_equal_hn_mine` reproduces that step with numpy on FlagEmbedding's own BGEM3FlagModel
vectors and then applies hn_mine's slice and filters as the script writes them.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from test_train import kill_when

from m3jax.cli import main as cli
from m3jax.evaluation import options as eval_options
from m3jax.evaluation.search import ExactSearch
from m3jax.model.inference import BGEM3FlagModel
from m3jax.tools import mine as mine_lib
from m3jax.tools.mine import MineOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "toy_train_data")
QLEN, PLEN, BATCH = 32, 64, 8
BASE = dict(batch_size=BATCH, query_max_len=QLEN, passage_max_len=PLEN, passages_per_block=8, passages_per_chunk=16,
            fill="none")
TIE = 1e-5  # scores closer than this may rank either way between two float32 computations


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _default_pool(records):
    pool = []
    for rec in records:
        for t in rec["pos"] + rec.get("neg", []):
            if t not in pool:
                pool.append(t)
    return pool


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=BATCH, query_max_length=QLEN,
                          passage_max_length=PLEN)


@pytest.fixture(scope="module")
def model8(tiny_ckpt):  # the 8 simulated CPU devices: encoding and search sharded
    m = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices=None, batch_size=BATCH, query_max_length=QLEN,
                       passage_max_length=PLEN)
    assert len(m.devices) == 8
    return m


@pytest.fixture(scope="module")
def data():
    path = os.path.join(TOY, "retrieval_en.jsonl")
    records = _records(path)
    return path, records, _default_pool(records)


@pytest.fixture(scope="module")
def brute(model, data):
    """Every mode's full score matrix [queries, pool] by FlagEmbedding's formulas in numpy (float64)."""
    _, records, pool = data
    kw = dict(batch_size=BATCH, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q = model.encode_queries([r["query"] for r in records], max_length=QLEN, **kw)
    p = model.encode_corpus(pool, max_length=PLEN, **kw)
    dense = q["dense_vecs"].astype(np.float64) @ p["dense_vecs"].astype(np.float64).T
    sparse = np.array([[sum(w * b.get(t, 0) for t, w in a.items()) for b in p["lexical_weights"]]
                       for a in q["lexical_weights"]], np.float64)
    colbert = np.array([[(a.astype(np.float64) @ b.astype(np.float64).T).max(axis=1).sum() / len(a)
                         for b in p["colbert_vecs"]] for a in q["colbert_vecs"]])
    return {mode: eval_options.combine({"dense": dense, "sparse": sparse, "colbert": colbert}, mode, (1.0, 1.0, 1.0))
            for mode in eval_options.MODES}


def _mine(model, input_path, out, pool_path=None, **options):
    opts = MineOptions(**{**BASE, **options})
    mine_lib.mine(model, str(input_path), str(out), opts, pool_path=pool_path, overwrite=True, progress=False)
    return _records(out)


def _ranked(scores_row, pool, banned=()):
    """Pool texts by score descending, equal scores by pool position; `banned` texts left out."""
    order = np.lexsort((np.arange(len(pool)), -scores_row))
    return [pool[j] for j in order if pool[j] not in banned]


def _assert_same_ranking(found, expected, scores_of, where):
    """found == expected, except that runs of scores within TIE of each other may come in any order."""
    assert len(found) == len(expected), where
    i = 0
    while i < len(expected):
        j = i + 1
        while j < len(expected) and abs(scores_of[expected[j]] - scores_of[expected[j - 1]]) <= TIE:
            j += 1
        assert sorted(found[i:j]) == sorted(expected[i:j]), (where, i)
        i = j


# ---------------------------------------------------------------------------------------------------------------
# ranking


@pytest.mark.parametrize("mode", eval_options.MODES)
def test_ranking_equals_brute_force(model8, data, brute, mode, tmp_path):
    path, records, pool = data
    out = _mine(model8, path, tmp_path / "out.jsonl", mode=mode, range_for_sampling=(0, len(pool)),
                negative_number=len(pool))
    assert len(out) == len(records)
    for r, (rec, got) in enumerate(zip(records, out)):
        assert {k: v for k, v in got.items() if k != "neg"} == {k: v for k, v in rec.items() if k != "neg"}
        expected = _ranked(brute[mode][r], pool, banned=set(rec["pos"]) | {rec["query"]})
        scores_of = dict(zip(pool, brute[mode][r]))
        _assert_same_ranking(got["neg"], expected, scores_of, (mode, r))


def test_search_blocks_are_spread_over_devices(model8, data):
    _, records, pool = data
    searcher = ExactSearch(model8, [r["query"] for r in records], modes=("dense",), top_k=10, batch_size=BATCH,
                           query_max_len=QLEN, passage_max_len=PLEN, passages_per_block=8)
    assert len(set(searcher.block_device)) == 7  # 25 queries: 7 blocks of 4 (at most 4 = 25/8 per device)
    searcher.add(pool[:50])
    top, index = searcher.state()
    fresh = ExactSearch(model8, [r["query"] for r in records], modes=("dense",), top_k=10, batch_size=BATCH,
                        query_max_len=QLEN, passage_max_len=PLEN, passages_per_block=8)
    fresh.load_state(top, index)  # what a resumed pass does
    for s in (searcher, fresh):
        s.add(pool[50:], positions=np.arange(50, len(pool)))
    np.testing.assert_array_equal(searcher.state()[1], fresh.state()[1])
    np.testing.assert_array_equal(searcher.state()[0], fresh.state()[0])


def test_one_and_eight_devices_give_the_same_output(model, model8, data, tmp_path):
    path, _, _ = data
    one = _mine(model, path, tmp_path / "one.jsonl", mode="all", range_for_sampling=(0, 40), negative_number=40)
    eight = _mine(model8, path, tmp_path / "eight.jsonl", mode="all", range_for_sampling=(0, 40), negative_number=40)
    assert one == eight


@pytest.mark.needs_flagembedding
def test_dense_candidates_equal_hn_mine(tiny_ckpt, model, data, tmp_path):
    from FlagEmbedding import BGEM3FlagModel as TheirModel

    path, records, pool = data
    a, b = 3, 20
    theirs = TheirModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=BATCH, query_max_length=QLEN,
                        passage_max_length=PLEN)
    # hn_mine.find_knn_neg: corpus = every pos/neg text (deduplicated), p_vecs = model.encode(corpus),
    # q_vecs = model.encode_queries(queries), faiss IndexFlatIP (exact inner product) top `b`, then per query:
    # inxs[a:b] minus passages in data['pos'] and the query itself.
    corpus = list(set(pool))
    p_vecs = theirs.encode(corpus)["dense_vecs"].astype(np.float32)
    q_vecs = theirs.encode_queries([r["query"] for r in records])["dense_vecs"].astype(np.float32)
    scores = q_vecs @ p_vecs.T
    ours = _mine(model, path, tmp_path / "out.jsonl", mode="dense", range_for_sampling=(a, b), negative_number=b)
    for r, rec in enumerate(records):
        inxs = np.argsort(-scores[r], kind="stable")[:b][a:b]
        expected = {corpus[i] for i in inxs if corpus[i] not in rec["pos"] and corpus[i] != rec["query"]}
        assert set(ours[r]["neg"]) == expected, r
        assert len(ours[r]["neg"]) == len(expected)


# ---------------------------------------------------------------------------------------------------------------
# range and filter rules


def test_range_for_sampling_takes_ranks_start_to_end(model, data, brute, tmp_path):
    path, records, pool = data
    out = _mine(model, path, tmp_path / "out.jsonl", range_for_sampling=(5, 12), negative_number=100)
    for r, rec in enumerate(records):
        ranked = _ranked(brute["dense"][r], pool)[5:12]
        expected = [t for t in ranked if t not in rec["pos"] and t != rec["query"]]
        _assert_same_ranking(out[r]["neg"], expected, dict(zip(pool, brute["dense"][r])), r)
    assert mine_lib.parse_range("2-200") == (2, 200)
    for bad in ("200-2", "5-5", "-1-3", "10", "a-b"):
        with pytest.raises(mine_lib.MineError, match="range_for_sampling"):
            mine_lib.parse_range(bad)


def test_positives_and_the_query_itself_are_never_negatives(model, data, tmp_path):
    path, records, pool = data
    # record 0's query is also a pool passage, and record 1 lists record 2's positive as a positive of its own too
    recs = [dict(r) for r in records[:6]]
    recs[1] = dict(recs[1], pos=recs[1]["pos"] + recs[2]["pos"])
    pool_path = _write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in pool + [recs[0]["query"]]])
    input_path = _write_jsonl(tmp_path / "in.jsonl", recs)
    out = _mine(model, input_path, tmp_path / "out.jsonl", pool_path=pool_path, range_for_sampling=(0, 200),
                negative_number=200)
    for rec, got in zip(recs, out):
        assert len(got["neg"]) == len(pool) + 1 - len(set(rec["pos"]) & set(pool)) - (rec is recs[0])
        assert not set(got["neg"]) & (set(rec["pos"]) | {rec["query"]})
    assert recs[0]["query"] in out[1]["neg"]  # only the record's own query is excluded
    assert recs[2]["pos"][0] in out[0]["neg"]  # other records' positives are fair candidates (as in hn_mine)


def test_max_score_drops_higher_candidates(model, data, brute, tmp_path):
    path, records, pool = data
    cut = float(np.median(brute["dense"]))
    out = _mine(model, path, tmp_path / "out.jsonl", range_for_sampling=(0, 60), negative_number=60, max_score=cut)
    dropped = 0
    for r, rec in enumerate(records):
        ranked = [t for t in _ranked(brute["dense"][r], pool)[:60] if t not in rec["pos"] and t != rec["query"]]
        scores_of = dict(zip(pool, brute["dense"][r]))
        expected = [t for t in ranked if scores_of[t] <= cut]
        dropped += len(ranked) - len(expected)
        assert all(scores_of[t] <= cut + TIE for t in out[r]["neg"])
        _assert_same_ranking([t for t in out[r]["neg"] if abs(scores_of[t] - cut) > TIE],
                             [t for t in expected if abs(scores_of[t] - cut) > TIE], scores_of, r)
    assert dropped > 100  # the rule did something


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_margin_to_the_positive_score(model, data, brute, tmp_path, kind):
    path, records, pool = data
    margin = 0.02 if kind == "absolute" else 0.03
    option = {"absolute_margin" if kind == "absolute" else "relative_margin": margin}
    out = _mine(model, path, tmp_path / "out.jsonl", range_for_sampling=(0, 80), negative_number=80, **option)
    dropped = 0
    for r, rec in enumerate(records):
        scores_of = dict(zip(pool, brute["dense"][r]))
        lowest = min(scores_of[p] for p in rec["pos"])  # every positive of the toy data is in the default pool
        limit = lowest - margin if kind == "absolute" else lowest * (1 - margin)
        ranked = [t for t in _ranked(brute["dense"][r], pool)[:80] if t not in rec["pos"] and t != rec["query"]]
        expected = [t for t in ranked if scores_of[t] <= limit]
        dropped += len(ranked) - len(expected)
        assert all(scores_of[t] <= limit + TIE for t in out[r]["neg"])
        _assert_same_ranking([t for t in out[r]["neg"] if abs(scores_of[t] - limit) > TIE],
                             [t for t in expected if abs(scores_of[t] - limit) > TIE], scores_of, r)
    assert dropped > 25


def test_positive_scores_match_brute_force(model, data, brute):
    _, records, pool = data
    for mode in eval_options.MODES:
        found = mine_lib.positive_scores(model, [r["query"] for r in records], records,
                                         MineOptions(**{**BASE, "mode": mode}).checked())
        expected = [min(brute[mode][r][pool.index(p)] for p in rec["pos"]) for r, rec in enumerate(records)]
        np.testing.assert_allclose(found, expected, atol=2e-6, err_msg=mode)


def test_negative_number_draws_are_seeded_per_record(model, data, brute, tmp_path):
    path, records, pool = data
    kw = dict(range_for_sampling=(0, 30), negative_number=4)
    first = _mine(model, path, tmp_path / "a.jsonl", seed=7, **kw)
    again = _mine(model, path, tmp_path / "b.jsonl", seed=7, queries_per_pass=6, passages_per_chunk=40, **kw)
    other = _mine(model, path, tmp_path / "c.jsonl", seed=8, **kw)
    assert first == again  # the same seed: the same draws, whatever the passes and chunks
    assert first != other
    for r, rec in enumerate(records):
        candidates = [t for t in _ranked(brute["dense"][r], pool)[:30] if t not in rec["pos"] and t != rec["query"]]
        assert len(first[r]["neg"]) == 4 and set(first[r]["neg"]) <= set(candidates)
        ranks = [candidates.index(t) for t in first[r]["neg"]]
        assert ranks == sorted(ranks)  # written in rank order


def test_fill_random_or_none(model, data, tmp_path):
    path, records, pool = data
    strict = dict(range_for_sampling=(0, 30), negative_number=5, max_score=-10.0)  # every candidate dropped
    none = _mine(model, path, tmp_path / "none.jsonl", **strict)
    assert all(rec["neg"] == [] for rec in none)
    filled = _mine(model, path, tmp_path / "fill.jsonl", **{**strict, "fill": "random"})
    for rec, got in zip(records, filled):
        assert len(got["neg"]) == 5 == len(set(got["neg"]))
        assert set(got["neg"]) <= set(pool) and not set(got["neg"]) & (set(rec["pos"]) | {rec["query"]})
    assert filled == _mine(model, path, tmp_path / "fill2.jsonl", **{**strict, "fill": "random"})
    # a pool too small for negative_number: everything that is not excluded, once
    tiny_pool = _write_jsonl(tmp_path / "pool.jsonl", [{"text": t} for t in [records[0]["pos"][0], "x", "y", "x"]])
    small = _mine(model, path, tmp_path / "small.jsonl", pool_path=tiny_pool, **{**strict, "fill": "random"})
    assert sorted(small[0]["neg"]) == ["x", "y"] and sorted(small[1]["neg"]) == sorted(["x", "y", records[0]["pos"][0]])


def test_pool_file_is_deduplicated_and_other_fields_are_kept(model, data, tmp_path):
    _, records, pool = data
    recs = [dict(records[0], neg_scores=[1.0] * len(records[0]["neg"]), type="retrieval", prompt="Represent: "),
            {"query": records[1]["query"], "pos": records[1]["pos"]}]  # no "neg" at all
    input_path = _write_jsonl(tmp_path / "in.jsonl", recs)
    pool_path = _write_jsonl(tmp_path / "pool.jsonl", [{"text": t, "id": i} for i, t in enumerate(pool[:30] * 2)])
    out = _mine(model, input_path, tmp_path / "out.jsonl", pool_path=pool_path, range_for_sampling=(0, 60),
                negative_number=60)
    assert len(out[1]["neg"]) == 30 - len(set(records[1]["pos"]) & set(pool[:30]))  # each pool text once
    assert "neg_scores" not in out[0] and out[0]["type"] == "retrieval" and out[0]["prompt"] == "Represent: "
    assert list(out[0]) == ["query", "pos", "neg", "type", "prompt"] and list(out[1]) == ["query", "pos", "neg"]


# ---------------------------------------------------------------------------------------------------------------
# resume, errors, CLI


def _run_cli(args, env_extra=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "m3jax", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tiny_ckpt, tmp_path):
    records = [r for name in sorted(os.listdir(TOY)) for r in _records(os.path.join(TOY, name))]
    input_path = _write_jsonl(tmp_path / "in.jsonl", [{k: r[k] for k in ("query", "pos", "neg")} for r in records])
    args = ["mine", "--model", tiny_ckpt, "--input", input_path, "--mode", "dense+sparse", "--range-for-sampling",
            "2-40", "--negative-number", "6", "--batch-size", "8", "--query-max-len", str(QLEN), "--passage-max-len",
            str(PLEN), "--queries-per-pass", "16", "--passages-per-block", "8", "--passages-per-chunk", "8",
            "--save-every", "0", "--no-progress", "--seed", "3"]
    reference = tmp_path / "reference.jsonl"
    p = _run_cli(args + ["--output", str(reference)])
    assert p.wait() == 0, p.stdout.read()[-3000:]

    out = tmp_path / "out.jsonl"
    work = tmp_path / ".out.jsonl.m3jax-partial"
    p = _run_cli(args + ["--output", str(out)])
    # killed in the middle of the second pass: one part written, a search state of pass 2 saved
    kill_when(p, lambda: os.path.exists(work / "part-00000000") and any(
        n.startswith("search-00000001") for n in (os.listdir(work) if work.exists() else [])))
    assert not out.exists()
    p = _run_cli(args + ["--output", str(out)])
    log = p.communicate()[0]
    assert p.returncode == 0, log[-3000:]
    assert "continuing the unfinished job" in log and "pass 2 continues after" in log
    assert out.read_bytes() == reference.read_bytes()
    assert not work.exists()
    assert len(_records(out)) == len(records) and all(len(r["neg"]) == 6 for r in _records(out))


@pytest.mark.parametrize("which,lines,message", [
    ("input", ['{"query": "q", "pos": ["p"]}', '{"query": "q", "pos": ["p"],}'], r"in\.jsonl:2: invalid JSON"),
    ("input", ['{"query": "q", "pos": ["p"]}', "", '{"pos": ["p"]}'], r"in\.jsonl:3: missing 'query'"),
    ("input", ['{"query": "q", "neg": ["n"]}'], r"in\.jsonl:1: missing 'pos'"),
    ("input", ['{"query": "q", "pos": []}'], r"in\.jsonl:1: 'pos' is empty"),
    ("input", ['{"query": "q", "pos": ["p"], "neg": "n"}'], r"in\.jsonl:1: 'neg' is str"),
    ("input", [], r"in\.jsonl: no records"),
    ("pool", ['{"text": "a"}', "{oops"], r"pool\.jsonl:2: invalid JSON"),
    ("pool", ['{"text": "a"}', '{"title": "b"}'], r"pool\.jsonl:2: missing 'text'"),
    ("pool", ['{"text": 3}'], r"pool\.jsonl:1: 'text' is int"),
    ("pool", ["", "  "], r"pool\.jsonl: the candidate pool is empty"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, which, lines, message):
    good = ['{"query": "q", "pos": ["p"]}']
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("\n".join(lines if which == "input" else good) + "\n")
    pool_path = tmp_path / "pool.jsonl"
    pool_path.write_text("\n".join(lines if which == "pool" else ['{"text": "a"}']) + "\n")
    status = cli.main(["mine", "--model", str(tmp_path / "no_model"), "--input", str(input_path), "--pool",
                       str(pool_path), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("m3jax mine: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize("flags,message", [
    (["--range-for-sampling", "20-5"], "range_for_sampling='20-5': expected 0 <= START < END"),
    (["--negative-number", "0"], "negative_number=0: expected at least 1"),
    (["--mode", "dense,sparse"], "mining ranks by one mode"),
    (["--mode", "bm25"], "unknown mode 'bm25'"),
    (["--relative-margin", "1.5"], "relative_margin=1.5: expected 0 <= r < 1"),
    (["--mode", "dense+sparse", "--weights", "0", "0", "1"], "sum to 0"),
])
def test_bad_options(tmp_path, capsys, flags, message):
    input_path = _write_jsonl(tmp_path / "in.jsonl", [{"query": "q", "pos": ["p"]}])
    try:
        status = cli.main(["mine", "--model", "nowhere", "--input", input_path, "--output",
                           str(tmp_path / "o.jsonl"), *flags])
    except SystemExit as e:  # argparse's own errors (a --range-for-sampling that does not parse)
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err


def test_existing_output_and_changed_settings(model, data, tmp_path):
    path, _, _ = data
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    opts = MineOptions(**{**BASE, "range_for_sampling": (0, 5), "negative_number": 2})
    with pytest.raises(mine_lib.MineError, match="exists; pass --overwrite"):
        mine_lib.mine(model, path, str(out), opts, progress=False)
    assert out.read_text() == "old\n"
    # an unfinished job with other settings is refused, then discarded with overwrite
    work = tmp_path / ".out.jsonl.m3jax-partial"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({"command": "mine", "options": {"seed": 1}}))
    out.unlink()
    with pytest.raises(mine_lib.MineError, match=r"an unfinished job with other settings \(different: input, "):
        mine_lib.mine(model, path, str(out), opts, progress=False)
    mine_lib.mine(model, path, str(out), opts, progress=False, overwrite=True)
    assert len(_records(out)) == 25 and not work.exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_output_of_one(tiny_ckpt, tmp_path):
    """jax.distributed, 2 processes x 4 CPU devices: mine splits the pool chunks and merges the top lists, score
    splits the record chunks; both outputs equal those of one process with 4 devices, byte for byte."""
    import socket

    from m3jax.io.tiny_checkpoint import make_tiny_reranker

    reranker = make_tiny_reranker(tmp_path / "rr")
    records = [r for name in sorted(os.listdir(TOY)) for r in _records(os.path.join(TOY, name))]
    input_path = _write_jsonl(tmp_path / "in.jsonl", records)
    mine_args = ["mine", "--model", tiny_ckpt, "--input", input_path, "--mode", "dense+sparse",
                 "--range-for-sampling", "2-40", "--negative-number", "6", "--batch-size", "8", "--query-max-len",
                 str(QLEN), "--passage-max-len", str(PLEN), "--passages-per-block", "8", "--passages-per-chunk", "16",
                 "--no-progress"]
    score_args = ["score", "--model", reranker, "--batch-size", "8", "--passage-max-len", str(PLEN),
                  "--records-per-chunk", "5", "--no-progress"]
    four = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

    def run(args, processes):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        envs = [four] if processes == 1 else [
            dict(four, M3JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", M3JAX_NUM_PROCESSES="2", M3JAX_PROCESS_ID=str(i))
            for i in range(2)]
        procs = [_run_cli(args, env) for env in envs]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
        return outs

    for n in (1, 2):
        outs = run(mine_args + ["--output", str(tmp_path / f"mined{n}.jsonl")], n)
        assert f"1 pass(es), {n} process(es)" in outs[0]
        run(score_args + ["--input", str(tmp_path / f"mined{n}.jsonl"), "--output", str(tmp_path / f"scored{n}.jsonl")],
            n)
    assert (tmp_path / "mined1.jsonl").read_bytes() == (tmp_path / "mined2.jsonl").read_bytes()
    assert (tmp_path / "scored1.jsonl").read_bytes() == (tmp_path / "scored2.jsonl").read_bytes()
    assert len(_records(tmp_path / "scored2.jsonl")) == len(records)
