"""The `m3jax` command (also `python -m m3jax`): a training run and the subcommands around it.

    m3jax train --config configs/toy.py [--config.<field>=<value> ...]      (the same as python train.py ...)
    m3jax export --checkpoint runs/toy --output runs/toy_export [--step N] [--pytorch-bin] [--heads-dtype float16]
                 [--lora-adapters]
    m3jax eval --model runs/toy_export --corpus c.jsonl --queries q.jsonl --qrels qrels.tsv [--output r.json]
    m3jax plan --topology v5p-64 --config configs/bge_m3_unified.py [--shapes 8x8:512:2048] [--config.<field>=...]

Errors a user can fix (m3jax.errors.M3JaxError: a bad config value, malformed data or eval file, a missing or
incomplete checkpoint, an existing output directory) print one line "m3jax <command>: error: ..." on stderr and exit
with status 2, without a traceback. Flags naming the same thing are spelled the same in every subcommand
(--step, --base-model, --output, --overwrite, --batch-size, --query-max-len, --passage-max-len).

Adding a subcommand: write `_add_<name>(subparsers)` that creates its parser and sets `func` to a function taking the
parsed args and returning an exit status, then append it to SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from m3jax.errors import M3JaxError

logger = logging.getLogger("m3jax")


class UsageError(M3JaxError, ValueError):
    """A command-line problem found after parsing (reported like argparse errors, exit status 2)."""


# ---------------------------------------------------------------------------------------------------------------
# train


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune (or resume) from a config file: m3jax train --config configs/toy.py",
        description="Run train.py's training: --config FILE (a configs/*.py file) and any --config.<field>=<value> "
                    "overrides (fields: m3jax/config.py; a mistyped field is rejected with a suggestion).")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--config.FIELD", metavar="VALUE", dest="_override", help="override any config field, e.g. "
                   "--config.learning_rate=2e-5 --config.mesh.fsdp=4 (repeatable)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from m3jax import trainer

    return trainer.main(args.train_argv)


# ---------------------------------------------------------------------------------------------------------------
# export


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a training checkpoint as a bge-m3 (Hugging Face) directory",
        description="Write an m3jax training checkpoint in the bge-m3 layout: config.json, model.safetensors "
                    "(+ pytorch_model.bin), colbert_linear.pt, sparse_linear.pt, tokenizer and sentence-transformers "
                    "files. Loads in transformers AutoModel, FlagEmbedding BGEM3FlagModel and SentenceTransformer. "
                    "Written to a staging directory and renamed into place: never half-written.")
    p.add_argument("--checkpoint", required=True,
                   help="a run's output_dir (latest complete step), its checkpoints/ dir, or checkpoints/<step>")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    p.add_argument("--base-model", default=None,
                   help="directory with config.json and tokenizer files (default: <output_dir>/base_model, "
                        "copied there when the run started)")
    p.add_argument("--pytorch-bin", action="store_true", help="also write pytorch_model.bin (as bge-m3 ships)")
    p.add_argument("--heads-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of colbert_linear.pt / sparse_linear.pt; float32 (default) is exact, float16 is "
                        "what bge-m3 ships")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    p.add_argument("--lora-adapters", action="store_true",
                   help="a LoRA run: besides the merged model, write the adapters alone to <output>/lora_adapters "
                        "(PEFT layout: PeftModel.from_pretrained(<base bge-m3 AutoModel>, <that dir>))")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from m3jax.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, step=args.step, base_model=args.base_model,
                            pytorch_bin=args.pytorch_bin, heads_dtype=args.heads_dtype, overwrite=args.overwrite,
                            lora_adapters=args.lora_adapters)
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval


def _modes_arg(value: str):
    from m3jax.evaluate import parse_modes

    try:
        return parse_modes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _metrics_arg(value: str):
    from m3jax.evaluate import parse_metrics

    try:
        return parse_metrics(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="retrieval metrics on BEIR-style files (dense, sparse, colbert and combinations)",
        description="Exact search over a local BEIR-style corpus with the dense, sparse and colbert scores of a "
                    "bge-m3 model and their weighted sums; prints nDCG@10, Recall@100 and MRR@10 per mode.")
    p.add_argument("--model", required=True,
                   help="a Hugging Face bge-m3 directory, or an m3jax run output_dir / checkpoints/<step>")
    p.add_argument("--corpus", required=True, help="corpus.jsonl: {\"_id\", \"title\", \"text\"} per line")
    p.add_argument("--queries", required=True, help="queries.jsonl: {\"_id\", \"text\"} per line")
    p.add_argument("--qrels", required=True, help="qrels TSV: query-id, corpus-id, score (header optional)")
    p.add_argument("--modes", type=_modes_arg, default=None,
                   help="comma-separated: dense, sparse, colbert, dense+sparse, all, dense@K, colbert@K (Matryoshka "
                        "size K) (default: the first five, plus dense@K for each mrl_dims size the model was "
                        "trained with)")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="weights of the combined modes (default 1 1 1, as FlagEmbedding's compute_score)")
    p.add_argument("--metrics", type=_metrics_arg, default="ndcg@10,recall@100,mrr@10",
                   help="comma-separated NAME@K, NAME in ndcg, recall, mrr (default ndcg@10,recall@100,mrr@10)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encode batch (and passages per search block)")
    p.add_argument("--query-max-len", type=int, default=512)
    p.add_argument("--passage-max-len", type=int, default=512)
    p.add_argument("--query-instruction", default=None, help="prefix for queries (query_instruction_for_retrieval)")
    p.add_argument("--query-instruction-format", default="{}{}")
    p.add_argument("--pooling-method", choices=("cls", "mean"), default=None,
                   help="dense pooling of an HF directory (default: from m3jax_export.json, else cls)")
    p.add_argument("--step", type=int, default=None, help="with a run directory: evaluate this step")
    p.add_argument("--base-model", default=None, help="with a run directory: config.json + tokenizer directory")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="compute in float32 on accelerators (default: bfloat16)")
    p.add_argument("--output", default=None, help="also write the metrics (and settings) to this JSON file")
    p.set_defaults(func=_run_eval)


def _load_model(args):
    from m3jax.checkpoint import CheckpointError
    from m3jax.inference import BGEM3FlagModel

    hf_dir = os.path.isfile(os.path.join(args.model, "config.json"))
    if hf_dir and (args.step is not None or args.base_model is not None):
        raise UsageError("--step and --base-model apply to an m3jax run directory, not to an HF directory")
    if not hf_dir and args.pooling_method is not None:
        raise UsageError("--pooling-method applies to an HF directory; a checkpoint uses its run config's")
    try:
        return BGEM3FlagModel(args.model, pooling_method=args.pooling_method, step=args.step,
                              base_model=args.base_model, use_fp16=not args.fp32, devices=args.devices,
                              batch_size=args.batch_size, query_max_length=args.query_max_len,
                              passage_max_length=args.passage_max_len,
                              query_instruction_for_retrieval=args.query_instruction,
                              query_instruction_format=args.query_instruction_format)
    except CheckpointError as e:
        if hf_dir or not os.path.isdir(args.model):
            raise
        raise CheckpointError(f"--model: not an HF model directory (no config.json) and not a usable m3jax "
                              f"checkpoint: {e}") from e


def _trained_matryoshka_modes(args, cfg) -> tuple[str, ...]:
    from m3jax import loading
    from m3jax.evaluate import matryoshka_modes

    hf_dir = os.path.isfile(os.path.join(args.model, "config.json"))
    defaults = loading.find_model(args.model, step=None if hf_dir else args.step,
                                  base_model=None if hf_dir else args.base_model).defaults
    return matryoshka_modes(defaults.get("mrl_dims") or (), dense_size=cfg.hidden_size,
                            colbert_size=cfg.colbert_out_dim if defaults.get("mrl_colbert") else None)


def _run_eval(args) -> int:
    import json

    from m3jax import evaluate as ev
    from m3jax.storage import atomic_file

    for name in ("batch_size", "query_max_len", "passage_max_len"):
        if getattr(args, name) < (1 if name == "batch_size" else 2):
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    try:
        ev._check_weights(args.weights, args.modes or ev.MODES)
    except ValueError as e:
        raise UsageError(f"--weights: {e}") from None
    eval_set = ev.load_eval_set(args.corpus, args.queries, args.qrels)  # file errors before loading the model
    model = _load_model(args)
    if args.modes is None:  # the five modes, and each Matryoshka size of a model trained with mrl_dims
        args.modes = ev.MODES + _trained_matryoshka_modes(args, model.cfg)
    results = ev.evaluate_eval_set(model, eval_set, batch_size=args.batch_size, query_max_len=args.query_max_len,
                                   passage_max_len=args.passage_max_len, modes=args.modes, weights=args.weights,
                                   metrics=args.metrics)
    print(ev.format_table(results))
    if args.output:
        payload = ev.results_json(
            results, model=os.path.abspath(args.model), corpus=os.path.abspath(args.corpus),
            queries=os.path.abspath(args.queries), qrels=os.path.abspath(args.qrels), weights=list(args.weights),
            num_queries=len(eval_set.query_ids), num_passages=len(eval_set.corpus_ids),
            unknown_query_qrels=eval_set.unknown_query_qrels, unknown_passage_qrels=eval_set.unknown_passage_qrels,
            batch_size=args.batch_size, query_max_len=args.query_max_len, passage_max_len=args.passage_max_len)
        with atomic_file(args.output) as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# plan


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile a run's train step for a TPU slice (or this host's device) and report memory, fit, "
                     "FLOPs and the largest batch that fits",
        description="Ahead-of-time compile of the run's real train step (no weights loaded) for a TPU topology "
                    "from any machine (needs libtpu: pip install 'm3jax[tpu]'), or for this host's accelerator "
                    "without --topology. Per step shape: per-chip peak memory against the chip's HBM, fits or not, "
                    "trip-weighted matmul FLOPs per step and the largest per-chip batch that fits (searched by "
                    "compiling); then the mesh it recommends. Any --config.<field>=<value> override applies.")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--config.FIELD", metavar="VALUE", dest="_override", help="override any config field, e.g. "
                   "--config.sub_batch_size=4 --config.mesh.fsdp=-1 --config.mesh.data=1 (repeatable)")
    p.add_argument("--topology", default=None,
                   help="a TPU slice by its accelerator type: v4-8, v4-32, v5p-8, v5p-64, v5litepod-8, v6e-8, ... "
                        "(default: this host's devices)")
    p.add_argument("--shapes", default=None,
                   help="BATCHxGROUP:QLEN:PLEN[,...] per chip, e.g. 8x8:512:2048 (default: the shapes of the run's "
                        "data, or of its batch-size table)")
    p.add_argument("--model-config", default=None,
                   help="model dims: bge-m3 or tiny (presets), a model directory or a config.json file (default: "
                        "config.model_name_or_path's config.json; bge-m3 when that is empty)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="judge fit against this many GiB per chip (required for a CPU target; on TPU the compiler "
                        "also enforces its own limit)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="only compile the given shapes (one compile each); skip the largest-batch search")
    p.add_argument("--granularity", type=int, default=1,
                   help="stop the largest-batch search when the gap is at most this (default 1)")
    p.add_argument("--search-limit", type=int, default=1024,
                   help="largest per-chip batch the search tries (default 1024; shown as LIMIT+ when it fits)")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from m3jax import config as config_lib
    from m3jax import plan
    from m3jax.storage import atomic_file

    for name in ("granularity", "search_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}: a positive int")
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise UsageError(f"--memory-gib={args.memory_gib}: a positive number")
    shapes = plan.parse_shapes(args.shapes) if args.shapes is not None else None
    if args.topology is not None:
        if args.topology not in plan.TOPOLOGIES:  # before jax starts
            raise UsageError(f"--topology {args.topology!r}: unknown; known: {', '.join(plan.TOPOLOGIES)}")
        plan.prepare_tpu_environment()
    config = config_lib.config_from_argv(args.config_argv, "m3jax plan")
    target = (plan.tpu_target(args.topology, memory_gib=args.memory_gib) if args.topology
              else plan.local_target(memory_gib=args.memory_gib))
    result = plan.plan(config, target, shapes=shapes, model_config=args.model_config, search=args.search,
                       granularity=args.granularity, limit=args.search_limit)
    if args.output:
        with atomic_file(args.output) as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Subcommand registry and entry point

SUBCOMMANDS = [_add_train, _add_export, _add_eval, _add_plan]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3jax", description="BGE-M3 fine-tuning in JAX: train, export, eval, plan.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        # absl's config flags parse the rest (--config.<field>=<value> for any field of the schema).
        args = argparse.Namespace(command="train", func=_run_train, train_argv=argv[1:])
    elif argv[:1] == ["plan"] and not {"-h", "--help"} & set(argv[1:]):
        # argparse takes plan's own flags; absl's config flags --config and --config.<field>=<value>.
        args, rest = parser.parse_known_args(argv)
        unknown = [a for a in rest if not a.startswith("--config.")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.command, args.config_argv = "plan", ["--config", args.config, *rest]
    else:
        args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        for noisy in ("absl", "jax"):  # Orbax logs every handler it creates, jax every backend it probes
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except M3JaxError as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
