"""The `m3jax` command (also `python -m m3jax`): a training run and the subcommands around it.

    m3jax train --config configs/toy.py [--config.<field>=<value> ...]      (the same as python train.py ...)
    m3jax export --checkpoint runs/toy --output runs/toy_export [--step N] [--pytorch-bin] [--heads-dtype float16]
                 [--lora-adapters]
    m3jax eval --model runs/toy_export --corpus c.jsonl --queries q.jsonl --qrels qrels.tsv [--output r.json]
    m3jax mine --model /models/bge-m3 --input train.jsonl --output mined.jsonl [--pool pool.jsonl] [--mode dense] ...
    m3jax score --model /models/bge-reranker-v2-m3 --input mined.jsonl --output scored.jsonl [--teacher m3] ...
    m3jax export --checkpoint runs/x --step best --output out [--merge-with /models/bge-m3 --merge-weight 0.5]
    m3jax merge --models A B [C ...] [--weights 0.5 0.3 0.2] --output merged
    m3jax merge --models A B --grid 0,0.25,0.5,0.75,1 --eval-set domain=DIR [--eval-set general=DIR] --output out
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
import json
import logging
import os
import sys

import m3jax
from m3jax import config as config_lib
from m3jax import distributed, loading, plan, storage, trainer
from m3jax import evaluate as ev
from m3jax import merge as merge_lib
from m3jax.checkpoint import CheckpointError
from m3jax.errors import M3JaxError
from m3jax.export import export_checkpoint
from m3jax.inference import BGEM3FlagModel, FlagReranker
from m3jax.mine import MineOptions, mine, parse_range, read_input
from m3jax.selection import resolve_step
from m3jax.storage import atomic_file
from m3jax.teacher_scores import M3Teacher, RerankerTeacher, score_file

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
                   "--config.learning_rate=2e-5 --config.mesh.fsdp=4 (repeatable; default: the config file's "
                   "values)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    config_lib.check_override_flags(args.train_argv)  # a FlagEmbedding flag or a mistyped field: before training
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
    p.add_argument("--step", type=_step_arg, default=None,
                   help="export this step; 'best': the run's best step (best.json) (default: the latest complete step)")
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
    p.add_argument("--merge-with", default=None, metavar="DIR",
                   help="a bge-m3 directory (e.g. the base model) to merge with: every tensor becomes W * fine-tuned "
                        "+ (1 - W) * DIR's (with --merge-weight W) (default: no merge)")
    p.add_argument("--merge-weight", type=float, default=None, metavar="W",
                   help="weight of the fine-tuned model in the merge, in [0, 1] (1: the fine-tuned model, 0: DIR); "
                        "required with --merge-with (default: none)")
    p.set_defaults(func=_run_export)


def _parsed_by(fn):
    """An argparse type: `fn`, its ValueError shown as a usage message."""
    def parse(value: str):
        try:
            return fn(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__
    return parse


def _step_arg(value: str):
    if value.lower() == "best":
        return "best"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step {value!r}: a step number or 'best'") from None


def _run_export(args) -> int:
    out = export_checkpoint(args.checkpoint, args.output, step=args.step, base_model=args.base_model,
                            pytorch_bin=args.pytorch_bin, heads_dtype=args.heads_dtype, overwrite=args.overwrite,
                            lora_adapters=args.lora_adapters, merge_with=args.merge_with,
                            merge_weight=args.merge_weight)
    import json

    info = json.loads(storage.read_bytes(storage.join(out, "m3jax_export.json")))
    merged = info.get("merge")
    print(f"m3jax export: wrote step {info['step']} of {info['source_checkpoint']}"
          + (f", merged with {merged['models'][1]} (W={merged['weights'][0]:g})" if merged else "")
          + f" to {out}", file=sys.stderr)
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# merge


def _grid_arg(value: str):
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid grid {value!r}: comma-separated weights, e.g. 0,0.5,1") from None


def _add_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="merge bge-m3 models tensor by tensor (weights summing to 1), or choose the weight on eval sets",
        description="Write sum_i w_i * model_i for every tensor (encoder and heads) of bge-m3 directories or m3jax "
                    "runs (LoRA adapters merged first). The weights must sum to 1 and are used as given. With "
                    "--grid (two models): evaluate W * first + (1 - W) * second for each W on the --eval-set sets "
                    "and write the best one, with every point's metrics in merge_grid.json and the model card.")
    p.add_argument("--models", nargs="+", required=True,
                   help="bge-m3 directories (with colbert_linear.pt and sparse_linear.pt) or m3jax run directories")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per model, non-negative, summing to 1 (default: equal)")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    p.add_argument("--grid", type=_grid_arg, default=None, metavar="W1,W2,...",
                   help="two models: the weights W of the first model to evaluate, e.g. 0,0.25,0.5,0.75,1 (default: no "
                        "grid, merge with --weights)")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=DIR|NAME=CORPUS,QUERIES,QRELS",
                   help="with --grid (repeatable): an eval set, a directory with corpus.jsonl, queries.jsonl and "
                        "qrels.tsv (or qrels/test.tsv), or the three files")
    p.add_argument("--metric", default="",
                   help="with --grid: what picks W, [W*]SET/MODE/METRIC terms joined by '+' (default: the first "
                        "set's all/ndcg@10, else its first mode and metric)")
    p.add_argument("--lower-is-better", action="store_true", help="with --grid: pick the lowest --metric")
    p.add_argument("--modes", type=_modes_arg, default=None,
                   help="with --grid: modes to evaluate (default dense,sparse,colbert,dense+sparse,all)")
    p.add_argument("--metrics", type=_metrics_arg, default="ndcg@10,recall@100,mrr@10",
                   help="with --grid: comma-separated NAME@K, NAME in ndcg, recall, mrr")
    p.add_argument("--batch-size", type=int, default=64,
                   help="with --grid: texts per encode batch (and passages per search block)")
    p.add_argument("--query-max-len", type=int, default=512,
                   help="with --grid: query tokens, special tokens included")
    p.add_argument("--passage-max-len", type=int, default=512,
                   help="with --grid: passage tokens, special tokens included")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="evaluate in float32 on accelerators (default: bfloat16)")
    p.set_defaults(func=_run_merge)


def _eval_set_arg(value: str, args):
    name, sep, where = value.partition("=")
    if not sep or not name or not where:
        raise UsageError(f"--eval-set {value!r}: expected NAME=DIR or NAME=CORPUS,QUERIES,QRELS")
    parts = where.split(",")
    if len(parts) == 3:
        corpus, queries, qrels = parts
    elif len(parts) == 1:
        corpus, queries = storage.join(where, "corpus.jsonl"), storage.join(where, "queries.jsonl")
        qrels = storage.join(where, "qrels.tsv")
        if not storage.isfile(qrels) and storage.isfile(storage.join(where, "qrels", "test.tsv")):
            qrels = storage.join(where, "qrels", "test.tsv")
    else:
        raise UsageError(f"--eval-set {value!r}: expected NAME=DIR or NAME=CORPUS,QUERIES,QRELS")
    modes = args.modes or ev.MODES
    return ev.EvalSetSpec(name=name, corpus=corpus, queries=queries, qrels=qrels, batch_size=args.batch_size,
                          query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                          modes=modes, weights=ev.DEFAULT_WEIGHTS, metrics=args.metrics)


def _run_merge(args) -> int:
    if args.grid is None:
        if args.eval_set or args.metric or args.lower_is_better:
            raise UsageError("--eval-set, --metric and --lower-is-better go with --grid")
        out = merge_lib.merge_models(args.models, args.weights, args.output, overwrite=args.overwrite)
        print(out)
        return 0
    if args.weights is not None:
        raise UsageError("--grid chooses the weights; leave out --weights")
    if not args.eval_set:
        raise UsageError("--grid needs at least one --eval-set to choose the weight on")
    specs = [_eval_set_arg(v, args) for v in args.eval_set]
    if len({s.name for s in specs}) != len(specs):
        raise UsageError("--eval-set: two sets with the same name")
    out, points = merge_lib.merge_grid(args.models, args.grid, specs, args.output, metric=args.metric,
                                       greater_is_better=not args.lower_is_better, devices=args.devices,
                                       use_fp16=not args.fp32, overwrite=args.overwrite)
    for p in points:
        print(f"W={p['weight']:g}\t{p['value']:.4f}\t" + " ".join(f"{k}={v:.4f}" for k, v in p["metrics"].items()))
    import json

    grid = json.loads(storage.read_bytes(storage.join(out, merge_lib.GRID_NAME)))
    value = next(p["value"] for p in points if p["weight"] == grid["chosen_weight"])
    print(f"chosen: W={grid['chosen_weight']:g} by {grid['metric']} = {value:.4f} "
          f"({'greater' if grid['greater_is_better'] else 'lower'} is better)")
    print(out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval


_modes_arg = _parsed_by(ev.parse_modes)


_metrics_arg = _parsed_by(ev.parse_metrics)


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
    p.add_argument("--query-max-len", type=int, default=512, help="query tokens, special tokens included")
    p.add_argument("--passage-max-len", type=int, default=512, help="passage tokens, special tokens included")
    p.add_argument("--query-instruction", default=None,
                   help="prefix for queries (query_instruction_for_retrieval) (default: none)")
    p.add_argument("--query-instruction-format", default="{}{}",
                   help="how the instruction and the query are joined, a str.format with two {} (instruction, "
                        "query)")
    p.add_argument("--pooling-method", choices=("cls", "mean"), default=None,
                   help="dense pooling of an HF directory (default: from m3jax_export.json, else cls)")
    p.add_argument("--step", type=_step_arg, default=None,
                   help="with a run directory: evaluate this step ('best': the run's best step) (default: the latest)")
    p.add_argument("--base-model", default=None, help="with a run directory: config.json + tokenizer directory "
                   "(default: <run>/base_model)")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="compute in float32 on accelerators (default: bfloat16)")
    p.add_argument("--output", default=None,
                   help="also write the metrics (and settings) to this JSON file (default: none)")
    p.set_defaults(func=_run_eval)


def _load_model(args, **overrides):
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
    """--query-max-len / --passage-max-len against the model's positions (config.max_tokens), before any work."""
    limit = config_lib.max_tokens(model_cfg)
    for name in ("query_max_len", "passage_max_len"):
        value = getattr(args, name, None)
        if value is not None and value > limit:
            raise UsageError(f"--{name.replace('_', '-')}={value}: at most {limit}, the model's position limit "
                             f"(max_position_embeddings {model_cfg.max_position_embeddings} - "
                             f"{int(model_cfg.pad_token_id) + 1} for XLM-R's padding offset)")


