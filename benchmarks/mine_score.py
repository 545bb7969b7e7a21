"""Throughput of `m3jax mine` and `m3jax score` on this machine: texts per second.

    python -m benchmarks.mine_score                       # tiny random models, synthetic data, prints JSON lines
    python -m benchmarks.mine_score --model /models/bge-m3 --reranker /models/bge-reranker-v2-m3 \\
        --queries 100000 --pool 1000000 --mode dense --batch-size 256

Synthetic data of realistic lengths (queries of 8-24 words, passages of 60-300 words from a Zipf-ish vocabulary):
--queries records with one positive each and a --pool of passages. Without --model / --reranker it writes the tiny
random bge-m3 and reranker of m3jax.io.tiny_checkpoint (hidden 32, 2 layers) to a temporary directory. It then runs the
library calls the commands run (m3jax.tools.mine.mine with the pool file, m3jax.tools.teacher_scores.score_file with a
reranker teacher on the mined file), --repeat times each (the first run includes compilation), and prints per run:
seconds, texts/s (mine: queries + pool passages, each encoded once; score: (query, passage) pairs, each one
forward pass of the cross-encoder) and the settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time


def _text(rng: random.Random, vocab: list[str], weights: list[float], lo: int, hi: int) -> str:
    return " ".join(rng.choices(vocab, weights, k=rng.randint(lo, hi))).capitalize() + "."


def write_data(directory: str, n_queries: int, n_pool: int, seed: int = 0) -> tuple[str, str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(20000)]
    weights = [1.0 / (r + 1) for r in range(len(vocab))]
    pool = [_text(rng, vocab, weights, 60, 300) for _ in range(n_pool)]
    input_path, pool_path = os.path.join(directory, "pairs.jsonl"), os.path.join(directory, "pool.jsonl")
    with open(pool_path, "w") as f:
        for t in pool:
            f.write(json.dumps({"text": t}) + "\n")
    with open(input_path, "w") as f:
        for _ in range(n_queries):
            f.write(json.dumps({"query": _text(rng, vocab, weights, 8, 24), "pos": [rng.choice(pool)]}) + "\n")
    return input_path, pool_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="bge-m3 directory (default: the tiny random one)")
    p.add_argument("--reranker", default=None, help="reranker directory (default: the tiny random one)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--pool", type=int, default=10000)
    p.add_argument("--mode", default="dense")
    p.add_argument("--negative-number", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--query-max-len", type=int, default=64)
    p.add_argument("--passage-max-len", type=int, default=256)
    p.add_argument("--devices", default=None, help="e.g. cpu (default: all local devices)")
    p.add_argument("--fp32", action="store_true", help="float32 on accelerators (default bfloat16)")
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)

    import jax

    from m3jax.io.tiny_checkpoint import make_tiny_checkpoint, make_tiny_reranker
    from m3jax.model.inference import BGEM3FlagModel, FlagReranker
    from m3jax.tools.mine import MineOptions, mine
    from m3jax.tools.teacher_scores import RerankerTeacher, score_file

    with tempfile.TemporaryDirectory(prefix="m3jax-bench-") as tmp:
        model_dir = a.model or make_tiny_checkpoint(os.path.join(tmp, "tiny_bge_m3"))
        reranker_dir = a.reranker or make_tiny_reranker(os.path.join(tmp, "tiny_reranker"))
        input_path, pool_path = write_data(tmp, a.queries, a.pool)
        model = BGEM3FlagModel(model_dir, use_fp16=not a.fp32, devices=a.devices, batch_size=a.batch_size,
                               query_max_length=a.query_max_len, passage_max_length=a.passage_max_len)
        reranker = FlagReranker(reranker_dir, use_fp16=not a.fp32, devices=a.devices)
        teacher = RerankerTeacher(reranker, batch_size=a.batch_size, max_len=a.passage_max_len)
        options = MineOptions(mode=a.mode, range_for_sampling=(10, 210), negative_number=a.negative_number,
                              batch_size=a.batch_size, query_max_len=a.query_max_len,
                              passage_max_len=a.passage_max_len)
        info = {"model": a.model or "tiny", "reranker": a.reranker or "tiny", "queries": a.queries, "pool": a.pool,
                "mode": a.mode, "batch_size": a.batch_size, "query_max_len": a.query_max_len,
                "passage_max_len": a.passage_max_len, "devices": [str(d) for d in model.devices],
                "machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__}
        mined = os.path.join(tmp, "mined.jsonl")
        for run in range(a.repeat):
            t0 = time.perf_counter()
            report = mine(model, input_path, mined, options, pool_path=pool_path, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            print(json.dumps({"bench": "mine", "run": run, "seconds": round(seconds, 2),
                              "texts_per_s": round((a.queries + report["pool"]) / seconds, 1),
                              "pool_passages": report["pool"], **info}), flush=True)
        scored = os.path.join(tmp, "scored.jsonl")
        for run in range(a.repeat):
            t0 = time.perf_counter()
            report = score_file(teacher, mined, scored, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            print(json.dumps({"bench": "score", "run": run, "seconds": round(seconds, 2),
                              "pairs_per_s": round(report["pairs_scored"] / seconds, 1),
                              "pairs": report["pairs_scored"], **info}), flush=True)


if __name__ == "__main__":
    main()
