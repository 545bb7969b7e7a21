"""Realistic text-length sets, and how much of the compute goes to real tokens: padded to the ladder vs packed.

    python -m benchmarks.length_sets                     # the table of BENCHMARKS.md, "Real tokens" (JSON lines)
    python -m benchmarks.length_sets --compiled-flops    # + bge-m3 encode FLOPs of the short-text sets, compiled
    python -m benchmarks.length_sets --encode-timing     # + encode timed on the tiny model, packed vs ladder

Seeded, no downloads. Each set is a list of token counts in the bge-m3 tokenizer's layout (<s> text </s>: every
text has 2 special tokens plus its pieces), drawn from distributions shaped like the public data sets:
  msmarco-queries    MS MARCO queries: about 6 words (lognormal, a tail to 40 words), ~1.3 pieces per English word
  msmarco-passages   MS MARCO passages: about 56 words, a long tail (3% from a wider law, up to 400 words)
  multilingual       a MIRACL / Mr.TyDi-like mix of queries and passages in 12 languages, each with its own pieces
                     per word (zh / ja / th counted per character), max length 512
  mldr-docs          MLDR-shaped documents: lognormal around ~2,500 tokens, cut at 8192 (the cut leaves a spike at
                     8192, as truncating MLDR does)
For each: real tokens / computed tokens with today's unpacked batches (m3jax.model.inference.bucketed_batches: length-
sorted batches padded to the power-of-two ladder of m3jax.core.padding) and with packing (m3jax.core.packing), and the
bge-m3 forward FLOPs of both (m3jax.core.xla_stats.flops_per_token: attention over the whole row, as the XLA and splash
kernels compute it) against the FLOPs of the real tokens alone (each text's attention over itself only).

--compiled-flops compiles, on this host for abstract params, every batch shape of encoding msmarco-passages and
msmarco-queries with bge-m3 (packed and padded) and sums the matmul FLOPs of their HLO over the batches
(m3jax.core.xla_stats.hlo_stats): real tokens per GFLOP. --encode-timing encodes texts of those lengths with
BGEM3FlagModel on the tiny random checkpoint (m3jax.io.tiny_checkpoint), packed and padded: compiled FLOPs likewise
and real tokens per second, wall and process CPU time (after a warm-up encode that compiles every shape).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from m3jax.core import packing
from m3jax.core.padding import length_buckets

SPECIAL = 2  # <s> and </s>

# (language, share of the set, pieces per word or per character, unit mean for queries, unit mean for passages)
LANGUAGES = [
    ("en", 0.20, 1.3, 7, 90), ("es", 0.08, 1.45, 8, 100), ("fr", 0.08, 1.5, 8, 100), ("de", 0.08, 1.7, 7, 85),
    ("ru", 0.08, 1.9, 7, 75), ("ar", 0.08, 2.0, 6, 70), ("hi", 0.06, 2.3, 8, 80), ("fi", 0.06, 2.4, 5, 60),
    ("zh", 0.08, 0.75, 12, 180), ("ja", 0.08, 0.8, 18, 200), ("th", 0.06, 0.6, 20, 250), ("sw", 0.06, 2.1, 7, 60),
]


def _pieces(rng: np.random.Generator, units: np.ndarray, per_unit: float) -> np.ndarray:
    """Sentencepiece pieces of texts of `units` words (or characters): a per-text rate around per_unit."""
    rate = per_unit * rng.lognormal(0.0, 0.12, len(units))
    return np.maximum(1, np.rint(units * rate)).astype(np.int64)


def msmarco_queries(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    words = np.clip(np.rint(rng.lognormal(np.log(5.6), 0.42, n)), 1, 40)
    return _pieces(rng, words, 1.3) + SPECIAL


def msmarco_passages(n: int, seed: int = 0, max_length: int = 512) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    words = rng.lognormal(np.log(52), 0.38, n)
    tail = rng.random(n) < 0.03
    words[tail] = rng.lognormal(np.log(140), 0.5, int(tail.sum()))
    words = np.clip(np.rint(words), 3, 400)
    return np.minimum(_pieces(rng, words, 1.3) + SPECIAL, max_length)


def multilingual(n: int, seed: int = 0, max_length: int = 512) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    shares = np.array([s for _, s, *_ in LANGUAGES])
    lang = rng.choice(len(LANGUAGES), n, p=shares / shares.sum())
    query = rng.random(n) < 0.3
    out = np.zeros(n, np.int64)
    for k, (_, _, per_unit, q_mean, p_mean) in enumerate(LANGUAGES):
        for is_query, mean, sigma in ((True, q_mean, 0.45), (False, p_mean, 0.6)):
            sel = (lang == k) & (query == is_query)
            units = np.maximum(1, np.rint(rng.lognormal(np.log(mean), sigma, int(sel.sum()))))
            out[sel] = _pieces(rng, units, per_unit) + SPECIAL
    return np.minimum(out, max_length)


def mldr_docs(n: int, seed: int = 0, max_length: int = 8192) -> np.ndarray:
    rng = np.random.default_rng([seed, 4])
    tokens = np.rint(rng.lognormal(np.log(2600), 0.75, n)).astype(np.int64)
    return np.clip(tokens, 64, max_length)


def sets(seed: int = 0) -> dict[str, tuple[np.ndarray, int, int]]:
    """name -> (token lengths, max length, batch size)."""
    return {
        "msmarco-queries": (msmarco_queries(20000, seed), 512, 256),
        "msmarco-passages": (msmarco_passages(100000, seed), 512, 256),
        "multilingual": (multilingual(50000, seed), 512, 256),
        "mldr-docs": (mldr_docs(4000, seed), 8192, 16),
    }


def bge_m3_config():
    from m3jax.model.encoder import ModelConfig

    return ModelConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, max_position_embeddings=8194)


def report(name: str, lengths: np.ndarray, max_length: int, batch_size: int, row_length: int) -> dict:
    from m3jax.core.xla_stats import flops_per_token

    cfg = bge_m3_config()
    ladder = length_buckets(max_length)
    real = int(lengths.sum())
    ladder_tokens = packing.ladder_computed_tokens(lengths, batch_size, ladder)
    plan = packing.plan_batches(lengths, batch_size, ladder, 1, row_length)
    packed_tokens = sum(n * length for n, length, _, _ in plan)
    # FLOPs: the real tokens' own (attention over their text), the ladder's and the packed rows' (whole rows)
    real_flops = float(sum(int(n) * flops_per_token(cfg, int(n)) for n in lengths))
    srt = np.sort(lengths)[::-1]
    from m3jax.core.padding import pad_length
    ladder_flops = 0.0
    batch_ladder = [b for b in (2 ** k for k in range(20)) if b < batch_size] + [batch_size]
    for start in range(0, len(srt), batch_size):
        chunk = srt[start:start + batch_size]
        length = pad_length(int(chunk[0]), ladder)
        ladder_flops += pad_length(len(chunk), batch_ladder) * length * flops_per_token(cfg, length)
    packed_flops = float(sum(n * length * flops_per_token(cfg, length) for n, length, _, _ in plan))
    return dict(set=name, texts=len(lengths), mean_tokens=round(float(lengths.mean()), 1),
                median_tokens=int(np.median(lengths)), max_tokens=int(lengths.max()), max_length=max_length,
                batch_size=batch_size, base_row_length=packing.base_row_length(lengths, ladder, row_length),
                ladder_real_share=round(real / ladder_tokens, 4), packed_real_share=round(real / packed_tokens, 4),
                ladder_flops_share=round(real_flops / ladder_flops, 4),
                packed_flops_share=round(real_flops / packed_flops, 4),
                packed_shapes=len({(n, length, s) for n, length, s, _ in plan}),
                ladder_shapes=len({(min(batch_size, len(srt) - s), pad_length(int(srt[s]), ladder))
                                   for s in range(0, len(srt), batch_size)}))


def _words_for(tokenizer, lengths: np.ndarray, seed: int) -> list[str]:
    """Texts whose tiny-tokenizer token counts are close to `lengths` (words of the tokenizer's own vocabulary)."""
    rng = np.random.default_rng(seed)
    vocab = ["the", "water", "of", "rivers", "flows", "to", "sea", "while", "mountains", "stand", "in", "quiet",
             "morning", "light", "and", "people", "walk", "along", "old", "roads", "between", "villages", "towns"]
    per_word = np.mean([len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in vocab])
    return [" ".join(rng.choice(vocab, max(1, int(round((n - SPECIAL) / per_word))))) for n in lengths]


def encode_timing(n_passages: int, n_queries: int, seed: int, repeat: int) -> list[dict]:
    """BGEM3FlagModel.encode on the tiny random checkpoint, packed and padded, timed (wall and process CPU time:
    this host's cores are shared, the CPU seconds are what the encode itself used)."""
    import jax

    from m3jax import BGEM3FlagModel
    from m3jax.io.tiny_checkpoint import make_tiny_checkpoint

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(os.path.join(tmp, "ckpt"))
        jobs = {"msmarco-passages": msmarco_passages(n_passages, seed),
                "msmarco-queries": msmarco_queries(n_queries, seed)}
        for job, lengths in jobs.items():
            for packed in (False, True):
                model = BGEM3FlagModel(ckpt, use_fp16=False, devices="cpu", batch_size=256, packing=packed)
                texts = _words_for(model.tokenizer, lengths, seed)
                token_ids = model.tokenizer(texts, truncation=True, max_length=512)["input_ids"]
                real = sum(len(t) for t in token_ids)
                flops, shapes = compiled_encode_flops(model.cfg, [len(t) for t in token_ids], 512, 256, packed)
                kw = dict(max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True)
                model.encode(texts, **kw)  # compiles every shape
                wall, cpu = [], []
                for _ in range(repeat):
                    t0, c0 = time.perf_counter(), time.process_time()
                    model.encode(texts, **kw)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                out.append(dict(job=job, packing=packed, model="tiny", texts=len(texts), real_tokens=real,
                                compiled_shapes=shapes, compiled_matmul_gflops=round(flops / 1e9, 3),
                                real_tokens_per_gflop=round(real / (flops / 1e9), 1),
                                wall_s=round(min(wall), 3), cpu_s=round(min(cpu), 3),
                                real_tokens_per_wall_s=round(real / min(wall)),
                                real_tokens_per_cpu_s=round(real / min(cpu)), backend=jax.default_backend(),
                                machine=platform.processor() or platform.machine(), cpus=os.cpu_count()))
    return out


def compiled_encode_flops(cfg, lengths, max_length: int, batch_size: int, packed: bool) -> tuple[float, int]:
    """Matmul FLOPs of every batch an encode of texts of these token counts runs (one device), packed or padded to
    the ladder: each distinct batch shape compiled on this host for abstract params (nothing allocated) and its
    HLO counted (m3jax.core.xla_stats.hlo_stats, the scanned layers weighted by their trip count)."""
    import jax
    import jax.numpy as jnp

    from m3jax.core.xla_stats import hlo_stats
    from m3jax.model import encoder as m3model

    ladder = length_buckets(max_length)
    model = m3model.BGEM3(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    if packed:
        shapes = [(i32(n, length), i32(n, length), i32(n, length), i32(n, slots))
                  for n, length, slots, _ in packing.plan_batches(lengths, batch_size, ladder, 1)]
        fn = jax.jit(lambda p, a, b, c, d: model.apply({"params": p}, a, b, c, d, method=m3model.BGEM3.packed))
    else:
        from m3jax.core.padding import pad_length

        srt = sorted(lengths, reverse=True)
        batch_ladder = [b for b in (2 ** k for k in range(20)) if b < batch_size] + [batch_size]
        shapes = []
        for start in range(0, len(srt), batch_size):
            chunk = srt[start:start + batch_size]
            n, length = pad_length(len(chunk), batch_ladder), pad_length(chunk[0], ladder)
            shapes.append((i32(n, length), i32(n, length)))
        fn = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))
    per_shape: dict[tuple, float] = {}
    total = 0.0
    for args in shapes:
        key = tuple(a.shape for a in args)
        if key not in per_shape:
            per_shape[key] = float(hlo_stats(fn.lower(params, *args).compile().as_text())["matmul_flops"])
        total += per_shape[key]
    return total, len(per_shape)


