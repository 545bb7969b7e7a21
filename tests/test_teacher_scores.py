"""`m3jax score`: teacher scores equal the teacher's own compute_score (FlagEmbedding's FlagReranker and
BGEM3FlagModel on tiny random models), resume after SIGKILL is byte-identical, bad input gets file:line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from m3jax.cli import main as cli
from m3jax.evaluation import options as eval_options
from m3jax.io.tiny_checkpoint import make_tiny_reranker
from m3jax.model.inference import BGEM3FlagModel
from m3jax.tools.teacher_scores import M3Teacher, score_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "toy_train_data")
INPUT = os.path.join(TOY, "retrieval_multilingual.jsonl")
QLEN, PLEN, BATCH = 32, 64, 8
FE_KEYS = {"dense": "dense", "sparse": "sparse", "colbert": "colbert", "dense+sparse": "sparse+dense",
           "all": "colbert+sparse+dense"}


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pairs(records, instruction=""):
    """add_reranker_score's order: per record, (query, pos) then (query, neg)."""
    return [(instruction + r["query"], p) for r in records for p in r["pos"] + r.get("neg", [])]


def _flat_scores(records):
    return np.array([s for r in records for s in r["pos_scores"] + r["neg_scores"]])


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory):
    return make_tiny_reranker(tmp_path_factory.mktemp("reranker") / "rr")


def _score_cli(capsys, *args):
    status = cli.main(["score", *args])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    return captured


@pytest.mark.needs_flagembedding
def test_reranker_teacher_equals_flagreranker(tiny_reranker, tmp_path, capsys, record_property):
    from FlagEmbedding import FlagReranker

    records = _records(INPUT)
    theirs = FlagReranker(tiny_reranker, use_fp16=False, devices="cpu", batch_size=BATCH, max_length=PLEN)
    out = tmp_path / "scored.jsonl"
    _score_cli(capsys, "--model", tiny_reranker, "--input", INPUT, "--output", str(out), "--batch-size", str(BATCH),
               "--passage-max-len", str(PLEN), "--records-per-chunk", "5", "--no-progress")
    scored = _records(out)
    expected = np.array(theirs.compute_score(_pairs(records)))
    diff = np.abs(_flat_scores(scored) - expected).max()
    record_property("max_abs_diff", float(diff))
    assert diff <= 1e-5
    for rec, got in zip(records, scored):
        assert {k: v for k, v in got.items() if k not in ("pos_scores", "neg_scores")} == rec
        assert len(got["pos_scores"]) == len(rec["pos"]) and len(got["neg_scores"]) == len(rec["neg"])

    # FlagEmbedding's query instruction and normalize
    theirs = FlagReranker(tiny_reranker, use_fp16=False, devices="cpu", batch_size=BATCH, max_length=PLEN,
                          query_instruction_for_rerank="Query: ", normalize=True)
    _score_cli(capsys, "--model", tiny_reranker, "--input", INPUT, "--output", str(out), "--batch-size", str(BATCH),
               "--passage-max-len", str(PLEN), "--query-instruction", "Query: ", "--normalize", "--overwrite",
               "--no-progress")
    expected = np.array(theirs.compute_score(_pairs(records)))
    assert np.abs(_flat_scores(_records(out)) - expected).max() <= 1e-5


