"""Real tokens per compiled FLOP of the train step, packed (config.packing) against the padded step (issue 25).

    python -m benchmarks.packing_train [--batches 16] [--layers 24]
    python -m benchmarks.packing_train --plan-timing 8,64,512
    python -m benchmarks.packing_train --time [--warmup 1] [--steps 8] [--remat full] [--out FILE]

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

--time: the two steps run on the available device instead, as the trainer runs them (one Stepper, random params,
each batch put with Stepper.global_batch, the packed step given only the packed arrays): every distinct shape of
each kind once (compiles, untimed), then --warmup steps and --steps timed steps (block_until_ready each, the batches
in turn). One JSON record (to stdout, and appended to --out FILE): per kind the step seconds, their median, real
tokens per second (the timed steps' real tokens / their seconds) and packed_over_padded, the ratio of the two;
the device kind, jax version, command and shapes. Compile lines go to stderr. --hidden, --queries and
--layers shrink the model and the batch (the CPU test: --layers 2 --hidden 64 --queries 8).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.length_sets import bge_m3_config, msmarco_passages, msmarco_queries
from m3jax import config as config_lib
from m3jax import trainer
from m3jax.core import packing
from m3jax.core import sharding as shard_lib
from m3jax.core.padding import length_buckets, pad_length
from m3jax.core.xla_stats import cost_flops, hlo_stats
from m3jax.data.pipeline import pack_batch
from m3jax.train import step as step_lib

QUERY_MAX_LEN, PASSAGE_MAX_LEN, BATCH, GROUP = 64, 256, 48, 8


def batches(n: int, seed: int, queries: int = BATCH) -> list[dict]:
    """n padded local batches (numpy, as TokenizeAndPad gives them) of token ids with the sets' lengths."""
    q_len = np.minimum(msmarco_queries(n * queries, seed), QUERY_MAX_LEN)
    p_len = np.minimum(msmarco_passages(n * queries * GROUP, seed), PASSAGE_MAX_LEN)
    q_ladder, p_ladder = length_buckets(QUERY_MAX_LEN), length_buckets(PASSAGE_MAX_LEN)
    out = []
    for k in range(n):
        side = {}
        for name, lens, ladder in (("query", q_len[k * queries:(k + 1) * queries], q_ladder),
                                   ("passage", p_len[k * queries * GROUP:(k + 1) * queries * GROUP], p_ladder)):
            width = pad_length(int(lens.max()), ladder)
            ids = np.ones((len(lens), width), np.int32)
            mask = np.zeros((len(lens), width), np.int32)
            for i, m in enumerate(lens):
                ids[i, :m] = 5
                ids[i, 0], ids[i, m - 1] = 0, 2
                mask[i, :m] = 1
            side[f"{name}_input_ids"], side[f"{name}_attention_mask"] = ids, mask
        out.append(dict(side, teacher_scores=np.zeros((queries, GROUP), np.float32)))
    return out


def stepper_for(layers: int, hidden: int = 1024, *, remat: str = "none", attention: str = "xla",
                scan_layers: bool = True):
    """bge-m3 dims (hidden < 1024: heads of 64 and an FFN of 4x, the tiny model of the CPU test), bf16 compute, no
    dropout, one device, self-distillation, the default optimizer."""
    cfg = dataclasses.replace(bge_m3_config(), num_hidden_layers=layers, remat_policy=remat, dtype="bfloat16",
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              attention_implementation=attention, scan_layers=scan_layers)
    if hidden != cfg.hidden_size:
        cfg = dataclasses.replace(cfg, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                                  intermediate_size=4 * hidden)
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


