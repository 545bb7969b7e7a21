"""m3jax.data.build and the data_* modules below it: FlagEmbedding's sampling rules, determinism, exact resume,
multi-host slices, bad-input messages.

Data is written to tmp dirs; texts are short tagged strings ("d0 pos 3 1") so a decoded batch says where every row
came from. The tokenizer is the tiny checkpoint's XLM-R-style unigram tokenizer (tests/conftest.py `tiny_ckpt`,
<s>=0 <pad>=1 </s>=2 <unk>=3), loaded with hf_read.load_tokenizer as the train loop does.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax.config import default_config
from m3jax.core.padding import length_buckets
from m3jax.data import build as data_build
from m3jax.data.build import BatchShape, DataError
from m3jax.io import hf_read

SEED = 7


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    tok = hf_read.load_tokenizer(tiny_ckpt)
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    return tok


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("M3JAX_CACHE_DIR", str(tmp_path / "cache"))


def records(tag: str, n: int, n_pos: int = 2, n_neg: int = 5, scores: bool = False, long_every: int = 0,
            **columns) -> list[dict]:
    """n examples whose texts name themselves; `long_every`: every k-th text gets extra words (length variety)."""
    out = []
    for i in range(n):
        extra = " extra gamma" * (i % long_every) * 3 if long_every else ""  # up to 100+ characters
        rec = {"query": f"{tag} query {i}{extra}",
               "pos": [f"{tag} pos {i} {j}{extra}" for j in range(n_pos)],
               "neg": [f"{tag} neg {i} {j}" + " beta" * ((i + j) % 4) for j in range(n_neg)], **columns}
        if scores:
            rec["pos_scores"] = [10.0 + j for j in range(n_pos)]
            rec["neg_scores"] = [float((7 * j + i) % 5) for j in range(n_neg)]  # ties on purpose
        out.append(rec)
    return out


def write(path, recs) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def config(train_data, **kw):
    c = default_config()
    c.unlock()
    c.train_data = str(train_data)
    c.seed = SEED
    c.num_data_workers = 0
    c.train_group_size = 4
    c.query_max_len = 16
    c.passage_max_len = 32
    c.per_device_train_batch_size = 2
    for k, v in kw.items():
        c[k] = v
    return c


def build(cfg, tokenizer, **kw):
    """build_train_data on a run config, converted at the edge as the trainer does."""
    return data_build.build_train_data(config_lib.data_settings(cfg), tokenizer, **kw)


def decode(tok, ids, mask):
    return [tok.decode(row[m.astype(bool)], skip_special_tokens=True) for row, m in zip(ids, mask)]


def texts(tok, batch):
    """(queries, [[passages of query i]]) of a local batch."""
    qs = decode(tok, batch["query_input_ids"], batch["query_attention_mask"])
    ps = decode(tok, batch["passage_input_ids"], batch["passage_attention_mask"])
    g = len(ps) // len(qs)
    return qs, [ps[i * g:(i + 1) * g] for i in range(len(qs))]


def epoch_batches(data, epoch=0):
    return [data.batch(epoch * data.steps_per_epoch + i) for i in range(data.steps_per_epoch)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k


# ---- batch layout and tokenisation ---------------------------------------------------------------------------------

def test_length_buckets():
    assert length_buckets(128) == [32, 64, 128]
    assert length_buckets(100) == [32, 64, 100]
    assert length_buckets(8192) == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert length_buckets(8) == [8]
    assert length_buckets(64, (10, 40, 64, 100)) == [10, 40, 64]


def test_batch_layout_and_tokenisation_match_flagembedding_collator(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 8, long_every=3))
    data = build(config(tmp_path / "d", passage_max_len=12), tokenizer, num_batch_shards=2)
    b = data.batch(0)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "query_input_ids": ((4, 16), "int32"), "query_attention_mask": ((4, 16), "int32"),
        "passage_input_ids": ((16, 12), "int32"), "passage_attention_mask": ((16, 12), "int32"),
        "teacher_scores": ((4, 4), "float32"), "has_teacher_scores": ((), "bool"), "no_in_batch_neg": ((), "bool"),
        "epoch": ((), "int32"), "dataset_index": ((), "int32")}
    assert isinstance(b["has_teacher_scores"], np.bool_) and isinstance(b["epoch"], np.int32)
    qs, ps = texts(tokenizer, b)
    flat = [p for group in ps for p in group]
    # Exactly `tokenizer(texts, truncation=True, max_length=...)`, right-padded with pad id 1 / mask 0.
    for ids, mask, txts, max_len in ((b["query_input_ids"], b["query_attention_mask"], qs, 16),
                                     (b["passage_input_ids"], b["passage_attention_mask"], flat, 12)):
        ref = tokenizer(txts, truncation=True, max_length=max_len)["input_ids"]
        for row, m, r in zip(ids, mask, ref):
            assert row[:len(r)].tolist() == r and (row[len(r):] == 1).all()
            assert m.tolist() == [1] * len(r) + [0] * (len(row) - len(r))
    # Long passages were truncated to passage_max_len: the batch needs it all.
    assert b["passage_attention_mask"].sum(1).max() == 12


def test_padding_goes_to_the_smallest_bucket_holding_the_longest_text(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 16, long_every=4))
    data = build(config(tmp_path / "d", query_max_len=64, passage_max_len=64, seq_len_buckets=(12, 24),
                        per_device_train_batch_size=1), tokenizer, num_batch_shards=1)
    seen = set()
    for b in epoch_batches(data):
        for key in ("query", "passage"):
            longest = int(b[f"{key}_attention_mask"].sum(1).max())
            width = b[f"{key}_input_ids"].shape[1]
            assert width == next(x for x in (12, 24, 64) if x >= longest)
            seen.add(width)
    assert seen == {12, 24, 64}


# ---- sampling rules --------------------------------------------------------------------------------------------------

def expected_choices(step, position, n_pos, n_neg, g, epoch=0, seed=SEED):
    """The documented per-example draws: positive, negatives (repeat rule), shuffle u, chunk permutation."""
    rng = np.random.default_rng([seed, epoch, step, position])
    pos = int(rng.integers(n_pos))
    k = g - 1
    if n_neg < k:
        negs = rng.choice(np.tile(np.arange(n_neg), math.ceil(k / n_neg)), k, replace=False)
    else:
        negs = rng.choice(n_neg, k, replace=False)
    return pos, [int(x) for x in negs], float(rng.random()), rng.permutation(3)


def example_index(query: str) -> int:
    return int(query.split()[2])


def test_one_random_positive_and_negatives_without_replacement(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 12, n_pos=3, n_neg=6))
    data = build(config(tmp_path / "d"), tokenizer, num_batch_shards=2)
    for step in range(data.steps_per_epoch):
        qs, ps = texts(tokenizer, data.batch(step))
        for position, (q, group) in enumerate(zip(qs, ps)):
            i = example_index(q)
            pos, negs, _, _ = expected_choices(step, position, 3, 6, 4)
            assert group == [f"d0 pos {i} {pos}"] + [f"d0 neg {i} {j}" + " beta" * ((i + j) % 4) for j in negs]
            assert len(set(negs)) == 3


def test_too_few_negatives_are_sampled_from_the_repeated_list(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 4, n_pos=1, n_neg=2))
    data = build(config(tmp_path / "d", train_group_size=6, per_device_train_batch_size=4), tokenizer,
                 num_batch_shards=1)
    qs, ps = texts(tokenizer, data.batch(0))
    for position, (q, group) in enumerate(zip(qs, ps)):
        i = example_index(q)
        _, negs, _, _ = expected_choices(0, position, 1, 2, 6)
        assert group[1:] == [f"d0 neg {i} {j}" + " beta" * ((i + j) % 4) for j in negs]
        # 5 draws without replacement from [0, 1] * 3: each negative 2 or 3 times.
        assert sorted(negs.count(j) for j in (0, 1)) == [2, 3]


def test_kd_negatives_sorted_by_teacher_score_descending(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 8, n_pos=2, n_neg=5, scores=True))
    data = build(config(tmp_path / "d", knowledge_distillation=True, train_group_size=5), tokenizer,
                 num_batch_shards=1)
    for step in range(data.steps_per_epoch):
        b = data.batch(step)
        assert b["has_teacher_scores"]
        qs, ps = texts(tokenizer, b)
        for position, (q, group) in enumerate(zip(qs, ps)):
            i = example_index(q)
            pos, negs, _, _ = expected_choices(step, position, 2, 5, 5)
            neg_score = lambda j, i=i: float((7 * j + i) % 5)  # noqa: E731
            order = sorted(negs, key=neg_score, reverse=True)  # stable: ties keep the sampled order
            assert group == [f"d0 pos {i} {pos}"] + [f"d0 neg {i} {j}" + " beta" * ((i + j) % 4) for j in order]
            assert b["teacher_scores"][position].tolist() == [10.0 + pos] + [neg_score(j) for j in order]


def test_kd_without_scores_in_a_dataset_warns_and_kd_off_ignores_scores(tmp_path, tokenizer, caplog):
    write(tmp_path / "d" / "a.jsonl", records("d0", 4, scores=True))
    write(tmp_path / "d" / "b.jsonl", records("d1", 4))
    with caplog.at_level(logging.WARNING):
        data = build(config(tmp_path / "d", knowledge_distillation=True), tokenizer, num_batch_shards=2)
    assert "b.jsonl has no teacher scores" in caplog.text and "a.jsonl has no" not in caplog.text
    for b in epoch_batches(data):
        from_a = texts(tokenizer, b)[0][0].startswith("d0")
        assert bool(b["has_teacher_scores"]) == from_a
        assert (b["teacher_scores"] != 0).any() == from_a
    data = build(config(tmp_path / "d", knowledge_distillation=False), tokenizer, num_batch_shards=2)
    for b in epoch_batches(data):
        assert not b["has_teacher_scores"] and (b["teacher_scores"] == 0).all()


def test_same_dataset_batches_and_epoch_plan(tmp_path, tokenizer):
    """Every batch from one dataset; each epoch covers every example once per full batch; epochs differ."""
    write(tmp_path / "d" / "a.jsonl", records("d0", 8))
    write(tmp_path / "d" / "b.jsonl", records("d1", 12))
    data = build(config(tmp_path / "d"), tokenizer, num_batch_shards=2)
    assert data.steps_per_epoch == 2 + 3
    orders = []
    for epoch in range(2):
        seen = []
        for b in epoch_batches(data, epoch):
            qs = texts(tokenizer, b)[0]
            tags = {q.split()[0] for q in qs}
            assert tags == {f"d{int(b['dataset_index'])}"} and b["epoch"] == epoch
            seen += qs
        assert sorted(seen) == sorted([f"d0 query {i}" for i in range(8)] + [f"d1 query {i}" for i in range(12)])
        orders.append(seen)
    assert orders[0] != orders[1]


@pytest.mark.needs_flagembedding
def test_epoch_plan_is_flagembeddings(tmp_path, tokenizer):
    """Same seed, same file order: FlagEmbedding 1.4's refresh_epoch forms the same batches in the same order."""
    from FlagEmbedding.abc.finetune.embedder import AbsDataset as fe
    dirs = []
    for k, n in enumerate((12, 8, 16)):  # multiples of the global batch 4: 1.4 and the research rule agree
        dirs.append(write(tmp_path / f"dir{k}" / "data.jsonl", records(f"d{k}", n)).rsplit("/", 1)[0])
    data = build(config(",".join(dirs)), tokenizer, num_batch_shards=2)

    class Args:  # the AbsEmbedderDataArguments fields the dataset reads
        train_data, cache_path, max_example_num_per_dataset = dirs, str(tmp_path / "hf"), 10 ** 8
        knowledge_distillation, shuffle_ratio, small_threshold, drop_threshold = False, 0.0, 0, 0
        train_group_size, query_instruction_for_retrieval, query_instruction_format = 4, None, "{}{}"
        passage_instruction_for_retrieval, passage_instruction_format = None, "{}{}"

    ref = fe.AbsEmbedderSameDatasetTrainDataset(Args(), default_batch_size=2, seed=SEED, tokenizer=tokenizer,
                                                process_index=0, num_processes=2)
    planner = data._pipeline.plan.planner()
    for epoch in range(3):
        if epoch:
            ref.refresh_epoch()
        ours = [(d, ids.tolist()) for d, ids in planner.epoch(epoch)]
        theirs = [(None, list(map(int, ids))) for ids, _ in ref.batch_datas]
        assert [ids for _, ids in ours] == [ids for _, ids in theirs]