def _trained_matryoshka_modes(args, cfg) -> tuple[str, ...]:
    hf_dir = storage.isfile(storage.join(args.model, "config.json"))
    defaults = loading.find_model(args.model, step=None if hf_dir else args.step,
                                  base_model=None if hf_dir else args.base_model).defaults
    return ev.matryoshka_modes(defaults.get("mrl_dims") or (), dense_size=cfg.hidden_size,
                               colbert_size=cfg.colbert_out_dim if defaults.get("mrl_colbert") else None)


def _run_eval(args) -> int:
    for name in ("batch_size", "query_max_len", "passage_max_len"):
        if getattr(args, name) < (1 if name == "batch_size" else 2):
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    try:
        ev._check_weights(args.weights, args.modes or ev.MODES)
    except ValueError as e:
        raise UsageError(f"--weights: {e}") from None
    eval_set = ev.load_eval_set(args.corpus, args.queries, args.qrels)  # file errors before loading the model
    if args.step == "best":
        args.step = resolve_step(args.model, args.step)
    _start_processes()  # a multi-process job (M3JAX_* variables, SLURM, TPU pod): the corpus is shared out
    import jax

    model = _load_model(args)
    if args.modes is None:  # the five modes, and each Matryoshka size of a model trained with mrl_dims
        args.modes = ev.MODES + _trained_matryoshka_modes(args, model.cfg)
    results = ev.evaluate_eval_set(model, eval_set, batch_size=args.batch_size, query_max_len=args.query_max_len,
                                   passage_max_len=args.passage_max_len, modes=args.modes, weights=args.weights,
                                   metrics=args.metrics, split_over_processes=jax.process_count() > 1)
    if jax.process_index() != 0:
        return 0
    print(ev.format_table(results))
    if args.output:
        payload = ev.results_json(
            results, model=storage.resolve(args.model), corpus=storage.resolve(args.corpus),
            queries=storage.resolve(args.queries), qrels=storage.resolve(args.qrels), weights=list(args.weights),
            num_queries=len(eval_set.query_ids), num_passages=len(eval_set.corpus_ids),
            unknown_query_qrels=eval_set.unknown_query_qrels, unknown_passage_qrels=eval_set.unknown_passage_qrels,
            batch_size=args.batch_size, query_max_len=args.query_max_len, passage_max_len=args.passage_max_len)
        with atomic_file(args.output) as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# mine / score: preparing a distillation-ready training set


