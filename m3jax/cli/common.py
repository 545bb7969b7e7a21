"""What the `m3jax` subcommands share: the usage error, argparse types, the model flags and loading the model they
name, and starting a multi-process job."""
from __future__ import annotations

import argparse

from m3jax.core import distributed, storage
from m3jax.core.errors import M3JaxError
from m3jax.evaluation.options import parse_metrics, parse_modes
from m3jax.io.checkpoint import CheckpointError
from m3jax.model import loading
from m3jax.model.inference import BGEM3FlagModel


class UsageError(M3JaxError, ValueError):
    """A command-line problem found after parsing (reported like argparse errors, exit status 2)."""


def parsed_by(fn):
    """An argparse type: `fn`, its ValueError shown as a usage message."""
    def parse(value: str):
        try:
            return fn(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__
    return parse


def step_arg(value: str):
    """--step of export and eval: a step number or 'best' (the run's best.json)."""
    if value.lower() == "best":
        return "best"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step {value!r}: a step number or 'best'") from None


modes_arg = parsed_by(parse_modes)


metrics_arg = parsed_by(parse_metrics)


def add_model_flags(p, *, what: str) -> None:
    """The flags of mine and score that name the model, its inputs and the output file."""
    p.add_argument("--model", required=True, help=what)
    p.add_argument("--step", type=int, default=None,
                   help="with an m3jax run directory: use this step (default: the latest)")
    p.add_argument("--base-model", default=None, help="with a run directory: config.json + tokenizer directory "
                   "(default: <run>/base_model)")
    p.add_argument("--pooling-method", choices=("cls", "mean"), default=None,
                   help="dense pooling of an HF bge-m3 directory (default: from m3jax_export.json, else cls)")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="compute in float32 on accelerators (default: bfloat16)")
    p.add_argument("--query-instruction", default=None,
                   help="prefix for queries (query_instruction_for_retrieval); a record's own \"prompt\" wins "
                        "(default: none)")
    p.add_argument("--query-instruction-format", default="{}{}",
                   help="how the instruction and the query are joined, a str.format with two {} (instruction, "
                        "query)")
    p.add_argument("--output", required=True, help="the output jsonl file (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, and discard an unfinished job started with other settings "
                        "(an unfinished job with the same settings is always continued)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(args, **overrides):
    """BGEM3FlagModel from the shared model flags (--model, --step, --base-model, --pooling-method, --devices, --fp32,
    --batch-size, --query-max-len, --passage-max-len, --query-instruction[-format]); `overrides` replace them."""
    hf_dir = storage.isfile(storage.join(args.model, "config.json"))
    if hf_dir and (args.step is not None or args.base_model is not None):
        raise UsageError("--step and --base-model apply to an m3jax run directory, not to an HF directory")
    if not hf_dir and args.pooling_method is not None:
        raise UsageError("--pooling-method applies to an HF directory; a checkpoint uses its run config's")
    kwargs = dict(pooling_method=args.pooling_method, step=args.step, base_model=args.base_model,
                  use_fp16=not args.fp32, devices=args.devices, batch_size=args.batch_size,
                  query_max_length=args.query_max_len, passage_max_length=args.passage_max_len,
                  query_instruction_for_retrieval=args.query_instruction,
                  query_instruction_format=args.query_instruction_format)
    kwargs.update(overrides)
    try:
        model = BGEM3FlagModel(args.model, **kwargs)
    except CheckpointError as e:
        if hf_dir or not storage.isdir(args.model):
            raise
        raise CheckpointError(f"--model: not an HF model directory (no config.json) and not a usable m3jax "
                              f"checkpoint: {e}") from e
    _check_max_lengths(args, model.cfg)
    return model


def _check_max_lengths(args, model_cfg) -> None:
    """--query-max-len / --passage-max-len against the model's positions (loading.max_tokens), before any work."""
    limit = loading.max_tokens(model_cfg)
    for name in ("query_max_len", "passage_max_len"):
        value = getattr(args, name, None)
        if value is not None and value > limit:
            raise UsageError(f"--{name.replace('_', '-')}={value}: at most {limit}, the model's position limit "
                             f"(max_position_embeddings {model_cfg.max_position_embeddings} - "
                             f"{int(model_cfg.pad_token_id) + 1} for XLM-R's padding offset)")


def model_info(args) -> dict:
    """The model flags as a mine / score job records them (a rerun with other ones starts afresh)."""
    return {"path": storage.resolve(args.model), "step": args.step, "base_model": args.base_model,
            "pooling_method": args.pooling_method, "fp32": args.fp32}


def start_processes() -> None:
    """Join a multi-process job when the launcher's environment asks for one (M3JAX_* variables, SLURM, TPU pod)."""
    distributed.initialize(distributed.DistributedSettings(initialize="auto", coordinator_address=None,
                                                           num_processes=None, process_id=None))


def local_job_files(args, command: str) -> None:
    """mine and score read their input by byte offset and build their output from resumable parts in a local
    directory: an input URL is staged to the local cache (once per host), an output URL refused."""
    if storage.is_url(args.output):
        raise UsageError(f"--output {args.output}: m3jax {command} builds its output from resumable parts in a local "
                         f"directory; write it to a local path and copy it to the object store afterwards")
    args.input = storage.stage(args.input, what=f"{command} input")
    if getattr(args, "pool", None):
        args.pool = storage.stage(args.pool, what=f"{command} candidate pool")