@pytest.fixture(scope="module")
def m3_models(tiny_ckpt):
    from FlagEmbedding import BGEM3FlagModel as TheirModel

    ours = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices=None, batch_size=BATCH)  # 8 CPU devices
    theirs = TheirModel(tiny_ckpt, use_fp16=False, devices="cpu", batch_size=BATCH)
    return ours, theirs


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.4, 0.2, 0.4)])
@pytest.mark.needs_flagembedding
def test_m3_teacher_equals_compute_score(m3_models, tmp_path, weights):
    ours, theirs = m3_models
    records = _records(INPUT)
    pairs = _pairs(records)
    one_by_one = theirs.compute_score(pairs, batch_size=1, max_query_length=QLEN, max_passage_length=PLEN,
                                      weights_for_different_modes=list(weights))
    batched = theirs.compute_score(pairs, batch_size=BATCH, max_query_length=QLEN, max_passage_length=PLEN,
                                   weights_for_different_modes=list(weights))
    modes = eval_options.MODES if weights == (1.0, 1.0, 1.0) else ("dense+sparse", "all")
    for mode in modes:
        out = tmp_path / f"{mode}.jsonl"
        teacher = M3Teacher(ours, mode=mode, weights=weights, batch_size=BATCH, query_max_len=QLEN,
                            passage_max_len=PLEN)
        score_file(teacher, INPUT, str(out), records_per_chunk=4, progress=False)
        found = _flat_scores(_records(out))
        assert np.abs(found - np.array(one_by_one[FE_KEYS[mode]])).max() <= 1e-5, mode
        if mode in ("dense", "sparse", "dense+sparse"):  # no padding in these: any batch size gives the same
            assert np.abs(found - np.array(batched[FE_KEYS[mode]])).max() <= 1e-5, mode
    ours_one = ours.compute_score(pairs, batch_size=1, max_query_length=QLEN, max_passage_length=PLEN,
                                  weights_for_different_modes=list(weights))
    np.testing.assert_allclose(found, ours_one[FE_KEYS[modes[-1]]], atol=1e-5)


@pytest.mark.slow
def test_score_resume_after_sigkill_is_byte_identical(tiny_reranker, tmp_path):
    records = [r for name in sorted(os.listdir(TOY)) for r in _records(os.path.join(TOY, name))]
    input_path = tmp_path / "in.jsonl"
    input_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    args = [sys.executable, "-m", "m3jax", "score", "--model", tiny_reranker, "--input", str(input_path),
            "--batch-size", "4", "--passage-max-len", str(PLEN), "--records-per-chunk", "1", "--no-progress"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    run = lambda out: subprocess.Popen(args + ["--output", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    reference = tmp_path / "reference.jsonl"
    p = run(reference)
    assert p.wait() == 0, p.stdout.read()[-3000:]

    out, work = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.m3jax-partial"
    p = run(out)
    deadline = time.time() + 600
    while not (work / "part-00000005").exists():
        assert p.poll() is None, f"run ended before it could be killed:\n{p.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    done = len([n for n in os.listdir(work) if n.startswith("part-")])
    assert 6 <= done < len(records)
    p = run(out)
    log = p.communicate()[0]
    assert p.returncode == 0, log[-3000:]
    assert f"{done} of {len(records)} chunks already scored" in log
    assert out.read_bytes() == reference.read_bytes() and not work.exists()


def test_teacher_choice_and_errors(tiny_reranker, tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n{"query": "q", "pos": "p"}\n')
    assert cli.main(["score", "--model", tiny_reranker, "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"m3jax score: error: {bad}:2: 'pos' is str; expected a list of strings"
    good = tmp_path / "good.jsonl"
    good.write_text('{"query": "q", "pos": ["p"]}\n')
    cases = [
        (["--model", tiny_ckpt, "--normalize"], "--normalize applies to a reranker teacher"),
        (["--model", tiny_ckpt, "--mode", "dense,sparse"], "a teacher scores by one mode"),
        (["--model", tiny_reranker, "--step", "3"], "--step, --base-model and --pooling-method apply to a bge-m3"),
        (["--model", tiny_ckpt, "--teacher", "reranker"], "not a cross-encoder reranker directory"),
        (["--model", tiny_reranker, "--records-per-chunk", "0"], "records_per_chunk=0"),
    ]
    for flags, message in cases:
        status = cli.main(["score", "--input", str(good), "--output", str(tmp_path / "o.jsonl"), "--no-progress",
                           *flags])
        err = capsys.readouterr().err
        assert status == 2 and message in err, (flags, err)
    # auto: a bge-m3 directory scores with its own compute_score ("all"); a record without negatives is fine
    out = _score_cli(capsys, "--model", tiny_ckpt, "--input", str(good), "--output", str(tmp_path / "m3.jsonl"),
                     "--no-progress", "--devices", "cpu")
    assert out.out.strip() == str(tmp_path / "m3.jsonl")
    (rec,) = _records(tmp_path / "m3.jsonl")
    assert rec["neg_scores"] == [] and len(rec["pos_scores"]) == 1
    model = BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu")
    assert rec["pos_scores"][0] == pytest.approx(model.compute_score(("q", "p"))["colbert+sparse+dense"], abs=1e-5)
