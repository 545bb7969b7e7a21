"""Benchmark of the real train step: `python -m benchmarks.train_step ...` from the repository root.

It times exactly what train.py runs -- `trainer.Stepper.build(...)`'s jitted step with the unified loss,
self-distillation, AdamW, clipping, the mesh shardings and state donation -- on random weights of the bge-m3 shape (or
a tiny model), for shapes written like those of our PyTorch reference step (`benchmarks/torch_reference.py`):

    BATCHxGROUP:QLEN:PLEN     BATCH queries per device, GROUP passages per query, QLEN / PLEN tokens

and prints one JSON line per shape with the reference's fields (impl, ckpt, batch, group, qlen, plen, sub_batch,
step_s, queries_per_s, tokens_per_s, model_tflops, loss, peak_gib) plus compile_s and the settings. Inputs are the
reference's: ids uniform in [5, vocab) with cls=0 first and eos=2 last, full attention masks, no teacher scores.
model_tflops is the reference's formula: 3 x the encoder's forward matmul FLOPs (attention included) per second.

Modes:
    python -m benchmarks.train_step [--shapes 32x8:64:256,8x8:512:2048,8x2:512:8192]
        time the step (compile, warmup, timed steps)
    python -m benchmarks.train_step --analyze [--shapes ...]
        compile only (no params allocated) and print XLA's memory analysis (argument / output / temp / code bytes),
        XLA's cost analysis and the matmul FLOPs of the optimised HLO (while-loop bodies multiplied by their trip
        counts) against the model-FLOP formula (m3jax.core.xla_stats)
    python -m benchmarks.train_step --find-max-batch 8x8:512:8192 [--memory-budget-gib 73]
        largest per-device batch that fits: doubling from BATCH then bisection; by running steps until OOM on an
        accelerator, or against a memory budget with the compiled memory analysis (on CPU, or whenever
        --memory-budget-gib is given; `auto` = the device's limit)
    --tiny      a 2-layer, hidden-64, 1000-token model (CI)
    --gradient-cache ROWS | tokens=N | auto   the gradient cache (config.gradient_cache) with chunks of ROWS rows
                (or N tokens) per device; pair with --remat none (the re-encode is the recompute). auto: the
                trainer's choice per shape (gradient_cache_chunk_size="auto": the largest chunk whose compiled step
                fits --memory-budget-gib, else the device's limit; with --remat auto the pair), logged, then timed
    --set FIELD=VALUE   any run-config override, e.g. --set lora.rank=16 (LoRA), --set heads=dense,sparse;
                analyses then report trained_params, frozen_params and optimizer_state_bytes / _gib (all
                devices)
    --env       versions and devices

OOM (RESOURCE_EXHAUSTED) prints the shape's line with "error": "OOM", as the reference does.
peak_gib is the device allocator's peak (`memory_stats()["peak_bytes_in_use"]`), which is a process-lifetime peak:
with several shapes in one process it is the peak so far (peak_source says so); `analysed_gib` is the compiled
step's own requirement (arguments + outputs - aliased + temp + code), per device, and is exact per shape.
backend and device_kind are those of the mesh's devices (the compile target), not necessarily the host's.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import profile_trace
from benchmarks.torch_reference import auto_sub_batch  # the reference's --sub_batch auto
from m3jax.core.xla_stats import (
    GIB,
    BenchError,
    Shape,
    analysis_record,
    forward_flops,
    is_oom,
    memory_record,
    search_max_batch,
    short,
    target_device,
    tokens,
)
from m3jax.plan import MODEL_PRESETS

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO_ROOT, "configs", "bge_m3_unified.py")
DEFAULT_SHAPES = ("32x8:64:256", "8x8:512:2048", "8x2:512:8192")

# bge-m3's dims (config.json) and a 2-layer, hidden-64 model for CI: the presets of `m3jax plan`.
BGE_M3, TINY = MODEL_PRESETS["bge-m3"], MODEL_PRESETS["tiny"]


# ---------------------------------------------------------------------------------------------------------------
# Config and model


def load_recipe(path: str = RECIPE):
    spec = importlib.util.spec_from_file_location("m3jax_bench_recipe", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"--config {path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_mesh(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, size = part.partition("=")
        if not sep or axis not in ("data", "fsdp", "tensor"):
            raise BenchError(f"--mesh {text!r}: expected AXIS=SIZE[,...] with AXIS in data, fsdp, tensor")
        try:
            out[axis] = int(size)
        except ValueError:
            raise BenchError(f"--mesh {text!r}: {size!r} is not an int") from None
    return out


@dataclasses.dataclass
class Settings:
    """Resolved benchmark settings (what the JSON lines report)."""

    model: str  # bge-m3 | tiny
    dtype: str
    attention: str
    remat: str
    sub_batch: str  # an int as text, or auto
    cross_device: str
    mesh: dict
    hidden_dropout: float
    attention_dropout: float
    overrides: dict  # --set FIELD=VALUE


def build_config(args, *, remat: str, for_run: bool, chunk: int | None = None):
    """The recipe's config with the command line's overrides; `for_run` picks float32 for `--dtype auto` on CPU
    (bf16 is emulated there), while analyses keep the accelerator dtype. `chunk`: the gradient cache's rows per
    device in place of --gradient-cache's (what --gradient-cache auto chose)."""
    import jax

    config = load_recipe(args.config)
    config.unlock()
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if (for_run and jax.default_backend() == "cpu") else config.model.dtype
    config.model.dtype = dtype
    config.model.remat_policy = remat
    config.model.attention_implementation = args.attention
    config.model.hidden_dropout_prob = float(args.hidden_dropout)
    config.model.attention_probs_dropout_prob = float(args.attention_dropout)
    if args.cross_device != "recipe":
        config.negatives_cross_device = args.cross_device in ("dense", "all")
        config.cross_device_all_heads = args.cross_device == "all"
    for axis, size in parse_mesh(args.mesh).items():
        config.mesh[axis] = size
    rows, chunk_tokens = parse_gradient_cache(args.gradient_cache)
    if rows or chunk_tokens:
        config.gradient_cache = True
        config.gradient_cache_chunk_size = chunk or rows or config.gradient_cache_chunk_size
        config.gradient_cache_chunk_tokens = chunk_tokens
    for key, value in parse_overrides(args.set).items():
        *parents, leaf = key.split(".")
        target = config
        for name in parents:
            target = target[name]
        if isinstance(target[leaf], tuple) and isinstance(value, str):  # like --config.heads=dense,sparse
            value = (value,)
        target[leaf] = value
    config.max_steps = 1000
    return config