def test_small_threshold_merges_and_drop_threshold_drops(tmp_path, tokenizer, caplog):
    write(tmp_path / "d" / "big.jsonl", records("d0", 12))
    write(tmp_path / "d" / "s1.jsonl", records("d1", 3, batch_size=3))
    write(tmp_path / "d" / "s2.jsonl", records("d2", 3))  # batch size 2 (default): the merged set takes the min
    write(tmp_path / "e" / "s3.jsonl", records("d3", 2))
    with caplog.at_level(logging.WARNING):
        data = build(config(f"{tmp_path}/d,{tmp_path}/e", small_threshold=5, drop_threshold=4),
                     tokenizer, num_batch_shards=1)
    assert "dropping 1 small file(s)" in caplog.text and "s3.jsonl" not in "".join(d[0] for d in data.datasets)
    assert [(os.path.basename(d[0].split(" ")[0]), d[1], d[2]) for d in data.datasets] == [
        ("big.jsonl", 12, 2), ("d", 6, 2)]
    merged = [texts(tokenizer, b)[0] for b in epoch_batches(data) if b["dataset_index"] == 1]
    assert sorted(q for qs in merged for q in qs) == sorted([f"d1 query {i}" for i in range(3)]
                                                           + [f"d2 query {i}" for i in range(3)])


def test_max_example_num_per_dataset_subsamples_deterministically(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 20))
    cfg = config(tmp_path / "d", max_example_num_per_dataset=6)
    seen = [sorted(q for b in epoch_batches(build(cfg, tokenizer, num_batch_shards=1))
                   for q in texts(tokenizer, b)[0]) for _ in range(2)]
    assert len(seen[0]) == 6 and len(set(seen[0])) == 6 and seen[0] == seen[1]


