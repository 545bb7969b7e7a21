"""`m3jax score`: teacher scores for every (query, passage) of a training file, as `pos_scores` / `neg_scores`.

    m3jax score --model /models/bge-reranker-v2-m3 --input train_mined.jsonl --output train_scored.jsonl
    m3jax score --model /models/bge-m3 --teacher m3 --mode all --input ... --output ...

FlagEmbedding's scripts/add_reranker_score.py, on the devices m3jax trains on. The pairs of a record are its
(query, pos_i) then its (query, neg_j), in file order; the query gets --query-instruction (formatted by
--query-instruction-format) unless the record has its own "prompt". Two teachers:

- reranker (`RerankerTeacher`): a cross-encoder in bge-reranker-v2-m3's layout (XLMRobertaForSequenceClassification,
  one logit), m3jax.model.inference.FlagReranker: the scores of FlagEmbedding's FlagReranker.compute_score (the logit,
  or its sigmoid with normalize). --passage-max-len is FlagEmbedding's max_length (the pair's length, the passage
  cut to fit); --query-max-len defaults to 3/4 of it, as there.
- m3 (`M3Teacher`): a bge-m3 model (HF directory or m3jax checkpoint) scoring by its own compute_score
  similarities: dense, sparse, colbert, dense+sparse or all (weighted means, compute_score's defaults 1 1 1). Each
  pair is scored on its own unpadded vectors (m3jax.model.inference.pair_scores), so a score does not depend on which
  other pairs share its batch; it equals FlagEmbedding's compute_score with batch_size=1 (with larger batches
  FlagEmbedding's colbert score may take a padded zero vector as the best match of a query token whose every real
  similarity is negative).

Every output record is its input record with `pos_scores` and `neg_scores` set (one float per passage; other
fields kept). Records go in chunks of --records-per-chunk: a chunk's pairs are tokenised, length-sorted, padded to a
ladder of lengths and sharded over the local devices; each finished chunk is one part in a work directory next to
the output (m3jax.core.storage.ResumableOutput), so rerunning the same command after an interruption continues with
the first missing chunk and the output is byte-identical to an uninterrupted run's. Memory: one chunk. With several
processes (jax.distributed) chunk c goes to process c mod P and process 0 assembles the output.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence

import numpy as np

from m3jax.core.errors import M3JaxError
from m3jax.data import files as data_files
from m3jax.evaluation.options import DEFAULT_WEIGHTS, combine, heads_of, scoring_mode
from m3jax.model.inference import pair_scores
from m3jax.tools.mine import _barrier, _file_id, open_job, read_input

logger = logging.getLogger(__name__)


class ScoreError(M3JaxError, ValueError):
    """A scoring option that cannot work; the message names the option."""


@dataclasses.dataclass
class RerankerTeacher:
    """A cross-encoder (m3jax.model.inference.FlagReranker) as teacher: one logit per pair."""

    reranker: object
    batch_size: int = 128
    query_max_len: int | None = None  # None: 3/4 of max_len (FlagEmbedding's default)
    max_len: int = 512
    normalize: bool = False

    def settings(self) -> dict:
        return {"teacher": "reranker", "batch_size": self.batch_size, "query_max_len": self.query_max_len,
                "max_len": self.max_len, "normalize": self.normalize}

    def score(self, queries: Sequence[str], passages: Sequence[str], query_of: np.ndarray) -> np.ndarray:
        pairs = [(queries[q], p) for q, p in zip(query_of, passages)]
        return np.asarray(self.reranker.compute_score(pairs, batch_size=self.batch_size,
                                                      query_max_length=self.query_max_len, max_length=self.max_len,
                                                      normalize=self.normalize), np.float64)


@dataclasses.dataclass
class M3Teacher:
    """A bge-m3 model's compute_score similarities (m3jax.model.inference.pair_scores) as teacher."""

    model: object
    mode: str = "all"
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    batch_size: int = 256
    query_max_len: int = 512
    passage_max_len: int = 512

    def __post_init__(self):
        self.mode, self.weights = scoring_mode(self.mode, self.weights, ScoreError, "a teacher scores")

    def settings(self) -> dict:
        return {"teacher": "m3", "mode": self.mode, "weights": list(self.weights), "batch_size": self.batch_size,
                "query_max_len": self.query_max_len, "passage_max_len": self.passage_max_len}

    def score(self, queries: Sequence[str], passages: Sequence[str], query_of: np.ndarray) -> np.ndarray:
        base = pair_scores(self.model, queries, passages, query_of, heads=tuple(heads_of([self.mode])),
                           batch_size=self.batch_size, query_max_length=self.query_max_len,
                           passage_max_length=self.passage_max_len)
        return np.asarray(combine(base, self.mode, self.weights), np.float64)