def parse_gradient_cache(text: str) -> tuple[int | str, int]:
    """--gradient-cache off | ROWS | tokens=N | auto -> (rows or "auto", tokens); (0, 0) = off."""
    text = str(text).strip()
    if text == "off":
        return 0, 0
    if text == "auto":
        return "auto", 0
    try:
        value = int(text.partition("=")[2]) if text.startswith("tokens=") else int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BenchError(f"--gradient-cache {text!r}: off, a positive number of rows, tokens=N or auto")
    return (0, value) if text.startswith("tokens=") else (value, 0)


def parse_overrides(items) -> dict:
    """--set FIELD=VALUE items -> {field: value}; VALUE is a Python literal (else the string), as train.py's
    --config.FIELD=VALUE overrides."""
    import ast

    from m3jax.config import default_config

    out = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        target = default_config()
        try:
            for name in key.split("."):
                target = target[name]
        except (KeyError, AttributeError):
            raise BenchError(f"--set {item!r}: no config field {key!r} (fields: m3jax/config.py)") from None
        if not sep:
            raise BenchError(f"--set {item!r}: expected FIELD=VALUE, e.g. lora.rank=16")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


class Bench:
    """One model setting: config, mesh, Stepper and (lazily) a live train state.

    `devices` (default: all of this host's) are the mesh's: compile-only devices of another backend (e.g. a TPU
    topology from jax.experimental.topologies on a CPU host) can be analysed but not run."""

    def __init__(self, args, *, remat: str, for_run: bool, devices=None, chunk: int | None = None):
        import jax

        from m3jax import config as config_lib
        from m3jax.core import sharding as shard_lib

        self.jax = jax
        self.shard_lib = shard_lib
        self.args = args
        self.config = build_config(args, remat=remat, for_run=for_run, chunk=chunk)
        config_lib.validate(self.config, for_training=False)
        self.mesh = shard_lib.make_mesh(config_lib.mesh_settings(self.config), devices)
        self.target = target_device(self.mesh)
        self.model_cfg = self._model_config(TINY if args.tiny else BGE_M3)
        self.num_shards = shard_lib.num_batch_shards(self.mesh, self.config.sharding_rules)
        self.local_shards = max(1, self.num_shards // jax.process_count())
        self.stepper = self._build_stepper()
        self._state = None
        self.settings = Settings(
            model="tiny" if args.tiny else "bge-m3", dtype=self.model_cfg.dtype,
            attention=self.model_cfg.attention_implementation, remat=remat, sub_batch=str(args.sub_batch_size),
            cross_device=("all" if self.config.cross_device_all_heads else
                          "dense" if self.config.negatives_cross_device else "off"),
            mesh={k: int(v) for k, v in self.mesh.shape.items()},
            hidden_dropout=self.model_cfg.hidden_dropout_prob,
            attention_dropout=self.model_cfg.attention_probs_dropout_prob, overrides=parse_overrides(args.set))

    # -- the trainer's model config and step ---------------------------------------------------------------------

    def _model_config(self, hf_config: dict):
        """The run's ModelConfig for random weights of this shape; attention 'auto' resolved for the target."""
        from m3jax import config as config_lib
        from m3jax.model import loading

        source = loading.ModelSource(path="random weights", hf_config=hf_config, tokenizer_dir=None,
                                     colbert_dim=None, has_pooler=False)
        return loading.model_config(source, config_lib.model_settings(self.config),
                                    platform=self.target["backend"])

    def _build_stepper(self):
        from m3jax import config as config_lib
        from m3jax.train.step import Stepper

        config_lib.validate_against_model(self.config, self.model_cfg)
        return Stepper.build(config_lib.step_settings(self.config), self.model_cfg, self.mesh, self.config.max_steps)

    # -- step and inputs ------------------------------------------------------------------------------------------

    def sub_batch_for(self, shape: Shape) -> int:
        text = str(self.args.sub_batch_size)
        return auto_sub_batch(shape.plen) if text == "auto" else int(text)

    def step_fn(self, shape: Shape):
        """The jitted train step of train.py for this group size (in-batch negatives, no teacher scores)."""
        sub = self.sub_batch_for(shape)
        if sub != self.config.sub_batch_size:  # the sub batch is part of the traced step: rebuild for a new one
            self.config.sub_batch_size = sub
            self.stepper = self._build_stepper()
        return self.stepper.step(shape.group, False, False)

    def abstract_batch(self, shape: Shape) -> dict:
        return self.stepper.abstract_batch(shape.batch, shape.group, shape.qlen, shape.plen)

    def random_batch(self, shape: Shape, seed: int = 0) -> dict:
        """This process's rows, as the reference makes them, placed as global arrays over the batch axes."""
        rng = np.random.default_rng(seed + self.jax.process_index())
        vocab = self.model_cfg.vocab_size
        rows = shape.batch * self.local_shards

        def ids(n, length):
            x = rng.integers(5, vocab, size=(n, length), dtype=np.int32)
            x[:, 0], x[:, -1] = 0, 2
            return x

        q, p = ids(rows, shape.qlen), ids(rows * shape.group, shape.plen)
        local = dict(query_input_ids=q, query_attention_mask=np.ones_like(q), passage_input_ids=p,
                     passage_attention_mask=np.ones_like(p),
                     teacher_scores=np.zeros((rows, shape.group), np.float32))
        return self.stepper.global_batch(local)

    def state(self):
        """A live train state from random params (re-created if a failed step consumed the donated one)."""
        leaves = [] if self._state is None else self.jax.tree.leaves(self._state)
        if self._state is None or any(x.is_deleted() for x in leaves):
            self._state = None
            gc.collect()
            self._state = self.stepper.init_state(self.stepper.random_params(self.args.seed))
        return self._state

    def compile(self, shape: Shape, *, abstract: bool, batch=None):
        fn = self.step_fn(shape)
        state = self.stepper.abstract_state() if abstract else self.state()
        batch = self.abstract_batch(shape) if batch is None else batch
        t0 = time.perf_counter()
        lowered = fn.lower(state, batch)
        t1 = time.perf_counter()
        fast = self.args.fast_compile == "on" or (self.args.fast_compile == "auto" and abstract)
        if fast and self.target["backend"] == "cpu":
            # LLVM at -O0: half the CPU compile time; the HLO passes, so the memory / cost analysis, are unchanged.
            compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
        else:
            compiled = lowered.compile()
        t2 = time.perf_counter()
        return compiled, t1 - t0, t2 - t1

    # -- records --------------------------------------------------------------------------------------------------

    def base_record(self, shape: Shape) -> dict:
        s = self.settings
        return dict(impl="m3jax", ckpt=int(s.remat != "none"), batch=shape.batch, group=shape.group,
                    qlen=shape.qlen, plen=shape.plen, sub_batch=self.sub_batch_for(shape),
                    gradient_cache=self.args.gradient_cache, model=s.model,
                    **({"gradient_cache_chunk": self._chunk()} if self._chunk() else {}),
                    dtype=s.dtype, attention=s.attention, remat=s.remat, cross_device=s.cross_device,
                    hidden_dropout=s.hidden_dropout, attention_dropout=s.attention_dropout, mesh=s.mesh,
                    devices=self.num_shards, **({"overrides": s.overrides} if s.overrides else {}),
                    **self.target, jax=self.jax.__version__)

    def _chunk(self) -> int | None:
        """The gradient cache's rows per device of this step (None: no cache, or chunks by tokens)."""
        from m3jax import config as config_lib

        if not self.config.gradient_cache or self.config.gradient_cache_chunk_tokens:
            return None
        return config_lib.step_settings(self.config).gradient_cache_chunk_size

    def analyze(self, shape: Shape, *, hlo: bool = True) -> dict:
        rec = dict(mode="analyze", **self.base_record(shape))
        try:
            compiled, lower_s, compile_s = self.compile(shape, abstract=True)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            return dict(rec, error="OOM", detail=short(e))
        params = self.stepper.parameter_summary()
        rec.update(lower_s=round(lower_s, 2), compile_s=round(lower_s + compile_s, 2),
                   trained_params=params["trained"], frozen_params=params["frozen"],
                   optimizer_state_bytes=params["optimizer_state_bytes"],
                   optimizer_state_gib=round(params["optimizer_state_bytes"] / GIB, 4),
                   **analysis_record(compiled, self.model_cfg, shape, hlo=hlo))
        del compiled
        gc.collect()
        return rec

    def run(self, shape: Shape, *, steps: int, warmup: int) -> dict:
        jax = self.jax
        rec = self.base_record(shape)
        rec.update(steps=steps, warmup=warmup)
        compiled = None
        try:
            batch = self.random_batch(shape, self.args.seed)
            compiled, lower_s, compile_s = self.compile(shape, abstract=False, batch=batch)
            rec.update(lower_s=round(lower_s, 2), compile_s=round(lower_s + compile_s, 2))
            mem = memory_record(compiled)
            if mem:
                rec["analysed_gib"] = mem["total_gib"]
            state = self.state()
            metrics = None
            for _ in range(warmup):
                state, metrics = compiled(state, batch)
                self._state = state
            jax.block_until_ready((state, metrics))
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, batch)
                self._state = state
            t_dispatch = time.perf_counter() - t0
            jax.block_until_ready((state, metrics))
            dt = (time.perf_counter() - t0) / max(steps, 1)
            w = self.num_shards
            tflops = 3 * forward_flops(self.model_cfg, shape) * w / dt / 1e12
            rec.update(step_s=round(dt, 4), queries_per_s=round(shape.batch * w / dt, 2),
                       tokens_per_s=round(tokens(shape) * w / dt), model_tflops=round(tflops, 1 if tflops >= 1 else 6),
                       loss=round(float(metrics["loss"]), 4), dispatch_s=round(t_dispatch / max(steps, 1), 5))
            if self.args.profile:
                name = f"{shape}".replace(":", "_") + f"_{self.settings.remat}"
                if self.config.gradient_cache:  # beside the uncached step at the same shape and remat
                    name += f"_gc{self._chunk() or 'tokens'}"
                out_dir = os.path.join(self.args.profile, name)
                trace = profile_trace.capture(functools.partial(self._step_again, compiled, batch),
                                              self.args.profile_steps, out_dir)
                table = profile_trace.reduce_trace(trace, self.args.profile_steps)
                with open(os.path.join(out_dir, "profile.json"), "w", encoding="utf-8") as f:
                    json.dump(table, f)
                with open(os.path.join(out_dir, "profile.md"), "w", encoding="utf-8") as f:
                    f.write(profile_trace.markdown(table) + "\n")
                rec["profile"] = dict(dir=out_dir, **{k: v for k, v in (table["device"] or {}).items()
                                                      if k in ("busy_ms", "idle_ms", "idle_share", "window_ms",
                                                               "kernels_per_step", "by_kind")})
            peak, source = device_peak_bytes(jax)
            if peak is None and mem:
                peak, source = mem["total_bytes"], "memory_analysis"
            rec.update(peak_gib=None if peak is None else round(peak / GIB, 2), peak_source=source)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            rec.update(error="OOM", detail=short(e))
        finally:
            del compiled
            gc.collect()
        return rec

    def _step_again(self, compiled, batch):
        state, metrics = compiled(self._state, batch)
        self._state = state
        return metrics

    def fits_by_analysis(self, shape: Shape, budget_bytes: int) -> tuple[bool, dict]:
        rec = self.analyze(shape, hlo=False)
        if "error" in rec:
            return False, rec
        return rec["total_bytes"] <= budget_bytes, rec

    def fits_by_running(self, shape: Shape) -> tuple[bool, dict]:
        rec = self.run(shape, steps=1, warmup=1)
        return "error" not in rec, rec