def test_instructions_and_prompt_column(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 2, n_neg=3))
    write(tmp_path / "d" / "b.jsonl", records("d1", 2, n_neg=3, prompt="this: "))
    write(tmp_path / "d" / "c.jsonl", records("d2", 4, n_neg=3, type="symmetric_sts"))  # batch 2 // 2 = 1
    cfg = config(tmp_path / "d", query_max_len=64, passage_max_len=64,
                 query_instruction_for_retrieval="Represent", query_instruction_format="{}: {}",
                 passage_instruction_for_retrieval="passage", passage_instruction_format="{} - {}")
    data = build(cfg, tokenizer, num_batch_shards=1)
    checked = set()
    for b in epoch_batches(data):
        qs, ps = texts(tokenizer, b)
        tag = qs[0].split()[-3] if qs[0].startswith(("Represent", "this")) else qs[0].split()[0]
        for q, group in zip(qs, ps):
            i = q.split()[-1]
            if tag == "d0":
                assert q == f"Represent: d0 query {i}" and all(p.startswith("passage - d0 ") for p in group)
            elif tag == "d1":  # the example's prompt replaces the query instruction
                assert q == f"this: : d1 query {i}" and all(p.startswith("passage - d1 ") for p in group)
            else:  # symmetric_sts: passages take the query instruction
                assert q == f"Represent: d2 query {i}" and all(p.startswith("Represent: d2 ") for p in group)
        checked.add(tag)
    assert checked == {"d0", "d1", "d2"}


def test_shuffle_ratio_shuffles_three_chunks_of_long_positives(tmp_path, tokenizer):
    long_pos = "alpha beta gamma delta " * 6  # 138 characters
    recs = [{"query": f"d0 query {i}", "pos": [long_pos if i % 2 else "short pos"], "neg": ["n0", "n1"]}
            for i in range(8)]
    write(tmp_path / "d" / "a.jsonl", recs)
    data = build(config(tmp_path / "d", shuffle_ratio=0.5, train_group_size=2, passage_max_len=256),
                 tokenizer, num_batch_shards=1)
    shuffled = 0
    for step in range(data.steps_per_epoch):
        qs, ps = texts(tokenizer, data.batch(step))
        for position, (q, group) in enumerate(zip(qs, ps)):
            if example_index(q) % 2 == 0:
                assert group[0] == "short pos"  # <= 100 characters: never shuffled
                continue
            _, _, u, perm = expected_choices(step, position, 1, 2, 2)
            size = len(long_pos) // 3 + 1
            chunks = [long_pos[k:k + size] for k in range(0, len(long_pos), size)]
            want = " ".join(chunks[j] for j in perm) if u < 0.5 else long_pos
            # decode() normalises runs of spaces the way the tokenizer does
            assert group[0] == tokenizer.decode(tokenizer(want)["input_ids"], skip_special_tokens=True)
            shuffled += u < 0.5
    assert 0 < shuffled < 4


def test_per_dataset_columns(tmp_path, tokenizer):
    write(tmp_path / "d" / "bs.jsonl", records("d0", 6, batch_size=3))
    write(tmp_path / "d" / "one.jsonl", records("d1", 4, type="only_1neg"))
    write(tmp_path / "d" / "cls.jsonl", [dict(r, neg=r["neg"][:1 + i % 2]) for i, r in
                                         enumerate(records("d2", 8, type="symmetric_class"))])
    write(tmp_path / "d" / "tgs.jsonl", records("d3", 4, train_group_size=3))
    data = build(config(tmp_path / "d", per_device_train_batch_size=4, train_group_size=4), tokenizer,
                 num_batch_shards=1)
    by_name = {os.path.basename(d[0]): d[1:] for d in data.datasets}
    assert by_name["bs.jsonl"][1] == 3 and by_name["one.jsonl"][2] == (2,) and by_name["tgs.jsonl"][2] == (3,)
    assert by_name["cls.jsonl"][1:3] == (2, (2, 3))  # symmetric halves the batch; G = min(#neg of first + 1, 4)
    for b in epoch_batches(data):
        qs, ps = texts(tokenizer, b)
        tag = qs[0].split()[0]
        g = len(ps[0])
        if tag == "d2":
            first_negs = 1 + example_index(qs[0]) % 2
            assert g == min(first_negs + 1, 4)
        else:
            assert g == {"d0": 4, "d1": 2, "d3": 3}[tag]
        assert len(qs) == {"d0": 3, "d1": 4, "d2": 2, "d3": 4}[tag]
        assert BatchShape(len(qs), g, b["query_input_ids"].shape[1], b["passage_input_ids"].shape[1], False,
                          False) in data.shapes()


def test_length_tagged_files_take_their_batch_size(tmp_path, tokenizer):
    write(tmp_path / "d" / "x_len-0-500.jsonl", records("d0", 60))
    write(tmp_path / "d" / "x_len-500-1000.jsonl", records("d1", 40))
    write(tmp_path / "d" / "plain.jsonl", records("d2", 4))
    data = build(config(tmp_path / "d", train_group_size=8), tokenizer, num_batch_shards=1)
    assert [d[2] for d in data.datasets] == [2, 48, 32]  # research table for G=8; untagged: per_device 2
    data = build(config(tmp_path / "d", batch_size_by_length={"0-500": 5}), tokenizer,
                 num_batch_shards=1)
    assert [d[2] for d in data.datasets] == [2, 5, 2]


def test_no_in_batch_neg_directory(tmp_path, tokenizer):
    write(tmp_path / "cls_no_in_batch_neg" / "a.jsonl", records("d0", 4))
    write(tmp_path / "plain" / "b.jsonl", records("d1", 4))
    data = build(config(f"{tmp_path}/cls_no_in_batch_neg/,{tmp_path}/plain"), tokenizer,
                 num_batch_shards=1)
    for b in epoch_batches(data):
        assert bool(b["no_in_batch_neg"]) == texts(tokenizer, b)[0][0].startswith("d0")


def _file_data(tmp_path):
    """train_data mixing FlagEmbedding 1.4.2's file paths and a directory: a.jsonl (12 examples), d/ (b.jsonl, 8),
    c_no_in_batch_neg.json (JSON lines, 16, batch_size 4) and small.jsonl (3, below small_threshold 4)."""
    a = write(tmp_path / "a.jsonl", records("d0", 12))
    d = os.path.dirname(write(tmp_path / "d" / "b.jsonl", records("d1", 8)))
    c = write(tmp_path / "c_no_in_batch_neg.json", records("d2", 16, batch_size=4))
    small = write(tmp_path / "small.jsonl", records("d3", 3))
    return [a, d, c, small]