def compiled_flops_report(seed: int) -> list[dict]:
    """Real tokens per compiled matmul FLOP of encoding the short-text sets with bge-m3, packed vs the ladder."""
    out = []
    for name in ("msmarco-passages", "msmarco-queries"):
        lengths, max_length, batch_size = sets(seed)[name]
        lengths = [int(n) for n in lengths]
        real = sum(lengths)
        rec = dict(set=name, model="bge-m3 (24 x 1024)", texts=len(lengths), real_tokens=real)
        for packed in (False, True):
            flops, shapes = compiled_encode_flops(bge_m3_config(), lengths, max_length, batch_size, packed)
            key = "packed" if packed else "ladder"
            rec[f"{key}_compiled_shapes"] = shapes
            rec[f"{key}_matmul_pflops"] = round(flops / 1e15, 4)
            rec[f"{key}_real_tokens_per_gflop"] = round(real / (flops / 1e9), 3)
        rec["packed_over_ladder"] = round(rec["packed_real_tokens_per_gflop"] / rec["ladder_real_tokens_per_gflop"], 3)
        out.append(rec)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-length", type=int, default=packing.ROW_LENGTH)
    p.add_argument("--compiled-flops", action="store_true",
                   help="compile the bge-m3 encode of the short-text sets here (CPU) and count its FLOPs")
    p.add_argument("--encode-timing", action="store_true")
    p.add_argument("--passages", type=int, default=2000, help="texts of the timed passage encode")
    p.add_argument("--queries", type=int, default=2000, help="texts of the timed query encode")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    for name, (lengths, max_length, batch_size) in sets(a.seed).items():
        print(json.dumps(report(name, lengths, max_length, batch_size, a.row_length)), flush=True)
    if a.compiled_flops:
        for rec in compiled_flops_report(a.seed):
            print(json.dumps(rec), flush=True)
    if a.encode_timing:
        for rec in encode_timing(a.passages, a.queries, a.seed, a.repeat):
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