def _add_model_flags(p, *, what: str) -> None:
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


def _model_info(args) -> dict:
    return {"path": storage.resolve(args.model), "step": args.step, "base_model": args.base_model,
            "pooling_method": args.pooling_method, "fp32": args.fp32}


def _start_processes() -> None:
    distributed.initialize(distributed.DistributedSettings(initialize="auto", coordinator_address=None,
                                                           num_processes=None, process_id=None))


_range_arg = _parsed_by(parse_range)


def _add_mine(subparsers) -> None:
    p = subparsers.add_parser(
        "mine", help="mine hard negatives for FlagEmbedding-format training data (exact search, any mode)",
        description="FlagEmbedding's hn_mine on the accelerators: every query of --input is searched exactly "
                    "against the candidate pool (--pool, or every pos/neg text of the input) by the dense, sparse, "
                    "colbert or combined score of a bge-m3 model; negatives are drawn from ranks START..END-1, minus "
                    "the positives, the query and the passages the score filters drop. Writes the input records "
                    "with \"neg\" filled. Streams input and pool; rerunning the same command after an "
                    "interruption continues (byte-identical output).")
    _add_model_flags(p, what="the retriever: a bge-m3 (HF) directory or an m3jax run output_dir / checkpoints/<step>")
    p.add_argument("--input", required=True, help="jsonl: {\"query\", \"pos\": [...], \"neg\": [...] (optional)}")
    p.add_argument("--pool", default=None,
                   help="candidate pool jsonl: {\"text\": ...} per line (default: the input's pos and neg texts)")
    p.add_argument("--mode", default="dense", help="dense, sparse, colbert, dense+sparse or all (default dense)")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="weights of the combined modes (default 1 1 1, as compute_score)")
    p.add_argument("--range-for-sampling", type=_range_arg, default=(10, 210), metavar="START-END",
                   help="sample negatives from search ranks START..END-1, 0-based (default 10-210, as hn_mine)")
    p.add_argument("--negative-number", type=int, default=15, help="negatives per query (default 15)")
    p.add_argument("--max-score", type=float, default=None,
                   help="drop candidates scoring above this (default: no limit)")
    p.add_argument("--absolute-margin", type=float, default=None,
                   help="drop candidates scoring above (lowest positive score - MARGIN) (default: no margin)")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="drop candidates scoring above (1 - MARGIN) x the lowest positive score (default: no margin)")
    p.add_argument("--fill", choices=("random", "none"), default="random",
                   help="too few candidates left: add random pool passages (hn_mine's rule, default) or none")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (per record)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per encode batch")
    p.add_argument("--query-max-len", type=int, default=512, help="query tokens, special tokens included")
    p.add_argument("--passage-max-len", type=int, default=512, help="passage tokens, special tokens included")
    p.add_argument("--queries-per-pass", type=int, default=None,
                   help="queries searched together; the pool is encoded once per pass (default 131072, 16384 "
                        "for modes with colbert)")
    p.add_argument("--passages-per-block", type=int, default=None, help="passages per search step (default: "
                   "4096 for dense; less for sparse and colbert)")
    p.add_argument("--passages-per-chunk", type=int, default=None,
                   help="passages encoded at a time, the unit of resume (default 8 blocks)")
    p.add_argument("--save-every", type=float, default=300.0,
                   help="seconds between saves of the search state within a pass (default 300)")
    p.set_defaults(func=_run_mine)