def test_json_and_jsonl_files_as_train_data(tmp_path, tokenizer, caplog):
    """Issue 27: a .json/.jsonl file given as train_data is one dataset, as FlagEmbedding 1.4.2 takes it: never
    merged with small files (skipped below small_threshold), no_in_batch_neg from its name."""
    paths = _file_data(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = build(config(",".join(paths), small_threshold=4), tokenizer, num_batch_shards=1)
    assert [(os.path.basename(d.name), d.num_examples, d.batch_size, d.no_in_batch_neg) for d in data.datasets] == [
        ("a.jsonl", 12, 2, False), ("b.jsonl", 8, 2, False), ("c_no_in_batch_neg.json", 16, 4, True)]
    assert "small.jsonl with 3 examples (a train_data file below small_threshold 4 is skipped" in caplog.text
    seen = set()
    for b in epoch_batches(data):
        qs = texts(tokenizer, b)[0]
        assert bool(b["no_in_batch_neg"]) == qs[0].startswith("d2")
        seen.update(qs)
    assert len(seen) == 12 + 8 + 16
    json_array = tmp_path / "arr" / "e.json"
    json_array.parent.mkdir()
    json_array.write_text(json.dumps(records("d4", 4)))  # a JSON array file too
    assert build(config(str(json_array)), tokenizer, num_batch_shards=1).datasets[0].num_examples == 4


@pytest.mark.needs_flagembedding
def test_train_data_files_are_flagembeddings_datasets(tmp_path, tokenizer):
    """The same train_data (files and a directory) in FlagEmbedding 1.4.2's AbsEmbedderSameDatasetTrainDataset:
    the same datasets, batch sizes, no_in_batch_neg flags and batches, epoch after epoch."""
    from FlagEmbedding.abc.finetune.embedder import AbsDataset as fe

    paths = _file_data(tmp_path)
    data = build(config(",".join(paths), small_threshold=4), tokenizer, num_batch_shards=2)

    class Args:  # the AbsEmbedderDataArguments fields the dataset reads
        train_data, cache_path, max_example_num_per_dataset = paths, str(tmp_path / "hf"), 10 ** 8
        knowledge_distillation, shuffle_ratio, small_threshold, drop_threshold = False, 0.0, 4, 0
        train_group_size, query_instruction_for_retrieval, query_instruction_format = 4, None, "{}{}"
        passage_instruction_for_retrieval, passage_instruction_format = None, "{}{}"

    ref = fe.AbsEmbedderSameDatasetTrainDataset(Args(), default_batch_size=2, seed=SEED, tokenizer=tokenizer,
                                                process_index=0, num_processes=2)
    assert [d.batch_size for d in data.datasets] == list(ref.batch_size_idxs) == [2, 2, 4]
    assert [d.no_in_batch_neg for d in data.datasets] == list(ref.no_in_batch_neg_flags) == [False, False, True]
    assert [d.num_examples for d in data.datasets] == [len(i) for i in ref.each_data_idxs]
    planner = data._pipeline.plan.planner()
    for epoch in range(3):
        if epoch:
            ref.refresh_epoch()
        ours = [(data.datasets[d].no_in_batch_neg, ids.tolist()) for d, ids in planner.epoch(epoch)]
        theirs = [(flag, list(map(int, ids))) for ids, flag in ref.batch_datas]
        assert ours == theirs


def test_last_short_batch_research_rule(tmp_path, tokenizer):
    # per-device 3, W=2: global batches of 6; a short last batch stays if it has >= 2*W=4 examples, cut to 2k.
    write(tmp_path / "a" / "a.jsonl", records("d0", 11))  # 6, then 5 -> kept as 4
    write(tmp_path / "b" / "b.jsonl", records("d1", 13))  # 6, 6, then 1 -> dropped
    write(tmp_path / "c" / "c.jsonl", records("d2", 9))   # 6, then 3 -> dropped
    data = build(config(f"{tmp_path}/a,{tmp_path}/b,{tmp_path}/c", per_device_train_batch_size=3),
                 tokenizer, num_batch_shards=2)
    sizes = sorted((int(b["dataset_index"]), len(b["query_input_ids"])) for b in epoch_batches(data))
    assert sizes == [(0, 4), (0, 6), (1, 6), (1, 6), (2, 6)]
    assert {s.global_batch for s in data.shapes()} == {4, 6}


def test_mixed_batches_when_not_same_dataset(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 10, type="only_1neg"))  # type ignored in this mode
    write(tmp_path / "d" / "b.jsonl", records("d1", 10))
    data = build(config(tmp_path / "d", same_dataset_within_batch=False), tokenizer, num_batch_shards=2)
    assert data.steps_per_epoch == 5
    tags = set()
    seen = []
    for b in epoch_batches(data):
        assert b["dataset_index"] == -1 and not b["no_in_batch_neg"]
        qs, ps = texts(tokenizer, b)
        assert all(len(g) == 4 for g in ps)
        tags.add(frozenset(q.split()[0] for q in qs))
        seen += qs
    assert len(set(seen)) == 20 and any(len(t) == 2 for t in tags)


