"""`m3jax score`: teacher scores (pos_scores / neg_scores) for a training file (m3jax.tools.teacher_scores)."""
from __future__ import annotations

import logging
import os

from m3jax.cli.common import UsageError, add_model_flags, load_model, local_job_files, model_info, start_processes
from m3jax.core import storage
from m3jax.core.errors import M3JaxError
from m3jax.model import loading
from m3jax.model.inference import FlagReranker
from m3jax.tools.mine import read_input
from m3jax.tools.teacher_scores import M3Teacher, RerankerTeacher, score_file

logger = logging.getLogger("m3jax")


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="teacher scores (pos_scores / neg_scores) for every pair of a training file",
        description="FlagEmbedding's add_reranker_score on the accelerators: scores every (query, passage) of "
                    "--input with a cross-encoder reranker (bge-reranker-v2-m3 layout) or a bge-m3 model's own "
                    "compute_score, and writes the records with \"pos_scores\" / \"neg_scores\". Streams the "
                    "input; rerunning the same command after an interruption continues (byte-identical output).")
    add_model_flags(p, what="the teacher: a reranker directory (XLMRobertaForSequenceClassification), a bge-m3 "
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
    p.set_defaults(func=run)


def run(args) -> int:
    teacher_kind = args.teacher
    if teacher_kind == "auto":
        teacher_kind = "reranker" if loading.is_reranker(args.model) else "m3"
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is too small")
    if args.passage_max_len < (6 if teacher_kind == "reranker" else 2) or (
            args.query_max_len is not None and args.query_max_len < 1):
        raise UsageError("--query-max-len / --passage-max-len too small")
    local_job_files(args, "score")
    records = read_input(args.input)  # file errors before loading the model
    start_processes()
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
        model = load_model(args, query_instruction_for_retrieval=None)
        try:
            teacher = M3Teacher(model, mode=args.mode, weights=tuple(args.weights), batch_size=args.batch_size,
                                query_max_len=query_max_len, passage_max_len=args.passage_max_len)
        except M3JaxError as e:
            raise UsageError(str(e)) from None
    report = score_file(teacher, args.input, args.output, query_instruction=args.query_instruction,
                        query_instruction_format=args.query_instruction_format,
                        records_per_chunk=args.records_per_chunk, model_info=model_info(args),
                        overwrite=args.overwrite, progress=not args.no_progress, records_index=records)
    logger.info("score: %d records, %d pairs scored, %.1f s", report["records"], report["pairs_scored"],
                report["seconds"])
    print(os.path.abspath(args.output))
    return 0