def _run_mine(args) -> int:
    options = MineOptions(
        mode=args.mode, weights=tuple(args.weights), range_for_sampling=args.range_for_sampling,
        negative_number=args.negative_number, max_score=args.max_score, absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin, fill=args.fill, seed=args.seed, query_instruction=args.query_instruction,
        query_instruction_format=args.query_instruction_format, batch_size=args.batch_size,
        query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
        queries_per_pass=args.queries_per_pass, passages_per_block=args.passages_per_block,
        passages_per_chunk=args.passages_per_chunk).checked()
    _local_job_files(args, "mine")
    records = read_input(args.input, args.pool)  # file errors before loading the model
    _start_processes()
    model = _load_model(args, query_instruction_for_retrieval=None)
    report = mine(model, args.input, args.output, options, pool_path=args.pool, model_info=_model_info(args),
                  overwrite=args.overwrite, save_every=args.save_every, progress=not args.no_progress,
                  records_index=records)
    logger.info("mine: %d records, %d pool passages, %.1f s", report["records"], report["pool"], report["seconds"])
    print(os.path.abspath(args.output))
    return 0


def _local_job_files(args, command: str) -> None:
    """mine and score read their input by byte offset and build their output from resumable parts in a local
    directory: an input URL is staged to the local cache (once per host), an output URL refused."""
    if storage.is_url(args.output):
        raise UsageError(f"--output {args.output}: m3jax {command} builds its output from resumable parts in a local "
                         f"directory; write it to a local path and copy it to the object store afterwards")
    args.input = storage.stage(args.input, what=f"{command} input")
    if getattr(args, "pool", None):
        args.pool = storage.stage(args.pool, what=f"{command} candidate pool")