def device_peak_bytes(jax) -> tuple[int | None, str]:
    peaks = []
    for dev in jax.local_devices():
        try:
            stats = dev.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if not peaks:
        return None, "none"
    return max(peaks), "memory_stats (process peak so far)"


def device_limit_bytes(jax) -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="comma-separated BATCHxGROUP:QLEN:PLEN (BATCH per device); default %(default)s")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64, vocab-1000 model (CPU / CI)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per shape (the reference's default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (reference: 2)")
    p.add_argument("--analyze", action="store_true",
                   help="compile only, no params allocated: XLA memory and cost analysis per shape")
    p.add_argument("--find-max-batch", metavar="SHAPE", default=None,
                   help="largest per-device batch at GROUP:QLEN:PLEN of SHAPE, searched from its BATCH")
    p.add_argument("--memory-budget-gib", default=None,
                   help="with --find-max-batch, --remat auto or --gradient-cache auto: judge by the compiled memory "
                        "analysis against this "
                        "many GiB per device ('auto': the device's allocator limit) instead of running steps until "
                        "OOM; required on CPU for --find-max-batch")
    p.add_argument("--granularity", type=int, default=1,
                   help="with --find-max-batch: stop bisecting when the gap is at most this (default 1)")
    p.add_argument("--verify", action="store_true",
                   help="with --find-max-batch: time the step at the batch found (a normal benchmark line)")
    p.add_argument("--config", default=RECIPE, help="run config the step is built from (default: the bge-m3 "
                                                    "unified recipe, configs/bge_m3_unified.py)")
    p.add_argument("--remat", default=None,
                   help="remat policy, or a comma list to run each: auto (the trainer's choice per shape, by the "
                        "compiled memory against --memory-budget-gib or the device's limit), none, full, dots, "
                        "dots_no_batch (default: the recipe's)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                   help="attention implementation (auto: cudnn on GPU, xla elsewhere)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype (auto: the recipe's bfloat16; float32 for timed runs on CPU)")
    p.add_argument("--sub-batch-size", default="-1",
                   help="passages encoded per chunk per device (-1: all at once; auto: FlagEmbedding's table by "
                        "passage length, as the reference's --sub_batch auto)")
    p.add_argument("--gradient-cache", default="off",
                   help="off, ROWS, tokens=N or auto: the gradient cache with chunks of ROWS rows (N tokens) per "
                        "device, or per shape the largest chunk that fits --memory-budget-gib or the device's limit "
                        "(config.gradient_cache; excludes --sub-batch-size)")
    p.add_argument("--cross-device", default="recipe", choices=("recipe", "off", "dense", "all"),
                   help="negatives across devices: the recipe's (dense), off, dense (negatives_cross_device), all "
                        "(cross_device_all_heads)")
    p.add_argument("--mesh", default="", help="mesh axis sizes, e.g. data=-1 or data=1,fsdp=8 (default: recipe's)")
    p.add_argument("--hidden-dropout", type=float, default=0.1, help="bge-m3's config.json: 0.1")
    p.add_argument("--attention-dropout", type=float, default=0.1,
                   help="bge-m3's config.json: 0.1, applied by every attention path (cuDNN's inside its kernel, in "
                        "the layer loop of GPU training); 0 benchmarks the step without it")
    p.add_argument("--fast-compile", default="auto", choices=("auto", "on", "off"),
                   help="CPU only: compile with LLVM optimisation level 0 (about half the compile time; the HLO, "
                        "memory and cost analyses are identical, the code runs slower). auto: for analyses only")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a run-config field (repeatable), e.g. --set lora.rank=16 "
                        "--set \"lora.targets=('query','key','value')\" --set heads=dense,sparse")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace --profile-steps more steps with jax.profiler into DIR/<shape>_<remat> and "
                        "reduce the trace to a table (benchmarks/profile_trace.py): profile.json, profile.md")
    p.add_argument("--profile-steps", type=int, default=3, help="steps in the --profile trace (default 3)")
    p.add_argument("--topology", default=None,
                   help="compile for devices this host lacks, by m3jax plan's names: a TPU slice (v4-8, v5p-64, ...; "
                        "needs libtpu) or NVIDIA GPUs (h100, h200, 8xh100; XLA's deviceless GPU compile, needs "
                        "pip install 'm3jax[cuda-aot]'); with --analyze, or --find-max-batch with --memory-budget-gib")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--env", action="store_true", help="print versions and devices (one JSON line) and exit")


def _validate(args) -> None:
    if args.sub_batch_size != "auto":
        try:
            v = int(args.sub_batch_size)
        except ValueError:
            raise BenchError(f"--sub-batch-size {args.sub_batch_size!r}: an int or 'auto'") from None
        if v == 0 or v < -1:
            raise BenchError("--sub-batch-size: -1 (off), auto, or a positive int")
    if parse_gradient_cache(args.gradient_cache) != (0, 0) and str(args.sub_batch_size) != "-1":
        raise BenchError("--gradient-cache replaces --sub-batch-size: give one of them")
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            raise BenchError(f"--{name} {getattr(args, name)} is too small")
    if args.granularity < 1:
        raise BenchError("--granularity: a positive int")
    for r in remat_list(args):
        if r not in ("auto", "none", "full", "dots", "dots_no_batch"):
            raise BenchError(f"--remat {r!r}: auto, none, full, dots or dots_no_batch")
        if r == "auto" and args.find_max_batch:
            raise BenchError("--remat auto chooses per shape; --find-max-batch needs one policy")
    if parse_gradient_cache(args.gradient_cache)[0] == "auto" and args.find_max_batch:
        raise BenchError("--gradient-cache auto chooses per shape; --find-max-batch needs one chunk")
    parse_mesh(args.mesh)
    parse_overrides(args.set)
    if args.topology is not None:
        from m3jax import plan

        if not plan.is_known_topology(args.topology):
            raise BenchError(f"--topology {args.topology!r}: unknown; known: {plan.known_topologies()}")
        budget = args.memory_budget_gib not in (None, "auto")
        if not (args.analyze or (args.find_max_batch and budget)) or args.verify:
            raise BenchError("--topology compiles for devices this host lacks: use it with --analyze, or with "
                             "--find-max-batch and a --memory-budget-gib (no --verify)")


def remat_list(args) -> list[str]:
    if args.remat is None:
        return [load_recipe(args.config).model.remat_policy]
    return [r.strip() for r in args.remat.split(",") if r.strip()]


def run(args, emit: Callable[[dict], None] | None = None) -> list[dict]:
    """Run what the arguments ask for; every record goes to `emit` (default: a JSON line on stdout) as soon as it
    exists, and the list of them is returned."""
    import jax

    if args.env:  # before anything that needs the step's dependencies
        rec = environment()
        (emit or (lambda r: print(json.dumps(r), flush=True)))(rec)
        return [rec]
    _validate(args)
    devices = None
    if args.topology is not None:  # compile-only devices of a TPU slice or of NVIDIA GPUs (m3jax plan's targets)
        from m3jax import plan

        if args.topology in plan.TOPOLOGIES:
            plan.prepare_tpu_environment()
        else:
            plan.prepare_gpu_environment()
        try:
            devices = plan.compile_only_target(args.topology).devices
        except plan.PlanError as e:
            raise BenchError(str(e)) from None
    records: list[dict] = []
    sink = open(args.output, "a", encoding="utf-8") if args.output else None  # noqa: SIM115 (closed below)

    def out(rec: dict) -> None:
        records.append(rec)
        line = json.dumps(rec)
        (emit or (lambda r: print(line, flush=True)))(rec)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    try:
        if args.find_max_batch:
            shape = Shape.parse(args.find_max_batch)
            by_analysis = (args.memory_budget_gib is not None or jax.default_backend() == "cpu"
                           or devices is not None)
            for remat in remat_list(args):
                bench = Bench(args, remat=remat, for_run=not by_analysis, devices=devices)
                out(_find_max_batch(bench, shape, args, by_analysis))
                if args.verify and records[-1].get("max_batch"):
                    bench_run = bench if not by_analysis else Bench(args, remat=remat, for_run=True)
                    out(bench_run.run(shape.with_batch(records[-1]["max_batch"]), steps=args.steps,
                                      warmup=args.warmup))
            return records
        shapes = [Shape.parse(s) for s in args.shapes.split(",") if s.strip()]
        chunk_auto = parse_gradient_cache(args.gradient_cache)[0] == "auto"
        for remat in remat_list(args):
            if remat == "auto" or chunk_auto:
                for shape in shapes:
                    out(_run_auto(args, shape, remat, devices))
                continue
            bench = Bench(args, remat=remat, for_run=not args.analyze, devices=devices)
            for shape in shapes:
                logger.info("%s %s remat=%s", "analyzing" if args.analyze else "timing", shape, remat)
                out(bench.analyze(shape) if args.analyze else bench.run(shape, steps=args.steps, warmup=args.warmup))
            del bench
            gc.collect()
    finally:
        if sink:
            sink.close()
    return records


def _run_auto(args, shape: Shape, remat: str, devices=None) -> dict:
    """--remat auto and / or --gradient-cache auto: the trainer's choice for this shape (m3jax.plan.choose_auto:
    the least recomputation, and with the gradient cache the largest chunk, whose compiled step fits
    --memory-budget-gib, else the device's limit), then that step timed (or analysed). The record carries the
    choice with every candidate's memory: remat_auto, or gradient_cache_auto when the chunk was chosen."""
    from m3jax import config as config_lib
    from m3jax import plan

    probe = Bench(args, remat=remat, for_run=False, devices=devices)
    budget = None if args.memory_budget_gib in (None, "auto") else float(args.memory_budget_gib)
    with probe.config.unlocked():
        probe.config.auto_batch_memory_gib = budget if budget else -1.0
    (choice,) = plan.choose_auto(probe.config, config_lib.step_settings(probe.config), probe.model_cfg, probe.mesh,
                                 [(shape, False, False)],
                                 target=plan.memory_target(probe.config.auto_batch_memory_gib, probe.mesh))
    logger.info("%s", choice["line"])
    del probe
    gc.collect()
    bench = Bench(args, remat=choice["policy"], for_run=not args.analyze, devices=devices, chunk=choice["chunk"])
    rec = bench.analyze(shape) if args.analyze else bench.run(shape, steps=args.steps, warmup=args.warmup)
    chosen = {k: v for k, v in choice.items() if k != "line"}
    return dict(rec, **({"gradient_cache_auto": chosen} if choice["chunk"] is not None else {"remat_auto": chosen}))


def _find_max_batch(bench: Bench, shape: Shape, args, by_analysis: bool) -> dict:
    jax = bench.jax
    tries: list[dict] = []
    budget = None
    if by_analysis:
        if args.memory_budget_gib in (None, "auto"):
            budget = device_limit_bytes(jax)
            if budget is None:
                raise BenchError("--find-max-batch on a device without an allocator limit (CPU): give "
                                 "--memory-budget-gib N")
        else:
            budget = int(float(args.memory_budget_gib) * GIB)

    def fits(b: int) -> bool:
        t0 = time.perf_counter()
        ok, rec = (bench.fits_by_analysis(shape.with_batch(b), budget) if by_analysis
                   else bench.fits_by_running(shape.with_batch(b)))
        gib = rec.get("total_gib") if by_analysis else rec.get("peak_gib")
        tries.append(dict(batch=b, fits=ok, gib=gib, bytes=rec.get("total_bytes") if by_analysis else None,
                          error=rec.get("error"), seconds=round(time.perf_counter() - t0, 1)))
        logger.info("batch %d: %s (%s GiB)", b, "fits" if ok else "does not fit", gib)
        return ok

    best, first_fail = search_max_batch(fits, shape.batch, granularity=args.granularity)
    at_best = next((t for t in tries if t["batch"] == best), {})
    rec = dict(mode="find_max_batch", method="memory_analysis" if by_analysis else "run",
               **{k: v for k, v in bench.base_record(shape).items() if k != "batch"},
               max_batch=best, first_failing_batch=first_fail, gib_at_max=at_best.get("gib"),
               budget_gib=None if budget is None else round(budget / GIB, 4), budget_bytes=budget, tries=tries)
    return rec


def environment() -> dict:
    """Versions of what the step depends on, the devices, and whether the step's modules import."""
    import importlib
    import platform

    rec: dict[str, Any] = dict(mode="env", python=sys.version.split()[0], platform=platform.platform())
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "numpy", "torch",
                 "transformers"):
        try:
            rec[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001
            rec[name] = f"MISSING ({type(e).__name__}: {e})"
    try:
        import jax

        rec["backend"] = jax.default_backend()
        rec["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        rec["memory_limit_gib"] = (None if device_limit_bytes(jax) is None
                                   else round(device_limit_bytes(jax) / GIB, 2))
        importlib.import_module("m3jax.trainer")
        rec["m3jax_trainer"] = "ok"
    except Exception as e:  # noqa: BLE001
        rec["m3jax_trainer"] = f"FAILED ({type(e).__name__}: {e})"
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "JAX_PLATFORMS"):
        if os.environ.get(var):
            rec[var] = os.environ[var]
    return rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        for noisy in ("absl", "jax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        run(args)
    except BenchError as e:
        print(f"benchmarks.train_step: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