def test_every_batch_has_a_listed_shape(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", records("d0", 14, long_every=5, scores=True))
    write(tmp_path / "d" / "b.jsonl", records("d1", 9, long_every=3))
    data = build(config(tmp_path / "d", knowledge_distillation=True), tokenizer, num_batch_shards=2)
    shapes = set(data.shapes())
    for epoch in range(2):
        for b in epoch_batches(data, epoch):
            n, lq = b["query_input_ids"].shape
            assert BatchShape(n, b["passage_input_ids"].shape[0] // n, lq, b["passage_input_ids"].shape[1],
                              bool(b["has_teacher_scores"]), bool(b["no_in_batch_neg"])) in shapes


# ---- the pipeline's stages, each alone on a tiny input ------------------------------------------------------------

def corpus_of(tmp_path, *files, per_dataset_columns=True):
    """A Corpus of these files (lists of records), examples numbered file after file."""
    from m3jax.data.files import ScanRules, scan_file
    from m3jax.data.sampling import Corpus
    rules = ScanRules(4, True, per_dataset_columns, False)
    index = [scan_file(write(tmp_path / "c" / f"{k}.jsonl", recs), rules) for k, recs in enumerate(files)]
    file_of = np.concatenate([np.full(len(f), k, np.int32) for k, f in enumerate(index)])
    rec_of = np.concatenate([np.arange(len(f), dtype=np.int64) for f in index])
    return Corpus(index, file_of, rec_of, per_dataset_columns)


def settings(**kw):
    from m3jax.data.files import Instructions
    s = dict(seed=SEED, train_group_size=3, query_max_len=16, passage_max_len=32, query_buckets=(8, 16),
             passage_buckets=(8, 16, 32), shuffle_ratio=0.0, knowledge_distillation=False,
             same_dataset_within_batch=True, instructions=Instructions())
    return dataclasses.replace(config_lib.data_settings(config("")), **{**s, **kw})


def tiny_datasets():
    from m3jax.data.sampling import Dataset
    return [Dataset("a", [0], 0, 4, 2, no_in_batch_neg=False, has_teacher=False, group_sizes=(3,)),
            Dataset("b", [1], 4, 10, 3, no_in_batch_neg=True, has_teacher=True, group_sizes=(3,))]


def test_plan_step_replays_the_epoch_plans_for_any_step():
    import pickle

    from m3jax.data.pipeline import PlanStep
    plan = PlanStep(SEED, tiny_datasets(), 1, True)
    assert plan.steps_per_epoch == 2 + 2  # 4 examples in batches of 2; 6 in batches of 3
    got = [(p.step, p.epoch, p.dataset_index, p.examples.tolist()) for p in map(plan.map, range(8))]
    assert got == [(0, 0, 0, [3, 1]), (1, 0, 1, [4, 8, 5]), (2, 0, 1, [7, 9, 6]), (3, 0, 0, [2, 0]),
                   (4, 1, 1, [5, 4, 8]), (5, 1, 0, [3, 1]), (6, 1, 1, [7, 9, 6]), (7, 1, 0, [2, 0])]
    # Random access: going back an epoch replays from the seed; a pickled copy (a grain worker) plans the same.
    assert plan.map(1).examples.tolist() == [4, 8, 5]
    assert pickle.loads(pickle.dumps(plan)).map(6).examples.tolist() == [7, 9, 6]
    mixed = PlanStep(SEED, tiny_datasets()[:1], 2, False)  # W=2: one batch of 4, dataset_index -1
    assert [(p.dataset_index, sorted(p.examples.tolist())) for p in map(mixed.map, range(2))] == [
        (-1, [0, 1, 2, 3]), (-1, [0, 1, 2, 3])]


def test_draw_samples_draws_each_example_from_its_own_generator(tmp_path):
    from m3jax.data.pipeline import DrawSamples
    from m3jax.data.sampling import Plan, draw_sample
    recs = records("d0", 3, n_pos=2, n_neg=1)  # one negative: G-1 = 2 negatives come from [0] * 2
    corpus = corpus_of(tmp_path, records("d1", 2), recs)  # examples 0-1 in file 0, 2-4 in file 1
    plan = Plan(step=5, epoch=1, dataset_index=1, examples=np.array([4, 2]))
    batch = DrawSamples(SEED, 3, corpus, tiny_datasets()).map(plan)
    assert (batch.plan, batch.group_size, batch.has_teacher, batch.no_in_batch_neg, batch.pad_to) == (
        plan, 3, True, True, None)
    for position, smp in enumerate(batch.samples):
        pos, negs, u, perm = expected_choices(5, position, 2, 1, 3, epoch=1)
        assert (smp.example, smp.pos, smp.negs.tolist(), smp.shuffle_u, smp.shuffle_perm.tolist()) == (
            [4, 2][position], pos, negs, u, perm.tolist())
        assert negs == [0, 0]
    assert draw_sample(SEED, plan, 1, 2, 1, 3).shuffle_u == batch.samples[1].shuffle_u
    # G comes from the batch's first example: symmetric_class -> min(#neg + 1, G).
    cls = corpus_of(tmp_path, [dict(r, type="symmetric_class", neg=r["neg"][:1 + i]) for i, r in
                               enumerate(records("d0", 3))])
    draw = DrawSamples(SEED, 3, cls, tiny_datasets())
    assert [draw.map(Plan(0, 0, -1, np.array(ids))).group_size for ids in ([0, 1], [1, 0], [2, 0])] == [2, 3, 3]
    assert draw.map(Plan(0, 0, -1, np.array([0, 1]))).no_in_batch_neg is False  # -1 (mixed): dataset 0's flags


def test_local_slice_takes_this_process_part():
    from m3jax.data.pipeline import LocalSlice
    from m3jax.data.sampling import Plan, Samples
    batch = Samples(Plan(0, 0, 0, np.arange(6)), 2, False, False, samples=list("abcdef"))
    assert [LocalSlice(p, 3).map(batch).samples for p in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert LocalSlice(0, 1).map(batch) == batch


def test_read_texts_applies_shuffle_teacher_order_and_instructions(tmp_path):
    from m3jax.data.files import Instructions
    from m3jax.data.pipeline import ReadTexts
    from m3jax.data.sampling import Plan, Sample, Samples
    long_pos = "alpha beta gamma delta " * 6  # 138 characters: chunks of 47
    recs = [{"query": "q0", "pos": ["p0", long_pos], "neg": ["n0", "n1", "n2"], "pos_scores": [1, 2],
             "neg_scores": [0.5, 3, 0.5]},
            {"query": "q1", "pos": [long_pos], "neg": ["m0", "m1"], "pos_scores": [4], "neg_scores": [1, 2],
             "prompt": "P"}]
    corpus = corpus_of(tmp_path, recs)
    s = settings(shuffle_ratio=0.5, instructions=Instructions("Q", "{}: {}", "D", "{} | {}"))
    samples = [Sample(1, 0, np.array([0, 1]), 0.9, np.array([2, 0, 1])),  # u >= ratio: not shuffled
               Sample(0, 1, np.array([2, 0]), 0.1, np.array([2, 0, 1]))]  # shuffled: chunks 2, 0, 1
    chunks = [long_pos[:47], long_pos[47:94], long_pos[94:]]
    texts = ReadTexts(s, corpus).map(Samples(Plan(0, 0, 0, np.array([1, 0])), 3, True, False, samples))
    assert texts.queries == ["P: q1", "Q: q0"]  # the example's prompt wins over the query instruction
    assert texts.passages == ["D | " + long_pos, "D | m1", "D | m0",  # by teacher score, descending
                              "D | " + " ".join([chunks[2], chunks[0], chunks[1]]), "D | n2", "D | n0"]  # tie: as drawn
    assert texts.teacher_scores.dtype == np.float32
    assert texts.teacher_scores.tolist() == [[4, 2, 1], [2, 0.5, 0.5]]
    plain = ReadTexts(settings(), corpus).map(Samples(Plan(0, 0, 0, np.array([1, 0])), 3, False, False, samples))
    assert plain.passages[:3] == [long_pos, "m0", "m1"] and plain.teacher_scores.tolist() == [[0, 0, 0]] * 2


def test_tokenize_and_pad_is_the_collator_padded_to_a_bucket(tokenizer):
    from m3jax.data.pipeline import Texts, TokenizeAndPad
    from m3jax.data.sampling import Plan, Samples
    s = settings(query_max_len=16, query_buckets=(4, 16), passage_max_len=8, passage_buckets=(4, 8))
    queries, passages = ["a b", "c"], ["one", "two words here", "x " * 20, "y"]
    batch = Samples(Plan(9, 2, 1, np.array([0, 1])), 2, False, True, [])
    step, out = TokenizeAndPad(s, tokenizer.backend_tokenizer.to_str(), 1).map(
        Texts(batch, queries, passages, np.zeros((2, 2), np.float32)))
    assert step == 9 and (out["epoch"], out["dataset_index"], out["no_in_batch_neg"]) == (2, 1, True)
    for key, txts, max_len, width in (("query", queries, 16, 4), ("passage", passages, 8, 8)):
        ids, mask = out[f"{key}_input_ids"], out[f"{key}_attention_mask"]
        assert ids.shape == mask.shape == (len(txts), width) and ids.dtype == mask.dtype == np.int32
        for row, m, want in zip(ids, mask, tokenizer(txts, truncation=True, max_length=max_len)["input_ids"]):
            assert row.tolist() == want + [1] * (width - len(want)) and m.tolist() == [1] * len(want) + [0] * (
                width - len(want))
    assert out["passage_attention_mask"].sum(1).max() == 8  # "x x x ..." truncated to passage_max_len
    fixed = TokenizeAndPad(s, tokenizer.backend_tokenizer.to_str(), 1).map(
        Texts(batch._replace(pad_to=(16, 8)), queries[:1], passages[:2], np.zeros((1, 2), np.float32)))[1]
    assert fixed["query_input_ids"].shape == (1, 16) and fixed["passage_input_ids"].shape == (2, 8)
    with pytest.raises(RuntimeError, match="token-length cache is stale"):
        TokenizeAndPad(s, tokenizer.backend_tokenizer.to_str(), 1).map(
            Texts(batch._replace(pad_to=(16, 2)), queries[:1], passages[:2], np.zeros((1, 2), np.float32)))


def test_global_pad_lengths_from_the_table_and_reshuffled_positives(tmp_path, tokenizer):
    from m3jax.data.files import FileLengths
    from m3jax.data.pipeline import GlobalPadLengths
    from m3jax.data.sampling import Plan, Sample, Samples
    long_pos = "alpha beta gamma delta " * 6
    corpus = corpus_of(tmp_path, [{"query": "q0", "pos": ["p0", long_pos], "neg": ["n0", "n1", "n2"]},
                                  {"query": "q1", "pos": ["p"], "neg": ["m"]}])
    # Made-up lengths, to see which entries are read: record 0's pos at [0, 2), neg at [0, 3); record 1's after.
    table = FileLengths(query=np.array([5, 9]), pos=np.array([3, 20, 7]), neg=np.array([4, 6, 8, 30]))
    batch = Samples(Plan(0, 0, 0, np.array([0, 1])), 3, False, False,
                    [Sample(0, 1, np.array([0, 2]), 0.1, np.array([2, 0, 1])),
                     Sample(1, 0, np.array([], np.int64), 0.9, np.array([0, 1, 2]))])
    stage = GlobalPadLengths(settings(), corpus, [table], tokenizer.backend_tokenizer.to_str())
    assert stage.map(batch).pad_to == (16, 32)  # longest query 9 -> 16; longest passage 20 (record 0's pos 1) -> 32
    queries, passages = stage.map(batch).text_lengths  # each text's (packing plans the global batch from them)
    assert queries.tolist() == [5, 9] and passages.tolist() == [[20, 4, 8], [7, 0, 0]]  # 0: no such passage
    assert stage.map(batch._replace(samples=batch.samples[1:])).pad_to == (16, 8)  # 9 -> 16; 7 -> 8
    # shuffle_ratio 0.5: record 0's positive is reshuffled (u=0.1): its tokenised length counts, not the table's 20.
    s = settings(shuffle_ratio=0.5, passage_max_len=128, passage_buckets=(8, 16, 32, 64, 128))
    chunks = [long_pos[:47], long_pos[47:94], long_pos[94:]]
    assert len(tokenizer(" ".join([chunks[2], chunks[0], chunks[1]]))["input_ids"]) == 86
    stage = GlobalPadLengths(s, corpus, [table], tokenizer.backend_tokenizer.to_str())
    assert stage.map(batch).pad_to == (16, 128)


def test_stages_pickle_and_fresh_copies_without_their_caches(tmp_path):
    import pickle

    from m3jax.data.pipeline import PlanStep, ReadTexts
    plan = PlanStep(SEED, tiny_datasets(), 1, True)
    assert "planner" in plan._cache  # built when steps_per_epoch was counted
    assert pickle.loads(pickle.dumps(plan))._cache == {} and plan.fresh()._cache == {} and "planner" in plan._cache
    read = ReadTexts(settings(), corpus_of(tmp_path, records("d0", 2)))
    assert read.fresh().corpus is read.corpus  # inputs shared, read-only

# ---- determinism, resume, multi-host -------------------------------------------------------------------------------

@pytest.fixture
def two_datasets(tmp_path):
    write(tmp_path / "d" / "a.jsonl", records("d0", 14, n_pos=3, long_every=5, scores=True))
    write(tmp_path / "d" / "b.jsonl", records("d1", 10, long_every=3))
    write(tmp_path / "e_no_in_batch_neg" / "c.jsonl", records("d2", 8, n_neg=2, long_every=2))
    return f"{tmp_path}/d,{tmp_path}/e_no_in_batch_neg"


def test_same_seed_same_batches_other_seed_other_batches(two_datasets, tokenizer):
    cfg = config(two_datasets, knowledge_distillation=True, shuffle_ratio=0.3, train_group_size=5)
    a = build(cfg, tokenizer, num_batch_shards=2)
    b = build(cfg, tokenizer, num_batch_shards=2)
    for x, y in zip(epoch_batches(a, 1), epoch_batches(b, 1)):
        assert_batches_equal(x, y)
    cfg.seed = SEED + 1
    c = build(cfg, tokenizer, num_batch_shards=2)
    assert any(not np.array_equal(x["passage_input_ids"], y["passage_input_ids"])
               if x["passage_input_ids"].shape == y["passage_input_ids"].shape else True
               for x, y in zip(epoch_batches(a), epoch_batches(c)))


def test_iterator_resumes_mid_epoch_with_the_same_batches(two_datasets, tokenizer):
    data = build(config(two_datasets, knowledge_distillation=True), tokenizer, num_batch_shards=2)
    spe = data.steps_per_epoch
    it = data.iterator()
    full = [next(it) for _ in range(2 * spe + 2)]
    it.close()
    for i, b in enumerate(full):
        assert_batches_equal(b, data.batch(i))
        assert b["epoch"] == i // spe
    it = data.iterator()
    for _ in range(spe - 2):
        next(it)
    state = it.get_state()
    assert state == {"step": spe - 2, "steps_per_epoch": spe, "seed": SEED}
    after = [next(it) for _ in range(5)]
    it.close()
    resumed = data.iterator()  # a fresh pipeline, as after a restart
    resumed.set_state(json.loads(json.dumps(state)))
    again = [next(resumed) for _ in range(5)]
    resumed.close()
    for x, y, z in zip(after, again, full[spe - 2:]):
        assert_batches_equal(x, y)
        assert_batches_equal(x, z)
    assert data.iterator(start_step=spe + 1).__next__()["epoch"] == 1


def test_iterator_state_through_grain_checkpoint_handler_with_worker_processes(two_datasets, tokenizer, tmp_path):
    """The orbax path the train loop uses (grain.checkpoint), with 2 grain worker processes."""
    import grain
    from etils import epath
    data = build(config(two_datasets, num_data_workers=2, data_prefetch=1), tokenizer,
                 num_batch_shards=2)
    it = data.iterator()
    for _ in range(3):
        next(it)
    ckpt = epath.Path(tmp_path / "ckpt")
    ckpt.mkdir()
    grain.checkpoint.CheckpointHandler().save(ckpt, args=grain.checkpoint.CheckpointSave(it))
    expected = [next(it) for _ in range(4)]
    it.close()
    restored = grain.checkpoint.CheckpointHandler().restore(
        ckpt, args=grain.checkpoint.CheckpointRestore(data.iterator()))
    got = [next(restored) for _ in range(4)]
    restored.close()
    for x, y, i in zip(expected, got, range(3, 7)):
        assert_batches_equal(x, y)
        assert_batches_equal(x, data.batch(i))


def test_state_from_other_data_is_refused(two_datasets, tokenizer):
    data = build(config(two_datasets), tokenizer, num_batch_shards=2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        data.iterator().set_state({"step": 3, "steps_per_epoch": data.steps_per_epoch + 1, "seed": SEED})


def test_two_processes_slices_union_is_the_one_process_global_batch(two_datasets, tokenizer, tmp_path):
    cfg = config(two_datasets, knowledge_distillation=True, shuffle_ratio=0.5, train_group_size=5,
                 passage_max_len=128)
    one = build(cfg, tokenizer, num_batch_shards=4)
    cfg.num_data_workers = 2  # the token-length table is computed in 2 worker processes
    procs = [build(cfg, tokenizer, num_batch_shards=4, process_index=p, process_count=2)
             for p in range(2)]
    cache = os.listdir(tmp_path / "cache" / "token_lengths")
    assert len(cache) == 3  # one token-length table per file, reused by the second process
    assert procs[0].steps_per_epoch == procs[1].steps_per_epoch == one.steps_per_epoch
    assert procs[0].shapes() == one.shapes()
    raw_pos = {tokenizer.decode(tokenizer(p)["input_ids"], skip_special_tokens=True)
               for d in (records("d0", 14, n_pos=3, long_every=5), records("d1", 10, long_every=3),
                         records("d2", 8, n_neg=2, long_every=2)) for r in d for p in r["pos"]}
    shuffled = 0
    for step in range(one.steps_per_epoch * 2):
        glob = one.batch(step)
        parts = [p.batch(step) for p in procs]
        for k, v in glob.items():
            if np.ndim(v) == 0:
                assert parts[0][k] == parts[1][k] == v, k
            else:
                np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), v, err_msg=k)
        shuffled += sum(group[0] not in raw_pos for group in texts(tokenizer, glob)[1])
    assert shuffled > 0  # reshuffled positives (lengths not in the table) were part of the check


def test_num_batch_shards_must_split_evenly_over_processes(two_datasets, tokenizer):
    with pytest.raises(ValueError, match="multiple of process_count"):
        build(config(two_datasets), tokenizer, num_batch_shards=3, process_index=0, process_count=2)


# ---- bad input -------------------------------------------------------------------------------------------------------

GOOD = json.dumps({"query": "q", "pos": ["p"], "neg": ["n1", "n2"]})


@pytest.mark.parametrize("line, kd, message", [
    ('{"query": "q", "pos": ["p"], "neg": ["n"]', False, r":2: invalid JSON \(.*\); expected one JSON object per line"),
    ('["q", "p"]', False, r":2: a JSON list; expected a JSON object with 'query', 'pos' and 'neg'"),
    ('{"pos": ["p"], "neg": ["n"]}', False, r":2: missing 'query'; expected a string"),
    ('{"query": "q", "neg": ["n"]}', False, r":2: missing 'pos'; expected a non-empty list of strings"),
    ('{"query": "q", "pos": [], "neg": ["n"]}', False,
     r":2: 'pos' is empty; expected at least one positive passage"),
    ('{"query": 5, "pos": ["p"], "neg": ["n"]}', False, r":2: 'query' is int; expected a string"),
    ('{"query": "q", "pos": ["p", null], "neg": ["n"]}', False, r":2: 'pos'\[1\] is null; expected a string"),
    ('{"query": "q", "pos": "p", "neg": ["n"]}', False, r":2: 'pos' is str; expected a list of strings"),
    ('{"query": "q", "pos": ["p"], "neg": [1]}', False, r":2: 'neg'\[0\] is int; expected a string"),
    ('{"query": "q", "pos": ["p"]}', False,
     r":2: missing 'neg'; expected a non-empty list of strings \(group size 4 needs 3 negatives per query\)"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1, 2], "neg_scores": [0]}', True,
     r":2: 'pos_scores' has 2 entries but 'pos' has 1; expected one teacher score per passage"),
    ('{"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [0]}', True,
     r":2: 'neg_scores' has 1 entries but 'neg' has 2; expected one teacher score per passage"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": ["x"]}', True,
     r":2: 'neg_scores'\[0\] is 'x'; expected a finite number"),
])
def test_bad_example_message_names_file_line_and_expectation(tmp_path, tokenizer, line, kd, message):
    first = json.dumps({"query": "q", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [1], "neg_scores": [0, 1]}) \
        if kd else GOOD
    path = write(tmp_path / "d" / "a.jsonl", [first, line, GOOD])
    with pytest.raises(DataError, match=re.escape(path) + message):
        build(config(tmp_path / "d", knowledge_distillation=kd), tokenizer, num_batch_shards=1)