def _add_score(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="teacher scores (pos_scores / neg_scores) for every pair of a training file",
        description="FlagEmbedding's add_reranker_score on the accelerators: scores every (query, passage) of "
                    "--input with a cross-encoder reranker (bge-reranker-v2-m3 layout) or a bge-m3 model's own "
                    "compute_score, and writes the records with \"pos_scores\" / \"neg_scores\". Streams the "
                    "input; rerunning the same command after an interruption continues (byte-identical output).")
    _add_model_flags(p, what="the teacher: a reranker directory (XLMRobertaForSequenceClassification), a bge-m3 "
                             "(HF) directory, or an m3jax run output_dir / checkpoints/<step>")
    p.add_argument("--input", required=True, help="jsonl: {\"query\", \"pos\": [...], \"neg\": [...]}")
    p.add_argument("--teacher", choices=("auto", "reranker", "m3"), default="auto",
                   help="auto (default): reranker when --model's config.json is a sequence classifier, else m3")
    p.add_argument("--mode", default="all",
                   help="m3 teacher: dense, sparse, colbert, dense+sparse or all (default all)")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="m3 teacher: weights of the combined modes (default 1 1 1)")
    p.add_argument("--normalize", action="store_true", help="reranker: sigmoid of the logit (FlagEmbedding's "
                                                            "normalize)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs (reranker) or texts (m3) per batch")
    p.add_argument("--query-max-len", type=int, default=None,
                   help="query tokens (default: reranker 3/4 of --passage-max-len, m3 512)")
    p.add_argument("--passage-max-len", type=int, default=512,
                   help="m3: passage tokens; reranker: the whole pair's tokens (FlagEmbedding's max_length)")
    p.add_argument("--records-per-chunk", type=int, default=1024, help="records per chunk, the unit of resume")
    p.set_defaults(func=_run_score)


