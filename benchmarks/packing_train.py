"""Real tokens per compiled FLOP of the train step, packed (config.packing) against the padded step (issue 25).

    python -m benchmarks.packing_train [--batches 16] [--layers 24]
    python -m benchmarks.packing_train --plan-timing 8,64,512

--plan-timing: the host time of planning one global batch's packed shape (packing.train_pack_shape, what every
process of a multi-host packed run does per step, GlobalPackShape) for W device blocks of the recipe's shape.

Training batches of the recipe (configs/bge_m3_unified.py: 48 queries x 8 passages per device, max lengths 64 /
256, seq_len_buckets powers of two) with text lengths drawn from the short-text sets of benchmarks/length_sets.py
(MS MARCO-shaped queries and passages, cut at the max lengths). Each batch is padded as the data pipeline pads it
(TokenizeAndPad: the ladder length of the batch's longest query / passage) and packed as config.packing packs it
(m3jax.data.pipeline.pack_batch; the base row length chosen from the first batches as the trainer chooses it). Every
distinct step shape is compiled on this host for abstract bge-m3 params (bf16 compute, remat none, no dropout, one
device; nothing is allocated) and the matmul FLOPs of its HLO are counted (m3jax.core.xla_stats.hlo_stats: the
scanned layers weighted by their trip count; XLA's own cost_flops counts a scan body once and is printed alongside).
Output: JSON lines, one per step kind and a summary (real tokens per GFLOP, packed / padded).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.length_sets import bge_m3_config, msmarco_passages, msmarco_queries
from m3jax import config as config_lib
from m3jax.core import packing
from m3jax.core import sharding as shard_lib
from m3jax.core.padding import length_buckets, pad_length
from m3jax.core.xla_stats import cost_flops, hlo_stats
from m3jax.data.pipeline import pack_batch
from m3jax.train import step as step_lib

QUERY_MAX_LEN, PASSAGE_MAX_LEN, BATCH, GROUP = 64, 256, 48, 8


def batches(n: int, seed: int) -> list[dict]:
    """n padded local batches (numpy, as TokenizeAndPad gives them) of token ids with the sets' lengths."""
    q_len = np.minimum(msmarco_queries(n * BATCH, seed), QUERY_MAX_LEN)
    p_len = np.minimum(msmarco_passages(n * BATCH * GROUP, seed), PASSAGE_MAX_LEN)
    q_ladder, p_ladder = length_buckets(QUERY_MAX_LEN), length_buckets(PASSAGE_MAX_LEN)
    out = []
    for k in range(n):
        side = {}
        for name, lens, ladder in (("query", q_len[k * BATCH:(k + 1) * BATCH], q_ladder),
                                   ("passage", p_len[k * BATCH * GROUP:(k + 1) * BATCH * GROUP], p_ladder)):
            width = pad_length(int(lens.max()), ladder)
            ids = np.ones((len(lens), width), np.int32)
            mask = np.zeros((len(lens), width), np.int32)
            for i, m in enumerate(lens):
                ids[i, :m] = 5
                ids[i, 0], ids[i, m - 1] = 0, 2
                mask[i, :m] = 1
            side[f"{name}_input_ids"], side[f"{name}_attention_mask"] = ids, mask
        out.append(dict(side, teacher_scores=np.zeros((BATCH, GROUP), np.float32)))
    return out


def stepper_for(layers: int):
    cfg = dataclasses.replace(bge_m3_config(), num_hidden_layers=layers, remat_policy="none",
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    c = config_lib.default_config()
    c.mesh.data, c.use_self_distill = 1, True
    mesh = shard_lib.make_mesh(config_lib.mesh_settings(c), devices=jax.devices()[:1])
    return step_lib.Stepper.build(config_lib.step_settings(c), cfg, mesh, total_steps=100)


def abstract(stepper, arrays: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, jnp.asarray(v).dtype, sharding=stepper.batch_sharding)
            for k, v in arrays.items()}