def test_skip_bad_examples_logs_and_counts(tmp_path, tokenizer, caplog):
    path = write(tmp_path / "d" / "a.jsonl", [GOOD, "{oops", '{"query": "q", "pos": []}', GOOD, GOOD, GOOD])
    with caplog.at_level(logging.WARNING):
        data = build(config(tmp_path / "d", skip_bad_examples=True), tokenizer, num_batch_shards=1)
    assert data.bad_example_counts == {path: 2}
    assert f"{path}:2: invalid JSON" in caplog.text and f"{path}:3: 'pos' is empty" in caplog.text
    assert f"{path}: skipped 2 bad example(s)" in caplog.text
    assert data.datasets[0][1] == 4


def test_json_array_files_and_their_errors(tmp_path, tokenizer):
    recs = records("d0", 4)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(recs, indent=1))
    data = build(config(tmp_path / "d"), tokenizer, num_batch_shards=1)
    assert sorted(q for b in epoch_batches(data) for q in texts(tokenizer, b)[0]) == [r["query"] for r in recs]
    (tmp_path / "d" / "a.json").write_text(json.dumps(recs[:1] + [{"query": "q", "pos": []}]))
    with pytest.raises(DataError, match=r"a\.json:element 2: 'pos' is empty"):
        build(config(tmp_path / "d"), tokenizer, num_batch_shards=1)
    (tmp_path / "d" / "a.json").write_text('[{"query": "q",\n "pos": ["p"]')
    with pytest.raises(DataError, match=r"a\.json:2: invalid JSON"):
        build(config(tmp_path / "d"), tokenizer, num_batch_shards=1)