def _run_score(args) -> int:
    teacher_kind = args.teacher
    if teacher_kind == "auto":
        teacher_kind = "reranker" if loading.is_reranker(args.model) else "m3"
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is too small")
    if args.passage_max_len < (6 if teacher_kind == "reranker" else 2) or (
            args.query_max_len is not None and args.query_max_len < 1):
        raise UsageError("--query-max-len / --passage-max-len too small")
    _local_job_files(args, "score")
    records = read_input(args.input)  # file errors before loading the model
    _start_processes()
    if teacher_kind == "reranker":
        if args.step is not None or args.base_model is not None or args.pooling_method is not None:
            raise UsageError("--step, --base-model and --pooling-method apply to a bge-m3 teacher, not a reranker")
        if not storage.isfile(storage.join(args.model, "config.json")):
            raise UsageError(f"--model {args.model}: a reranker is a Hugging Face directory with config.json")
        teacher = RerankerTeacher(FlagReranker(args.model, use_fp16=not args.fp32, devices=args.devices),
                                  batch_size=args.batch_size, query_max_len=args.query_max_len,
                                  max_len=args.passage_max_len, normalize=args.normalize)
    else:
        if args.normalize:
            raise UsageError("--normalize applies to a reranker teacher")
        query_max_len = args.query_max_len or 512
        args.query_max_len = query_max_len
        model = _load_model(args, query_instruction_for_retrieval=None)
        try:
            teacher = M3Teacher(model, mode=args.mode, weights=tuple(args.weights), batch_size=args.batch_size,
                                query_max_len=query_max_len, passage_max_len=args.passage_max_len)
        except M3JaxError as e:
            raise UsageError(str(e)) from None
    report = score_file(teacher, args.input, args.output, query_instruction=args.query_instruction,
                        query_instruction_format=args.query_instruction_format,
                        records_per_chunk=args.records_per_chunk, model_info=_model_info(args),
                        overwrite=args.overwrite, progress=not args.no_progress, records_index=records)
    logger.info("score: %d records, %d pairs scored, %.1f s", report["records"], report["pairs_scored"],
                report["seconds"])
    print(os.path.abspath(args.output))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# plan


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile a run's train step for a TPU slice (or this host's device) and report memory, fit, "
                     "FLOPs and the largest batch that fits",
        description="Ahead-of-time compile of the run's real train step (no weights loaded) for a TPU topology "
                    "from any machine (needs libtpu: pip install 'm3jax[tpu]'), for NVIDIA GPUs by name (h100, "
                    "h200, 8xh100; XLA's deviceless GPU compile: pip install 'm3jax[cuda-aot]'), or for this host's "
                    "accelerator without --topology. Per step shape: per-chip peak memory against the chip's "
                    "HBM, fits or not, trip-weighted matmul FLOPs per step, the kernels, loops, copies and host "
                    "transfers of the optimised HLO, and the largest per-chip batch that fits (searched by "
                    "compiling); then the mesh it recommends. Any --config.<field>=<value> override applies.")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--config.FIELD", metavar="VALUE", dest="_override", help="override any config field, e.g. "
                   "--config.sub_batch_size=4 --config.mesh.fsdp=-1 --config.mesh.data=1 (repeatable; default: the "
                   "config file's values)")
    p.add_argument("--topology", default=None,
                   help="a TPU slice by its accelerator type: v4-8, v4-32, v5p-8, v5p-64, v5litepod-8, v6e-8, ...; or "
                        "NVIDIA GPUs: h100, h200, 8xh100 (compile-only, needs pip install 'm3jax[cuda-aot]') "
                        "(default: this host's devices)")
    p.add_argument("--shapes", default=None,
                   help="BATCHxGROUP:QLEN:PLEN[,...] per chip, e.g. 8x8:512:2048 (default: the shapes of the run's "
                        "data, or of its batch-size table)")
    p.add_argument("--model-config", default=None,
                   help="model dims: bge-m3 or tiny (presets), a model directory or a config.json file (default: "
                        "config.model_name_or_path's config.json; bge-m3 when that is empty)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="judge fit against this many GiB per chip (required for a CPU target; on TPU the compiler "
                        "also enforces its own limit) (default: the device's own memory)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="only compile the given shapes (one compile each); skip the largest-batch search")
    p.add_argument("--granularity", type=int, default=1,
                   help="stop the largest-batch search when the gap is at most this (default 1)")
    p.add_argument("--bisect", dest="predict", action="store_false",
                   help="narrow the largest-batch search by plain bisection, not by the batch where the memory line "
                        "through the compiles so far reaches the limit (the default: refused TPU compiles are fast "
                        "and say the bytes they needed, so the prediction saves fitting compiles)")
    p.add_argument("--search-limit", type=int, default=1024,
                   help="largest per-chip batch the search tries (default 1024; shown as LIMIT+ when it fits)")
    p.add_argument("--output", default=None, help="also write the results to this JSON file (default: none)")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    for name in ("granularity", "search_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}: a positive int")
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise UsageError(f"--memory-gib={args.memory_gib}: a positive number")
    shapes = plan.parse_shapes(args.shapes) if args.shapes is not None else None
    if args.topology is not None:
        if not plan.is_known_topology(args.topology):  # before jax starts
            raise UsageError(f"--topology {args.topology!r}: unknown; known: {plan.known_topologies()}")
        if args.topology in plan.TOPOLOGIES:
            plan.prepare_tpu_environment()
        else:
            plan.prepare_gpu_environment()
    config = config_lib.config_from_argv(args.config_argv, "m3jax plan")
    target = (plan.compile_only_target(args.topology, memory_gib=args.memory_gib) if args.topology
              else plan.local_target(memory_gib=args.memory_gib))
    result = plan.plan(config, target, shapes=shapes, model_config=args.model_config, search=args.search,
                       granularity=args.granularity, limit=args.search_limit,
                       predict=args.predict)
    if args.output:
        with atomic_file(args.output) as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Subcommand registry and entry point

SUBCOMMANDS = [_add_train, _add_export, _add_eval, _add_mine, _add_score, _add_merge, _add_plan]


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: "(default: X)" is appended unless the help already says what the
    default is (the word "default"), the flag is required, or it is --help / --version."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    """The installed package's version (importlib.metadata), else m3jax.__version__ (a source tree on PYTHONPATH)."""
    from importlib import metadata

    try:
        return metadata.version("m3jax")
    except metadata.PackageNotFoundError:
        return m3jax.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3jax", description="BGE-M3 fine-tuning in JAX: train, export, eval, "
                                                               "mine, score, merge, plan.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"m3jax {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        sub.formatter_class = HelpFormatter
    return parser


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # e.g. 2026-05-04 17:35:49,123 INFO m3jax...: ...


def configure_logging() -> None:
    """Timestamped INFO lines on stderr unless the program configured logging itself (e.g. pytest's handlers).
    absl (logging at import time in orbax and grain, imported with this module) runs a bare logging.basicConfig()
    when it first logs: that default handler, which would keep the root at WARNING and lose the INFO lines, is
    replaced."""
    if all(type(h) is logging.StreamHandler and getattr(h.formatter, "_fmt", None) == logging.BASIC_FORMAT
           for h in logging.getLogger().handlers):
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
        for noisy in ("absl", "jax"):  # Orbax logs every handler it creates, jax every backend it probes
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_logging()
    parser = build_parser()
    if argv[:1] == ["train"] and not {"-h", "--help"} & set(argv[1:]):
        # absl's config flags parse the rest (--config.<field>=<value> for any field of the schema).
        args = argparse.Namespace(command="train", func=_run_train, train_argv=argv[1:])
    elif argv[:1] == ["plan"] and not {"-h", "--help"} & set(argv[1:]):
        # argparse takes plan's own flags; absl's config flags --config and --config.<field>=<value>.
        args, rest = parser.parse_known_args(argv)
        unknown = [a for a in rest if not a.startswith("--config.")]
        if unknown:
            try:  # a FlagEmbedding flag: its m3jax spelling
                config_lib.check_foreign_flags(unknown)
            except M3JaxError as e:
                print(f"m3jax plan: error: {e}", file=sys.stderr)
                return 2
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.command, args.config_argv = "plan", ["--config", args.config, *rest]
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except M3JaxError as e:
        print(f"m3jax {args.command}: error: {e}", file=sys.stderr)
        return 2
