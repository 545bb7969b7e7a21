"""Throughput of the training data pipeline (m3jax.data.build) on this machine: tokenised tokens per second.

    python -m benchmarks.data_pipeline                    # synthetic data, 2 grain workers, prints one JSON line
    python -m benchmarks.data_pipeline --tokenizer DIR --train_data DIR --num_workers 4

Without --train_data it writes a synthetic corpus of realistic lengths (queries of 8-24 words, passages of 60-300
words, 1-2 positives and 15 negatives per example) to a temporary directory. Without --tokenizer it trains an
XLM-R-style SentencePiece unigram tokenizer (<s>=0 <pad>=1 </s>=2 <unk>=3, --vocab_size pieces) on that corpus; pass
a real one (e.g. a bge-m3 checkpoint directory) when it is at hand. It then runs the real pipeline (validation,
sampling, tokenisation and padding in grain worker processes) through `build_train_data(...).iterator()` and reports,
after --warmup batches: batches/s, queries/s, non-pad tokens/s (attention-mask ones) and padded tokens/s (the size
of the int32 id tensors the step consumes), plus the CPU time of this process (with --num_workers 0, the whole
pipeline's CPU cost, which other jobs on a shared machine do not disturb) and the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time


def _words(rng: random.Random, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(n)]


def write_corpus(directory: str, num_examples: int, seed: int = 0) -> int:
    """A Zipf-ish synthetic corpus; returns the number of characters written."""
    rng = random.Random(seed)
    vocab = _words(rng, 20000)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]

    def text(lo, hi):
        return " ".join(rng.choices(vocab, weights, k=rng.randint(lo, hi))).capitalize() + "."

    passages = [text(60, 300) for _ in range(4000)]  # a shared pool keeps generation fast
    os.makedirs(directory, exist_ok=True)
    chars = 0
    with open(os.path.join(directory, "synthetic.jsonl"), "w") as f:
        for _ in range(num_examples):
            rec = {"query": text(8, 24), "pos": rng.sample(passages, rng.randint(1, 2)),
                   "neg": rng.sample(passages, 15)}
            line = json.dumps(rec)
            chars += len(line)
            f.write(line + "\n")
    return chars


def train_tokenizer(corpus_dir: str, vocab_size: int):
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaTokenizerFast

    def lines():
        with open(os.path.join(corpus_dir, "synthetic.jsonl")) as f:
            for k, line in enumerate(f):
                if k >= 300:
                    break
                rec = json.loads(line)
                yield rec["query"]
                yield from rec["pos"]
                yield from rec["neg"][:3]

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(lines(), vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                           unk_token="<unk>", show_progress=False)
    sp.post_processor = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                   mask_token="<unk>")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train_data", default="", help="directory of .jsonl data (default: synthetic)")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: train a synthetic unigram one)")
    p.add_argument("--num_examples", type=int, default=2000)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=48, help="per device (research recipe, len 0-500, G=8)")
    p.add_argument("--num_batch_shards", type=int, default=1)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)

    from m3jax.config import data_settings, default_config
    from m3jax.data.build import build_train_data

    tmp = tempfile.TemporaryDirectory()
    data_dir = a.train_data or os.path.join(tmp.name, "data")
    if not a.train_data:
        write_corpus(data_dir, a.num_examples)
    if a.tokenizer:
        from transformers import AutoTokenizer
        tokenizer, tok_name = AutoTokenizer.from_pretrained(a.tokenizer), a.tokenizer
    else:
        tokenizer = train_tokenizer(data_dir, a.vocab_size)
        tok_name = f"synthetic SentencePiece unigram, {len(tokenizer)} pieces"

    c = default_config()
    c.unlock()
    c.train_data, c.output_dir = data_dir, tmp.name
    c.train_group_size, c.query_max_len, c.passage_max_len = a.group_size, a.query_max_len, a.passage_max_len
    c.per_device_train_batch_size = a.batch_size
    c.num_data_workers, c.data_prefetch = a.num_workers, a.prefetch
    t0 = time.perf_counter()
    data = build_train_data(data_settings(c), tokenizer, num_batch_shards=a.num_batch_shards)
    build_s = time.perf_counter() - t0
    it = data.iterator()
    for _ in range(a.warmup):  # worker start-up (process spawn, imports, tokenizer load)
        next(it)
    real = padded = queries = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        b = next(it)
        real += int(b["query_attention_mask"].sum()) + int(b["passage_attention_mask"].sum())
        padded += b["query_input_ids"].size + b["passage_input_ids"].size
        queries += len(b["query_input_ids"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    it.close()
    print(json.dumps({
        "tokens_per_s": round(real / dt), "padded_tokens_per_s": round(padded / dt),
        "batches_per_s": round(a.steps / dt, 3), "queries_per_s": round(queries / dt, 1),
        "steps": a.steps, "seconds": round(dt, 2), "build_s": round(build_s, 2),
        # CPU seconds of this process (all its threads); with --num_workers 0 that is the whole pipeline's cost,
        # so tokens_per_main_cpu_s is a figure other jobs on the machine do not disturb.
        "main_cpu_s": round(cpu, 2), "tokens_per_main_cpu_s": round(real / cpu),
        "load_avg_1m": os.getloadavg()[0],
        "global_batch": a.batch_size * a.num_batch_shards, "group_size": a.group_size,
        "query_max_len": a.query_max_len, "passage_max_len": a.passage_max_len, "num_workers": a.num_workers,
        "tokenizer": tok_name, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