def test_parallel_scan_matches_and_reports_errors(tmp_path):
    from m3jax.data.files import ScanRules, scan_files
    paths = [write(tmp_path / "d" / f"{k}.json", records(f"d{k}", 5 + k)) for k in range(3)]  # .json as JSON lines
    rules = ScanRules(4, False, True, False)
    seq = scan_files(paths, rules, num_workers=0)
    par = scan_files(paths, rules, num_workers=2, parallel_min_bytes=0)
    assert [len(f) for f in par] == [5, 6, 7]
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a.offsets, b.offsets)
        assert a.record(4) == b.record(4) == records(a.record(0)["query"].split()[0], 5)[4]
    write(tmp_path / "d" / "1.json", [GOOD, '{"query": "q", "pos": ["p"], "neg": []}'])
    with pytest.raises(DataError, match=r"1\.json:2: 'neg' is empty; expected at least one negative passage"):
        scan_files(paths, rules, num_workers=2, parallel_min_bytes=0)


def test_bad_paths(tmp_path, tokenizer):
    path = write(tmp_path / "d" / "a.txt", [GOOD] * 4)
    with pytest.raises(DataError, match=re.escape(path) + r"' is a file but not \.json/\.jsonl; expected a directory"):
        build(config(path), tokenizer, num_batch_shards=1)
    with pytest.raises(DataError, match=r"missing' does not exist; expected a directory of \.json/\.jsonl files"):
        build(config(tmp_path / "missing"), tokenizer, num_batch_shards=1)
    with pytest.raises(DataError, match=r"train_data is empty; expected one or more directories"):
        build(config(""), tokenizer, num_batch_shards=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty' has no \.json/\.jsonl files"):
        build(config(tmp_path / "empty"), tokenizer, num_batch_shards=1)


def test_empty_dataset_after_filtering(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", ["{bad", ""])
    with pytest.raises(DataError, match=r"no training examples in .*a\.jsonl \(no valid examples\)"):
        build(config(tmp_path / "d", skip_bad_examples=True), tokenizer, num_batch_shards=1)
    write(tmp_path / "d" / "a.jsonl", [GOOD] * 3)
    with pytest.raises(DataError, match=r"no training examples .*3 examples \(< drop_threshold 5\)"):
        build(config(tmp_path / "d", small_threshold=5, drop_threshold=5), tokenizer, num_batch_shards=1)
    with pytest.raises(DataError, match=r"no complete batch"):
        build(config(tmp_path / "d", per_device_train_batch_size=4), tokenizer, num_batch_shards=2)


def test_inconsistent_per_dataset_columns(tmp_path, tokenizer):
    write(tmp_path / "d" / "a.jsonl", [dict(json.loads(GOOD), type="only_1neg"), GOOD])
    with pytest.raises(DataError, match=r"a\.jsonl:2: 'type' is None but the file's first example has 'only_1neg'"):
        build(config(tmp_path / "d"), tokenizer, num_batch_shards=1)



# ---- scripts/split_data_by_length.py ------------------------------------------------------------------------------

def _load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "scripts",
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_data_by_length(tmp_path, tokenizer):
    split = _load_script("split_data_by_length")
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    recs = records("d0", 12, long_every=4, type="symmetric_sts")  # extra columns are kept
    src = write(tmp_path / "in" / "train.jsonl", recs)
    lines = open(src).read().splitlines()
    longest = [max(len(tokenizer(t)["input_ids"]) for t in [r["query"]] + r["pos"] + r["neg"]) for r in recs]
    cuts = sorted(set(longest))
    bounds = [0, cuts[len(cuts) // 3], cuts[2 * len(cuts) // 3]]  # three non-empty ranges
    split.main(["--input_path", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"),
                "--model_name_or_path", str(tok_dir), "--length_list", *map(str, bounds), "--num_proc", "1"])
    expected = {}
    for lo, hi in zip(bounds, bounds[1:] + [math.inf]):
        want = [line for line, n in zip(lines, longest) if lo <= n < hi]
        if want:
            expected[f"train_len-{lo}-{hi}.jsonl"] = want
    assert len(expected) == 3  # every range gets examples
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(list(expected) + [".split_log"])
    for name, want in expected.items():
        assert (out / name).read_text().splitlines() == want
    log = json.loads((out / ".split_log").read_text())
    assert log["size"] == 12 and log["split_info"] == {k[6:-6]: len(v) for k, v in expected.items()}
    # Multi-process: the same split; existing outputs are skipped unless overwrite.
    first = out / f"train_len-0-{bounds[1]}.jsonl"
    first.write_text("old\n")
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    ranges = split.length_ranges(bounds)
    split.split_file(src, str(out / "train"), ranges, tokenizer_json, num_proc=2, overwrite=False, chunk=5)
    assert first.read_text() == "old\n"
    split.split_file(src, str(out / "train"), ranges, tokenizer_json, num_proc=2, overwrite=True, chunk=5)
    for name, want in expected.items():
        assert (out / name).read_text().splitlines() == want
    # The split files train with their length tags' batch sizes (halved: the data is symmetric_sts).
    lo_mid, mid_hi = f"0-{bounds[1]}", f"{bounds[1]}-{bounds[2]}"
    data = build(config(out, batch_size_by_length={lo_mid: 6, mid_hi: 4}), tokenizer,
                 num_batch_shards=1)
    assert {os.path.basename(d[0]): d[2] for d in data.datasets} == {
        f"train_len-{lo_mid}.jsonl": 3, f"train_len-{mid_hi}.jsonl": 2, f"train_len-{bounds[2]}-inf.jsonl": 1}


# ---- issue 27: long texts cut before tokenisation, the same tokens ------------------------------------------------

_PIECES = ["ab", "xyz", "Qq", "7", " ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\u3000", "\u00a0", "\u0301",
           "\u200d", "\u200c", "\u200b", "\u00e9", "e\u0301", "\u4e2d\u6587", "\ufb01", "<mask>", "<s>", " <mask> ",
           "\u0e33", "\u0e01", "\u0d4e", "\u0600", "\U0001F642", "\U0001F3FB", "\u03a9", "\u0661", ".", ",", "-",
           "\u00a8", "\uff9e", "\x00", "\u1100\u1161", "\U000111C2", "\u2474", "\ufe70", "word", "words", "dog"]


def _random_texts(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(_PIECES, size=int(rng.integers(20, 300)))) for _ in range(n)]


def test_cut_before_tokenisation_gives_the_tokens_of_the_whole_text(tokenizer):
    from m3jax.data.files import cut_is_exact, cut_point, encode_truncated, make_backend_tokenizer

    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    assert cut_is_exact(tokenizer_json)
    prose = " ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(60))
    texts = _random_texts(300, 0) + [prose, prose.replace(" ", "  "), prose.replace(" ", "\u3000"),
                                     "\u4e2d\u6587" * 500, " " * 1000 + prose, prose + " " * 1000,
                                     "x " * 1000, "\u0301 " * 1000, "ab \u0301" * 500, "<mask> " * 500]
    cut_total = 0
    for max_len in (4, 16, 64):
        tok = make_backend_tokenizer(tokenizer_json, max_len)
        whole = tok.encode_batch(texts)
        for cut_chars in (2 * max_len, 16 * max_len):  # far below the default bound: many cuts
            ours = encode_truncated(tok, texts, max_len, cut_chars)
            for text, a, b in zip(texts, ours, whole):
                assert a.ids == b.ids and a.attention_mask == b.attention_mask, (max_len, cut_chars, text[:80])
            cut_total += sum(cut_point(t, cut_chars) is not None for t in texts)
    assert cut_total > 500  # the cut really was taken (and checked) often
    assert cut_point("\u4e2d\u6587" * 3000, 64) is None and cut_point("short", 64) is None
    assert cut_point("ab " * 100, 64) == 62


def test_the_cut_is_only_for_tokenizer_pipelines_it_is_proven_for(tokenizer):
    from m3jax.data.files import cut_is_exact

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for change in (lambda s: s.update(pre_tokenizer={"type": "ByteLevel"}),
                   lambda s: s["normalizer"]["normalizers"].append({"type": "Lowercase"}),
                   lambda s: s["model"].update(type="BPE"),
                   lambda s: s["added_tokens"].append({"content": "a b", "id": 9999}),
                   lambda s: s["pre_tokenizer"].update(split=False)):
        changed = json.loads(json.dumps(spec))
        change(changed)
        assert not cut_is_exact(json.dumps(changed))


def test_long_texts_are_cut_counted_and_give_the_same_batches(tmp_path, tokenizer, caplog, monkeypatch):
    from m3jax.data import pipeline as data_pipeline

    recs = records("d0", 8)
    recs[3]["pos"] = ["long passage " + "lorem ipsum dolor sit amet " * 8000] * 2  # 200 KB each
    recs[5]["query"] = "long query " + "what is this " * 100
    write(tmp_path / "d" / "a.jsonl", recs)
    with caplog.at_level(logging.INFO, logger="m3jax"):
        data = build(config(tmp_path / "d"), tokenizer, num_batch_shards=1)
    assert ("1 queries longer than 256 characters and 2 passages longer than 512 in the training files (16 "
            "characters per token x max length): each is cut at a space before tokenisation") in caplog.text
    cut = epoch_batches(data)
    monkeypatch.setattr(data_build, "cut_is_exact", lambda tokenizer_json: False)
    monkeypatch.setattr(data_pipeline, "cut_is_exact", lambda tokenizer_json: False)
    whole = epoch_batches(build(config(tmp_path / "d"), tokenizer, num_batch_shards=1))
    for a, b in zip(cut, whole):
        assert_batches_equal(a, b)
    assert any("long passage lorem" in p for b in cut for p in sum(texts(tokenizer, b)[1], []))
