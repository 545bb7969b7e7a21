"""Packed encoding on an accelerator: cuDNN's packed attention checked, then encode timed packed vs padded.

    python -m benchmarks.packing_device --out DIR                 # on a GPU: bge-m3 sized random model, bf16
    python -m benchmarks.packing_device --out DIR --small         # smoke run (tiny dims, CPU)

Writes JSON lines to DIR/packing_device.jsonl, as each part ends (a deadline, --budget-s, skips what would not fit):
  1. attention: m3jax.model.attention with segment ids, cudnn (packed layout) and xla, against each text alone (f32)
  2. equivalence: BGEM3FlagModel.encode packed vs padded on the tiny random checkpoint, on this backend
  3. throughput: encode of msmarco-passages-shaped texts (benchmarks.length_sets) with a random model of
     bge-m3's shape (24 layers, hidden 1024; --small: tiny), packed and padded to the ladder, bf16 on GPU: real
     tokens per second after a warm-up encode that compiles every shape
  4. reference: the same texts encoded the way FlagEmbedding's BGEM3FlagModel.encode does (length-sorted batches
     padded to each batch's longest, fp16 autocast, transformers' XLMRobertaModel with sdpa attention, the three
     heads), written here with transformers alone (FlagEmbedding is not on the machine)
The texts are words of the tiny tokenizer's vocabulary sized to the set's token counts; the model is random (speed
does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks import length_sets


def _emit(path: str, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def check_attention(small: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from m3jax.model import attention

    rng = np.random.default_rng(0)
    b, length, n, d = 4, 512, 16, 64
    if small:
        n, d = 2, 8
    sizes = [[100, 200, 150], [512], [3, 5, 7, 300], [60] * 8]
    segments = np.zeros((b, length), np.int32)
    for r, row in enumerate(sizes):
        at = 0
        for s, size in enumerate(row):
            segments[r, at:at + size] = s + 1
            at += size
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, n, d)), jnp.float32) for _ in range(3))
    out = {}
    impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    for impl in impls:
        dt = jnp.bfloat16 if impl == "cudnn" else jnp.float32
        got = attention.attention(q.astype(dt), k.astype(dt), v.astype(dt), None, implementation=impl,
                                  segment_ids=jnp.asarray(segments), max_segments=8)
        got = np.asarray(got, np.float32)
        err = 0.0
        for r, row in enumerate(sizes):
            at = 0
            for size in row:
                part = slice(at, at + size)
                ref = jax.nn.dot_product_attention(q[r:r + 1, part], k[r:r + 1, part], v[r:r + 1, part])
                err = max(err, float(np.abs(got[r:r + 1, part] - np.asarray(ref)).max()))
                at += size
        out[impl] = dict(max_abs_err=err, dtype=str(jnp.dtype(dt)), finite=bool(np.isfinite(got).all()))
    return dict(part="attention", backend=jax.default_backend(), jax=jax.__version__, **out)


def check_equivalence(ckpt: str) -> dict:
    import jax

    from m3jax import BGEM3FlagModel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_packing import TEXTS

    out = dict(part="equivalence", backend=jax.default_backend())
    for name, fp16 in (("float32", False), ("bfloat16", True)):
        kw = dict(use_fp16=fp16, batch_size=8)
        a = BGEM3FlagModel(ckpt, packing=True, **kw)
        b = BGEM3FlagModel(ckpt, packing=False, **kw)
        enc = dict(max_length=64, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        x, y = a.encode(TEXTS, **enc), b.encode(TEXTS, **enc)
        out[name] = dict(
            attention=a.cfg.attention_implementation,
            dense=float(np.abs(x["dense_vecs"] - y["dense_vecs"]).max()),
            colbert=max(float(np.abs(p - q).max()) for p, q in zip(x["colbert_vecs"], y["colbert_vecs"])),
            sparse=max(max([abs(float(p[t]) - float(q.get(t, 0))) for t in p] + [0.0])
                       for p, q in zip(x["lexical_weights"], y["lexical_weights"])),
            sparse_keys_equal=all(set(p) == set(q) for p, q in zip(x["lexical_weights"], y["lexical_weights"])))
    return out


def big_config(small: bool, tiny_vocab: int):
    from m3jax.model.encoder import ModelConfig

    if small:
        return ModelConfig(vocab_size=tiny_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=514)
    return ModelConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, max_position_embeddings=8194)


def m3jax_throughput(ckpt: str, texts: list[str], small: bool, repeat: int, deadline: float, emit) -> None:
    import jax
    import jax.numpy as jnp

    from m3jax import BGEM3FlagModel
    from m3jax.io import hf_read
    from m3jax.model import encoder as m3model

    tokenizer = hf_read.load_tokenizer(ckpt)
    cfg = big_config(small, len(tokenizer))
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(lambda key: m3model.BGEM3(cfg).init(key, ids, jnp.ones_like(ids))["params"])(jax.random.key(0))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    real = sum(len(t) for t in tokenizer(texts, truncation=True, max_length=512)["input_ids"])
    for packed in (True, False):
        if time.time() > deadline:
            emit(dict(part="m3jax", packing=packed, skipped="deadline"))
            continue
        model = BGEM3FlagModel.from_params(cfg, params, tokenizer, use_fp16=True, batch_size=256, packing=packed)
        kw = dict(max_length=512, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        t0 = time.perf_counter()
        model.encode(texts, **kw)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            if time.time() > deadline:
                break
            t0 = time.perf_counter()
            model.encode(texts, **kw)
            times.append(time.perf_counter() - t0)
        best = min(times) if times else None
        emit(dict(part="m3jax", packing=packed, texts=len(texts), real_tokens=real, dtype=model.cfg.dtype,
                  attention=model.cfg.attention_implementation, first_s=round(first, 2),
                  seconds=None if best is None else round(best, 3),
                  real_tokens_per_s=None if best is None else round(real / best), runs=len(times)))


def torch_reference(ckpt: str, texts: list[str], small: bool, repeat: int, deadline: float, emit) -> None:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3jax.io import hf_read

    tokenizer = hf_read.load_tokenizer(ckpt)
    c = big_config(small, len(tokenizer))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = XLMRobertaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                              num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                              max_position_embeddings=c.max_position_embeddings, pad_token_id=1,
                              attn_implementation="sdpa")
    dtype = torch.float16 if device == "cuda" else torch.float32
    encoder = XLMRobertaModel(config, add_pooling_layer=False).to(device, dtype).eval()
    colbert = torch.nn.Linear(c.hidden_size, c.hidden_size).to(device, dtype)
    sparse = torch.nn.Linear(c.hidden_size, 1).to(device, dtype)
    batch_size = 256

    def encode():  # FlagEmbedding's M3Embedder.encode_single_device: sort by length, pad each batch to its longest
        ids = tokenizer(texts, truncation=True, max_length=512)["input_ids"]
        order = np.argsort([-len(t) for t in ids], kind="stable")
        out = []
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                batch = [ids[i] for i in order[start:start + batch_size]]
                longest = max(len(t) for t in batch)
                x = torch.full((len(batch), longest), 1, dtype=torch.long)
                m = torch.zeros((len(batch), longest), dtype=torch.long)
                for r, t in enumerate(batch):
                    x[r, :len(t)] = torch.tensor(t)
                    m[r, :len(t)] = 1
                x, m = x.to(device), m.to(device)
                h = encoder(input_ids=x, attention_mask=m).last_hidden_state
                dense = torch.nn.functional.normalize(h[:, 0], dim=-1)
                weights = torch.relu(sparse(h))
                col = torch.nn.functional.normalize(colbert(h[:, 1:]) * m[:, 1:, None], dim=-1)
                out.append((dense.float().cpu(), weights.float().cpu(), col.float().cpu()))
        return out

    real = sum(len(t) for t in tokenizer(texts, truncation=True, max_length=512)["input_ids"])
    encode()
    times = []
    for _ in range(repeat):
        if time.time() > deadline:
            break
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        encode()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times) if times else None
    emit(dict(part="torch_reference", texts=len(texts), real_tokens=real, dtype=str(dtype), torch=torch.__version__,
              seconds=None if best is None else round(best, 3),
              real_tokens_per_s=None if best is None else round(real / best), runs=len(times)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/packing_device"))
    p.add_argument("--small", action="store_true")
    p.add_argument("--texts", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: attention,equivalence,m3jax,torch")
    a = p.parse_args(argv)
    deadline = time.time() + a.budget_s
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "packing_device.jsonl")
    emit = lambda rec: _emit(path, rec)
    skip = set(filter(None, a.skip.split(",")))
    from m3jax.io.tiny_checkpoint import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(os.path.join(tmp, "ckpt"))
        for name, fn in (("attention", lambda: check_attention(a.small)),
                         ("equivalence", lambda: check_equivalence(ckpt))):
            if name in skip:
                continue
            try:
                emit(fn())
            except Exception as e:  # noqa: BLE001 -- report and go on to the timings
                emit(dict(part=name, error=f"{type(e).__name__}: {str(e)[:2000]}"))
        from m3jax.io import hf_read

        tok = hf_read.load_tokenizer(ckpt)
        lengths = length_sets.msmarco_passages(a.texts)
        texts = length_sets._words_for(tok, lengths, 0)
        for name, fn in (("m3jax", m3jax_throughput), ("torch", torch_reference)):
            if name in skip:
                continue
            try:
                fn(ckpt, texts, a.small, a.repeat, deadline, emit)
            except Exception as e:  # noqa: BLE001
                emit(dict(part=name, error=f"{type(e).__name__}: {str(e)[:2000]}"))


if __name__ == "__main__":
    main()
