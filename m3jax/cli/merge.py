"""`m3jax merge`: bge-m3 models merged tensor by tensor, or the merge weight chosen on eval sets (--grid)."""
from __future__ import annotations

import argparse
import json

from m3jax import config as config_lib
from m3jax.cli.common import UsageError, metrics_arg, modes_arg
from m3jax.core import storage
from m3jax.evaluation.evaluate import EvalSetSpec
from m3jax.evaluation.options import DEFAULT_WEIGHTS, MODES
from m3jax.tools import merge as merge_lib


def _grid_arg(value: str):
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid grid {value!r}: comma-separated weights, e.g. 0,0.5,1") from None


def add(subparsers) -> None:
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
    p.add_argument("--modes", type=modes_arg, default=None,
                   help="with --grid: modes to evaluate (default dense,sparse,colbert,dense+sparse,all)")
    p.add_argument("--metrics", type=metrics_arg, default="ndcg@10,recall@100,mrr@10",
                   help="with --grid: comma-separated NAME@K, NAME in ndcg, recall, mrr")
    p.add_argument("--batch-size", type=int, default=64,
                   help="with --grid: texts per encode batch (and passages per search block)")
    p.add_argument("--query-max-len", type=int, default=512,
                   help="with --grid: query tokens, special tokens included")
    p.add_argument("--passage-max-len", type=int, default=512,
                   help="with --grid: passage tokens, special tokens included")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="evaluate in float32 on accelerators (default: bfloat16)")
    p.set_defaults(func=run)


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
    modes = args.modes or MODES
    return EvalSetSpec(name=name, corpus=corpus, queries=queries, qrels=qrels, batch_size=args.batch_size,
                       query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                       modes=modes, weights=DEFAULT_WEIGHTS, metrics=args.metrics)


def run(args) -> int:
    if args.grid is None:
        if args.eval_set or args.metric or args.lower_is_better:
            raise UsageError("--eval-set, --metric and --lower-is-better go with --grid")
        out = merge_lib.merge_models(args.models, args.weights, args.output, overwrite=args.overwrite,
                                     card_settings=config_lib.model_card_settings())
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
                                       use_fp16=not args.fp32, overwrite=args.overwrite,
                                       card_settings=config_lib.model_card_settings())
    for p in points:
        print(f"W={p['weight']:g}\t{p['value']:.4f}\t" + " ".join(f"{k}={v:.4f}" for k, v in p["metrics"].items()))
    grid = json.loads(storage.read_bytes(storage.join(out, merge_lib.GRID_NAME)))
    value = next(p["value"] for p in points if p["weight"] == grid["chosen_weight"])
    print(f"chosen: W={grid['chosen_weight']:g} by {grid['metric']} = {value:.4f} "
          f"({'greater' if grid['greater_is_better'] else 'lower'} is better)")
    print(out)
    return 0
