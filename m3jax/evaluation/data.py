"""The files of a retrieval eval set, BEIR's layout (local paths or URLs such as gs://...), read and checked.

  corpus.jsonl   {"_id": "d1", "title": "...", "text": "..."}   title optional; encoded as "title text" like
                                                               FlagEmbedding's evaluation searcher
  queries.jsonl  {"_id": "q1", "text": "..."}
  qrels.tsv      query-id <tab> corpus-id <tab> score   (header line optional; TREC's "qid 0 docid rel" also read)
Only queries that have qrels are evaluated (as BEIR does); a qrels line naming an unknown query is skipped and one
naming an unknown passage is kept as a relevant passage that cannot be retrieved (as pytrec_eval counts it); both
are counted and logged. A malformed file raises EvalDataError naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

from m3jax.core import storage
from m3jax.core.errors import M3JaxError

logger = logging.getLogger(__name__)


class EvalDataError(M3JaxError, ValueError):
    """An eval file is missing or malformed; the message names the file and line."""


def _read_jsonl(path: str, what: str):
    if not storage.isfile(path):
        raise EvalDataError(f"{path}: {what} file does not exist")
    with storage.open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
            yield lineno, obj


def _id_of(obj: dict, path: str, lineno: int) -> str:
    key = "_id" if "_id" in obj else "id" if "id" in obj else None
    if key is None:
        raise EvalDataError(f"{path}:{lineno}: missing \"_id\"")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise EvalDataError(f"{path}:{lineno}: \"{key}\" must be a non-empty string, found {value!r}")
    return str(value)


def _text_of(obj: dict, field: str, path: str, lineno: int, *, optional: bool = False) -> str:
    value = obj.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise EvalDataError(f"{path}:{lineno}: \"{field}\" must be a string, found "
                            f"{'nothing' if field not in obj else repr(value)}")
    return value


def _load_texts(path, what: str, text_of) -> tuple[list[str], list[str]]:
    """(ids, texts) of a BEIR jsonl file in file order; `text_of(obj, lineno)` makes a line's text."""
    path = os.fspath(path)
    ids, texts, seen = [], [], {}
    for lineno, obj in _read_jsonl(path, what):
        record_id = _id_of(obj, path, lineno)
        if record_id in seen:
            raise EvalDataError(f"{path}:{lineno}: duplicate _id {record_id!r} (first on line {seen[record_id]})")
        seen[record_id] = lineno
        ids.append(record_id)
        texts.append(text_of(obj, lineno))
    if not ids:
        raise EvalDataError(f"{path}: the corpus is empty" if what == "corpus" else f"{path}: no queries")
    return ids, texts


def load_corpus(path) -> tuple[list[str], list[str]]:
    """(passage ids, passage texts) in file order; the text is "title text" when there is a title."""
    def text_of(obj, lineno):
        title = _text_of(obj, "title", path, lineno, optional=True)
        text = _text_of(obj, "text", path, lineno)
        return f"{title} {text}".strip() if title else text

    return _load_texts(path, "corpus", text_of)


def load_queries(path) -> tuple[list[str], list[str]]:
    """(query ids, query texts) in file order."""
    return _load_texts(path, "queries", lambda obj, lineno: _text_of(obj, "text", path, lineno))


def _parse_score(value: str, path: str, lineno: int) -> int:
    try:
        score = float(value)
    except ValueError:
        score = float("nan")
    if not math.isfinite(score) or score != int(score):
        raise EvalDataError(f"{path}:{lineno}: score {value!r} is not an integer relevance grade")
    return int(score)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def load_qrels(path) -> dict[str, dict[str, int]]:
    """{query id: {passage id: grade}} from a BEIR qrels TSV (query-id, corpus-id, score; header optional) or a
    TREC qrels file (query-id, iteration, corpus-id, grade)."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise EvalDataError(f"{path}: qrels file does not exist")
    qrels: dict[str, dict[str, int]] = {}
    where: dict[tuple[str, str], int] = {}
    with storage.open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            fields = [x.strip() for x in fields]
            if len(fields) == 4:  # TREC: qid iter docid rel
                fields = [fields[0], fields[2], fields[3]]
            if len(fields) != 3:
                raise EvalDataError(f"{path}:{lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                    f"found {len(fields)}")
            qid, pid, score = fields
            if lineno == 1 and not _is_number(score):
                continue  # header (query-id corpus-id score)
            if not qid or not pid:
                raise EvalDataError(f"{path}:{lineno}: empty query-id or corpus-id")
            grade = _parse_score(score, path, lineno)
            previous = qrels.setdefault(qid, {}).get(pid)
            if previous is not None and previous != grade:
                raise EvalDataError(f"{path}:{lineno}: ({qid}, {pid}) graded {grade} here and {previous} on line "
                                    f"{where[(qid, pid)]}")
            qrels[qid][pid] = grade
            where[(qid, pid)] = lineno
    if not qrels:
        raise EvalDataError(f"{path}: no qrels")
    return qrels


@dataclasses.dataclass
class EvalSet:
    query_ids: list[str]  # the evaluated queries (those with qrels), in queries-file order
    query_texts: list[str]
    corpus_ids: list[str]
    corpus_texts: list[str]
    qrels: dict[str, dict[str, int]]  # restricted to the evaluated queries
    unknown_query_qrels: int = 0  # qrels lines whose query is not in the queries file (skipped)
    unknown_passage_qrels: int = 0  # qrels lines whose passage is not in the corpus (kept: unretrievable)
    queries_without_qrels: int = 0  # queries in the file that are not evaluated


def load_eval_set(corpus_path, queries_path, qrels_path) -> EvalSet:
    corpus_ids, corpus_texts = load_corpus(corpus_path)
    all_qids, all_qtexts = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    known_q = set(all_qids)
    known_p = set(corpus_ids)
    unknown_q = [q for q in qrels if q not in known_q]
    unknown_q_lines = sum(len(qrels[q]) for q in unknown_q)
    unknown_p_lines = sum(1 for q in qrels if q in known_q for p in qrels[q] if p not in known_p)
    if unknown_q:
        logger.warning("%s: %d qrels lines name %d queries that are not in %s (e.g. %r); skipped", qrels_path,
                       unknown_q_lines, len(unknown_q), queries_path, unknown_q[0])
    if unknown_p_lines:
        example = next(p for q in qrels if q in known_q for p in qrels[q] if p not in known_p)
        logger.warning("%s: %d qrels lines name passages that are not in %s (e.g. %r); they count as relevant "
                       "passages that cannot be retrieved", qrels_path, unknown_p_lines, corpus_path, example)
    pairs = [(q, t) for q, t in zip(all_qids, all_qtexts) if q in qrels]
    if not pairs:
        raise EvalDataError(f"{qrels_path}: none of its query ids is in {queries_path}; nothing to evaluate")
    return EvalSet(query_ids=[q for q, _ in pairs], query_texts=[t for _, t in pairs], corpus_ids=corpus_ids,
                   corpus_texts=corpus_texts, qrels={q: dict(qrels[q]) for q, _ in pairs},
                   unknown_query_qrels=unknown_q_lines, unknown_passage_qrels=unknown_p_lines,
                   queries_without_qrels=len(all_qids) - len(pairs))