def time_steps(a, padded: list[dict], base: int, ladder: tuple[int, ...]) -> dict:
    """The padded and the packed step run on the device: every shape once (compile), a.warmup, then a.steps timed
    steps each (the batches in turn); one record."""
    stepper = stepper_for(a.layers, a.hidden, remat=a.remat, attention=a.attention, scan_layers=not a.layer_loop)
    step = stepper.step(GROUP, False, False)
    state = stepper.init_state(stepper.random_params(a.seed))
    packed = [pack_batch(b, 1, base, ladder, pad_id=1) for b in padded]
    kinds = {"padded": [{k: b[k] for k in trainer.PADDED_BATCH_KEYS} for b in padded],
             "packed": [{k: pk[k] for k in trainer.PACKED_BATCH_KEYS} for pk in packed]}
    real = [int(b["query_attention_mask"].sum() + b["passage_attention_mask"].sum()) for b in padded]
    dev = jax.devices()[0]
    rec = dict(benchmark="packing_train --time", model=f"bge-m3 dims, {a.layers} x {a.hidden}, bf16, "
               f"remat {a.remat}, attention {a.attention}, {'layer loop' if a.layer_loop else 'scan'}, no dropout",
               batches=len(padded), batch=f"{a.queries} x {GROUP}", max_len=f"{QUERY_MAX_LEN}/{PASSAGE_MAX_LEN}",
               base_row_length=base, warmup=a.warmup, steps=a.steps)
    loss = None

    def run(batch: dict) -> float:
        nonlocal state, loss
        t0 = time.perf_counter()
        state, metrics = step(state, stepper.global_batch(batch))
        jax.block_until_ready((state, metrics))
        dt = time.perf_counter() - t0
        loss = float(metrics["loss"])
        return dt

    for kind, arrays in kinds.items():
        shapes: dict = {}
        for b in arrays:  # every distinct shape once: compiles, untimed
            key = tuple(sorted((k, v.shape) for k, v in b.items()))
            if key not in shapes:
                shapes[key] = run(b)
                print(json.dumps(dict(kind=kind, shape={k: list(s) for k, s in key},
                                      first_step_s=round(shapes[key], 1))), file=sys.stderr, flush=True)
        for i in range(a.warmup):
            run(arrays[i % len(arrays)])
        times = [run(arrays[i % len(arrays)]) for i in range(a.steps)]
        tokens = sum(real[i % len(real)] for i in range(a.steps))
        computed = sum(sum(v.size for k, v in arrays[i % len(arrays)].items() if k.endswith("input_ids"))
                       for i in range(a.steps))
        rec[f"{kind}_shapes"] = [{k: list(s) for k, s in key if k.endswith("input_ids")} for key in shapes]
        rec[f"{kind}_first_step_s"] = [round(t, 2) for t in shapes.values()]
        rec[f"{kind}_step_s"] = times
        rec[f"{kind}_median_step_s"] = statistics.median(times)
        rec[f"{kind}_real_tokens"] = tokens
        rec[f"{kind}_computed_tokens"] = computed
        rec[f"{kind}_real_tokens_per_s"] = tokens / sum(times)
        rec[f"{kind}_last_loss"] = loss  # finite: the step ran on real numbers
    rec["packed_over_padded"] = rec["packed_real_tokens_per_s"] / rec["padded_real_tokens_per_s"]
    rec.update(device_kind=dev.device_kind, platform=dev.platform, jax=jax.__version__,
               machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               command="python -m benchmarks.packing_train " + " ".join(a.argv))
    return rec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan-timing", default="", help="comma-separated device counts W: time the packed-shape plan")
    p.add_argument("--time", action="store_true", help="time the two steps on the device (see above)")
    p.add_argument("--warmup", type=int, default=1, help="--time: untimed steps after the compiles")
    p.add_argument("--steps", type=int, default=8, help="--time: timed steps of each kind")
    p.add_argument("--hidden", type=int, default=1024, help="--time: hidden size (bge-m3: 1024)")
    p.add_argument("--queries", type=int, default=BATCH, help="--time: queries per batch (the recipe: 48)")
    p.add_argument("--remat", default="none", help="--time: the encoder's remat policy")
    p.add_argument("--attention", default="xla", help="--time: attention implementation")
    p.add_argument("--layer-loop", action="store_true", help="--time: the layers as a Python loop (not nn.scan)")
    p.add_argument("--out", default="", help="--time: also append the record to this JSON-lines file")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.plan_timing:
        return plan_timing([int(w) for w in a.plan_timing.split(",")], a.seed)
    padded = batches(a.batches, a.seed, a.queries if a.time else BATCH)
    ladder = tuple(length_buckets(PASSAGE_MAX_LEN))
    lengths = [int(n) for b in padded[:8] for k in ("query", "passage") for n in b[f"{k}_attention_mask"].sum(1)]
    base = packing.base_row_length(lengths, ladder)
    if a.time:
        rec = time_steps(a, padded, base, ladder)
        print(json.dumps(rec), flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return
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
