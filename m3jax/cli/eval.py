"""`m3jax eval`: retrieval metrics of a model on BEIR-style files."""
from __future__ import annotations

import json

import jax

from m3jax.cli.common import UsageError, load_model, metrics_arg, modes_arg, start_processes, step_arg
from m3jax.core import storage
from m3jax.core.storage import atomic_file
from m3jax.evaluation.data import load_eval_set
from m3jax.evaluation.evaluate import evaluate_eval_set
from m3jax.evaluation.metrics import format_table, results_json
from m3jax.evaluation.options import MODES, check_weights, matryoshka_modes
from m3jax.evaluation.selection import resolve_step
from m3jax.model import loading


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="retrieval metrics on BEIR-style files (dense, sparse, colbert and combinations)",
        description="Exact search over a local BEIR-style corpus with the dense, sparse and colbert scores of a "
                    "bge-m3 model and their weighted sums; prints nDCG@10, Recall@100 and MRR@10 per mode.")
    p.add_argument("--model", required=True,
                   help="a Hugging Face bge-m3 directory, or an m3jax run output_dir / checkpoints/<step>")
    p.add_argument("--corpus", required=True, help="corpus.jsonl: {\"_id\", \"title\", \"text\"} per line")
    p.add_argument("--queries", required=True, help="queries.jsonl: {\"_id\", \"text\"} per line")
    p.add_argument("--qrels", required=True, help="qrels TSV: query-id, corpus-id, score (header optional)")
    p.add_argument("--modes", type=modes_arg, default=None,
                   help="comma-separated: dense, sparse, colbert, dense+sparse, all, dense@K, colbert@K (Matryoshka "
                        "size K) (default: the first five, plus dense@K for each mrl_dims size the model was "
                        "trained with)")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="weights of the combined modes (default 1 1 1, as FlagEmbedding's compute_score)")
    p.add_argument("--metrics", type=metrics_arg, default="ndcg@10,recall@100,mrr@10",
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
    p.add_argument("--step", type=step_arg, default=None,
                   help="with a run directory: evaluate this step ('best': the run's best step) (default: the latest)")
    p.add_argument("--base-model", default=None, help="with a run directory: config.json + tokenizer directory "
                   "(default: <run>/base_model)")
    p.add_argument("--devices", default=None, help="e.g. cpu, or cuda:0 (default: all local accelerators)")
    p.add_argument("--fp32", action="store_true", help="compute in float32 on accelerators (default: bfloat16)")
    p.add_argument("--output", default=None,
                   help="also write the metrics (and settings) to this JSON file (default: none)")
    p.set_defaults(func=run)


def _trained_matryoshka_modes(args, cfg) -> tuple[str, ...]:
    """dense@K (and colbert@K) for the mrl_dims the model was trained with (its run config or m3jax_export.json)."""
    hf_dir = storage.isfile(storage.join(args.model, "config.json"))
    defaults = loading.find_model(args.model, step=None if hf_dir else args.step,
                                  base_model=None if hf_dir else args.base_model).defaults
    return matryoshka_modes(defaults.get("mrl_dims") or (), dense_size=cfg.hidden_size,
                            colbert_size=cfg.colbert_out_dim if defaults.get("mrl_colbert") else None)


def run(args) -> int:
    for name in ("batch_size", "query_max_len", "passage_max_len"):
        if getattr(args, name) < (1 if name == "batch_size" else 2):
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    try:
        check_weights(args.weights, args.modes or MODES)
    except ValueError as e:
        raise UsageError(f"--weights: {e}") from None
    eval_set = load_eval_set(args.corpus, args.queries, args.qrels)  # file errors before loading the model
    if args.step == "best":
        args.step = resolve_step(args.model, args.step)
    start_processes()  # a multi-process job (M3JAX_* variables, SLURM, TPU pod): the corpus is shared out
    model = load_model(args)
    if args.modes is None:  # the five modes, and each Matryoshka size of a model trained with mrl_dims
        args.modes = MODES + _trained_matryoshka_modes(args, model.cfg)
    results = evaluate_eval_set(model, eval_set, batch_size=args.batch_size, query_max_len=args.query_max_len,
                                passage_max_len=args.passage_max_len, modes=args.modes, weights=args.weights,
                                metrics=args.metrics, split_over_processes=jax.process_count() > 1)
    if jax.process_index() != 0:
        return 0
    print(format_table(results))
    if args.output:
        payload = results_json(
            results, model=storage.resolve(args.model), corpus=storage.resolve(args.corpus),
            queries=storage.resolve(args.queries), qrels=storage.resolve(args.qrels), weights=list(args.weights),
            num_queries=len(eval_set.query_ids), num_passages=len(eval_set.corpus_ids),
            unknown_query_qrels=eval_set.unknown_query_qrels, unknown_passage_qrels=eval_set.unknown_passage_qrels,
            batch_size=args.batch_size, query_max_len=args.query_max_len, passage_max_len=args.passage_max_len)
        with atomic_file(args.output) as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 0