def plan_timing(device_counts: list[int], seed: int, repeat: int = 3) -> None:
    """Best-of-`repeat` time of packing.train_pack_shape over W blocks of 48 queries + 384 passages."""
    ladder = tuple(length_buckets(PASSAGE_MAX_LEN))
    for w in device_counts:
        blocks = [np.concatenate([b["query_attention_mask"].sum(1), b["passage_attention_mask"].sum(1)])
                  for b in batches(w, seed)]
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            shape = packing.train_pack_shape(blocks, 256, ladder)
            times.append(time.perf_counter() - t0)
        print(json.dumps(dict(devices=w, texts=sum(len(b) for b in blocks), shape=list(shape),
                              plan_ms=round(1e3 * min(times), 1), per_block_ms=round(1e3 * min(times) / w, 2),
                              machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")),
              flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-timing", default="", help="comma-separated device counts W: time the packed-shape plan")
    a = p.parse_args(argv)
    if a.plan_timing:
        return plan_timing([int(w) for w in a.plan_timing.split(",")], a.seed)
    padded = batches(a.batches, a.seed)
    ladder = tuple(length_buckets(PASSAGE_MAX_LEN))
    lengths = [int(n) for b in padded[:8] for k in ("query", "passage") for n in b[f"{k}_attention_mask"].sum(1)]
    base = packing.base_row_length(lengths, ladder)
    stepper = stepper_for(a.layers)
    step = stepper.step(GROUP, False, False)
    compiled: dict = {}

    def flops(arrays: dict) -> tuple[float, float]:
        key = tuple(sorted((k, v.shape) for k, v in arrays.items()))
        if key not in compiled:
            t0 = time.perf_counter()
            c = step.lower(stepper.abstract_state(), abstract(stepper, arrays)).compile()
            compiled[key] = (float(hlo_stats(c.as_text())["matmul_flops"]), cost_flops(c) or 0.0)
            print(json.dumps(dict(shape={k: list(s) for k, s in key}, compile_s=round(time.perf_counter() - t0, 1),
                                  matmul_gflops=round(compiled[key][0] / 1e9, 1))), flush=True)
        return compiled[key]

    real = 0
    totals = {"padded": [0.0, 0.0, 0], "packed": [0.0, 0.0, 0]}
    for b in padded:
        real += int(b["query_attention_mask"].sum() + b["passage_attention_mask"].sum())
        pk = pack_batch(b, 1, base, ladder, pad_id=1)
        for kind, arrays in (("padded", {k: b[k] for k in b}),
                             ("packed", {k: pk[k] for k in (*step_lib.PACKED_KEYS, "teacher_scores")})):
            f, c = flops(arrays)
            computed = (arrays["packed_input_ids"].size if kind == "packed"
                        else arrays["query_input_ids"].size + arrays["passage_input_ids"].size)
            totals[kind][0] += f
            totals[kind][1] += c
            totals[kind][2] += computed
    rec = dict(model=f"bge-m3 dims, {a.layers} layers", batches=a.batches, batch=f"{BATCH} x {GROUP}",
               max_len=f"{QUERY_MAX_LEN}/{PASSAGE_MAX_LEN}", base_row_length=base, real_tokens=real)
    for kind, (f, c, computed) in totals.items():
        rec[f"{kind}_computed_tokens"] = computed
        rec[f"{kind}_real_share"] = round(real / computed, 4)
        rec[f"{kind}_matmul_tflops"] = round(f / 1e12, 2)
        rec[f"{kind}_real_tokens_per_gflop"] = round(real / (f / 1e9), 4)
        rec[f"{kind}_cost_flops_tflops"] = round(c / 1e12, 3)
    rec["packed_over_padded"] = round(rec["packed_real_tokens_per_gflop"] / rec["padded_real_tokens_per_gflop"], 3)
    rec["shapes"] = len(compiled)
    rec["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
