"""`m3jax mine`: hard negatives for FlagEmbedding-format training data (m3jax.tools.mine)."""
from __future__ import annotations

import logging
import os

from m3jax.cli.common import add_model_flags, load_model, local_job_files, model_info, parsed_by, start_processes
from m3jax.tools.mine import MineOptions, mine, parse_range, read_input

logger = logging.getLogger("m3jax")


range_arg = parsed_by(parse_range)


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "mine", help="mine hard negatives for FlagEmbedding-format training data (exact search, any mode)",
        description="FlagEmbedding's hn_mine on the accelerators: every query of --input is searched exactly "
                    "against the candidate pool (--pool, or every pos/neg text of the input) by the dense, sparse, "
                    "colbert or combined score of a bge-m3 model; negatives are drawn from ranks START..END-1, minus "
                    "the positives, the query and the passages the score filters drop. Writes the input records "
                    "with \"neg\" filled. Streams input and pool; rerunning the same command after an "
                    "interruption continues (byte-identical output).")
    add_model_flags(p, what="the retriever: a bge-m3 (HF) directory or an m3jax run output_dir / checkpoints/<step>")
    p.add_argument("--input", required=True, help="jsonl: {\"query\", \"pos\": [...], \"neg\": [...] (optional)}")
    p.add_argument("--pool", default=None,
                   help="candidate pool jsonl: {\"text\": ...} per line (default: the input's pos and neg texts)")
    p.add_argument("--mode", default="dense", help="dense, sparse, colbert, dense+sparse or all (default dense)")
    p.add_argument("--weights", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="weights of the combined modes (default 1 1 1, as compute_score)")
    p.add_argument("--range-for-sampling", type=range_arg, default=(10, 210), metavar="START-END",
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
    p.set_defaults(func=run)


def run(args) -> int:
    options = MineOptions(
        mode=args.mode, weights=tuple(args.weights), range_for_sampling=args.range_for_sampling,
        negative_number=args.negative_number, max_score=args.max_score, absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin, fill=args.fill, seed=args.seed, query_instruction=args.query_instruction,
        query_instruction_format=args.query_instruction_format, batch_size=args.batch_size,
        query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
        queries_per_pass=args.queries_per_pass, passages_per_block=args.passages_per_block,
        passages_per_chunk=args.passages_per_chunk).checked()
    local_job_files(args, "mine")
    records = read_input(args.input, args.pool)  # file errors before loading the model
    start_processes()
    model = load_model(args, query_instruction_for_retrieval=None)
    report = mine(model, args.input, args.output, options, pool_path=args.pool, model_info=model_info(args),
                  overwrite=args.overwrite, save_every=args.save_every, progress=not args.no_progress,
                  records_index=records)
    logger.info("mine: %d records, %d pool passages, %.1f s", report["records"], report["pool"], report["seconds"])
    print(os.path.abspath(args.output))
    return 0