def add_scores(records: Sequence[dict], teacher, ins: data_files.Instructions) -> list[dict]:
    """The records with pos_scores / neg_scores from `teacher` (their query scored once per passage)."""
    queries = [data_files.query_text(rec, ins) for rec in records]
    passages, query_of = [], []
    for r, rec in enumerate(records):
        texts = list(rec["pos"]) + list(rec.get("neg") or ())
        passages += texts
        query_of += [r] * len(texts)
    found = teacher.score(queries, passages, np.asarray(query_of, np.int64)) if passages else np.zeros(0)
    at = 0
    for rec in records:
        n_pos, n_neg = len(rec["pos"]), len(rec.get("neg") or ())
        rec["pos_scores"] = [float(x) for x in found[at:at + n_pos]]
        rec["neg_scores"] = [float(x) for x in found[at + n_pos:at + n_pos + n_neg]]
        at += n_pos + n_neg
    return list(records)


def score_file(teacher, input_path: str, output_path: str, *, query_instruction: str | None = None,
               query_instruction_format: str = "{}{}", records_per_chunk: int = 1024, model_info: dict | None = None,
               overwrite: bool = False, progress: bool = True,
               records_index: data_files.FileIndex | None = None) -> dict:
    """Write `input_path`'s records with teacher scores to `output_path` (see the module docstring); resumable.
    `records_index`: m3jax.tools.mine.read_input's result, when the caller validated the file already."""
    import jax
    from tqdm.auto import tqdm

    if records_per_chunk < 1:
        raise ScoreError(f"records_per_chunk={records_per_chunk}: expected a positive number")
    t0 = time.monotonic()
    rank, n_proc = jax.process_index(), jax.process_count()
    index = records_index if records_index is not None else read_input(input_path)
    n_records = len(index)
    settings = {"command": "score", "input": _file_id(input_path), "model": model_info, "teacher": teacher.settings(),
                "query_instruction": query_instruction, "query_instruction_format": query_instruction_format,
                "records_per_chunk": records_per_chunk}
    job = open_job("score", output_path, settings, overwrite=overwrite, error=ScoreError)
    ins = data_files.Instructions(query=query_instruction, query_format=query_instruction_format)
    n_chunks = -(-n_records // records_per_chunk)
    mine = [c for c in range(rank, n_chunks, n_proc)]
    todo = [c for c in mine if not job.has_part(c)]
    size = lambda c: min(records_per_chunk, n_records - c * records_per_chunk)
    bar = tqdm(total=sum(size(c) for c in mine), initial=sum(size(c) for c in mine if c not in todo), desc="score",
               unit="record", dynamic_ncols=True, disable=not progress)
    pairs = 0
    if job.resumed and len(todo) < len(mine):
        logger.info("score: %d of %d chunks already scored", len(mine) - len(todo), len(mine))
    for c in todo:
        records = [index.record(i) for i in range(c * records_per_chunk, c * records_per_chunk + size(c))]
        with job.part(c) as f:
            for rec in add_scores(records, teacher, ins):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        pairs += sum(len(rec["pos"]) + len(rec.get("neg") or ()) for rec in records)
        bar.update(size(c))
    bar.close()
    _barrier("m3jax-score-chunks")
    if rank == 0:
        job.finish(n_chunks)
    _barrier("m3jax-score-end")
    return {"records": n_records, "pairs_scored": pairs, "chunks": n_chunks, "seconds": time.monotonic() - t0}
